"""Class 11 (continued): spellings chosen to make a pass silently compute the wrong function: a projection
shortcut, a norm over split features, a subtracted branch, ``torch.add(alpha=)``, ``addcmul``, a
broadcast branch, a branch that also reads the raw state, a norm-free step next to a pre site, Gemma's
``(1 + w)`` RMSNorm, a block returning an auxiliary value."""
from __future__ import annotations

import torch
from torch import nn

from . import D, VOCAB, Kept, S, case, geo, token_inputs
from .blocks import LM, LN, MLP, RMS, LayerScaleBlock, Mix, Post, Pre, Pre1, Stepped2, lm_ref, stack
from .streams import Stages


class Transition(nn.Module):
    """A stage transition with a projection shortcut: ``shortcut(x) + mlp(N(x))``, d -> 2d."""

    def __init__(self):
        super().__init__()
        self.norm, self.mlp, self.shortcut = LN(D), MLP(D, d_out=2 * D), nn.Linear(D, 2 * D)

    def forward(self, x):
        return self.shortcut(x) + self.mlp(self.norm(x))


@case("projection-shortcut-transition", sites=S("pre", 0, 0, 1, per=2) + S("pre", 1, 0, 1, per=2),
      inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("transition.norm", why="the add's skip is shortcut(x), not x"), Kept("final", why="final norm")])
def projection_shortcut():
    """A transition ``shortcut(x) + mlp(N(x))`` (Linear d -> 2d shortcut) between two stages: the skip is
    not the state the norm reads (not ``x``, nor ``a*x`` with a number/scalar/vector ``a``), so it is
    not a site (its norm skipped); every path to the second stage changes the feature size: a new
    stream restarting at block 0 (the transition is a single module, not a block)."""
    return Stages(between=Transition, name="transition")


class SplitNorm(nn.Module):
    """LayerNorm over each half of the features (a view that does not keep the last dim)."""

    def __init__(self, d=D):
        super().__init__()
        self.ln = nn.LayerNorm(d // 2)

    def forward(self, x):
        return self.ln(x.unflatten(-1, (2, -1))).flatten(-2)


@case("post-norm-over-split-features", sites=[], inputs=token_inputs(),
      kept=[Kept(f"blocks.{i}.{n}.ln", why="norm over half the features") for i in range(2) for n in ("n1", "n2")])
def split_features():
    """``N(x + f(x))`` where N normalizes each half of the features (``unflatten(-1, (2, d/2))``,
    LayerNorm(d/2), ``flatten``): the view does not keep the last dim, so N is not a norm over the
    stream's feature dim: 0 sites, every one skipped (removing them would change the function)."""
    return LM([Post(norm=SplitNorm), Post(norm=SplitNorm)], final=None)


class Subtract(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.mix, self.n2, self.mlp = LN(), Mix(), LN(), MLP()

    def forward(self, x):
        x = x - self.mix(self.n1(x))
        return x - self.mlp(self.n2(x))

    def geonorm(self, x, k):
        x = geo(x, -self.mix(self.n1(x)), k)
        return geo(x, -self.mlp(self.n2(x)), k)


@case("subtract-residual", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")], abstain=True,
      abstain_kept=[Kept(f"blocks.{i}.{n}", why="skipped when abstaining") for i in range(2) for n in ("n1", "n2")])
def subtract():
    """Abstain allowed. ``x - f(N(x))``: the spec's pattern is ``x + s``; read as ``x + (-f(N(x)))`` it is a
    pre site with update ``Geo(x, -f(N(x)))``. Either that, or the norms skipped; ``Geo(x, +f(N(x)))``
    (the sign lost) is wrong."""
    return LM([Subtract(), Subtract()])


class AddAlpha(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.mix, self.n2, self.mlp = LN(), Mix(), RMS(), MLP()

    def forward(self, x):
        x = torch.add(x, self.mix(self.n1(x)), alpha=0.5)
        return x.add(self.mlp(self.n2(x)), alpha=-0.3)

    def geonorm(self, x, k):
        x = geo(x, 0.5 * self.mix(self.n1(x)), k)
        return geo(x, -0.3 * self.mlp(self.n2(x)), k)


_N12 = [Kept(f"blocks.{i}.{n}", why="skipped when abstaining") for i in range(2) for n in ("n1", "n2")]


@case("torch-add-alpha", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref, kept=[Kept("final", why="final norm")],
      abstain=True, abstain_kept=_N12)
def add_alpha():
    """Abstain allowed. ``torch.add(x, f(N(x)), alpha=0.5)`` and ``x.add(g(N(x)), alpha=-0.3)``: ``x +
    alpha*f(N(x))`` reads as a pre site whose update is ``alpha * f(N(x))`` (a scale on the branch is part
    of ``s``, like LayerScale): 4 pre sites with ``Geo(x, alpha * f(N(x)))``, or (the spec does not name
    ``alpha``) the norms skipped; dropping alpha computes the wrong function."""
    return LM([AddAlpha(), AddAlpha()])


class AddCMul(LayerScaleBlock):
    def __init__(self):
        super().__init__(init=0.4)

    def forward(self, x):
        x = torch.addcmul(x, self.g1, self.mix(self.n1(x)))
        return torch.addcmul(x, self.mlp(self.n2(x)), self.g2)


@case("addcmul-layerscale", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")], abstain=True,
      abstain_kept=[Kept(f"blocks.{i}.{n}", why="skipped when abstaining") for i in range(2) for n in ("n1", "n2")])
def addcmul():
    """Abstain allowed. LayerScale fused as ``torch.addcmul(x, gamma, f(N(x)))`` (= ``x + gamma * f(N(x))``):
    either 4 pre sites ``Geo(x, gamma * f(N(x)))`` or the norms skipped; never ``Geo(x, f(N(x)))``."""
    return LM([AddCMul(), AddCMul()])


class PooledBranch(nn.Module):
    """``x + mlp(N(x).mean(1, keepdim=True))``: the update ``(B, 1, d)`` is broadcast over the tokens."""

    def __init__(self):
        super().__init__()
        self.n, self.mlp = LN(), MLP()

    def forward(self, x):
        return x + self.mlp(self.n(x).mean(1, keepdim=True))

    def geonorm(self, x, k):
        return geo(x, self.mlp(self.n(x).mean(1, keepdim=True)), k)


@case("broadcast-branch-pre", sites=S("pre", 0, 0, 1), inputs=token_inputs(), ref=lm_ref, kept=[Kept("final", why="final norm")],
      abstain=True, abstain_kept=[Kept(f"blocks.{i}.n", why="skipped when abstaining") for i in range(2)])
def broadcast_branch():
    """Abstain allowed. A branch whose output ``(B, 1, d)`` is broadcast over the tokens by the add (``f``
    pools over the tokens): ``x + f(N(x))``, but section 2 takes ``x`` and ``s`` of the same shape. Either
    2 pre sites whose update is the broadcast ``s`` (output shape kept), or the norms skipped."""
    return LM([PooledBranch(), PooledBranch()])


class RawGate(nn.Module):
    """``x + mlp(N(x)) * sigmoid(gate(x))``: the branch also reads the raw state."""

    def __init__(self):
        super().__init__()
        self.n, self.mlp, self.gate = LN(), MLP(), nn.Linear(D, D)

    def _s(self, x):
        return self.mlp(self.n(x)) * torch.sigmoid(self.gate(x))

    def forward(self, x):
        return x + self._s(x)

    def geonorm(self, x, k):
        return geo(x, self._s(x), k)


@case("branch-reads-raw-x-too", sites=S("pre", 0, 0, 1), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")], abstain=True, abstain_kept=[Kept(f"blocks.{i}.n", why="skipped when abstaining") for i in range(2)])
def raw_gate():
    """Abstain allowed. ``x + mlp(N(x)) * sigmoid(gate(x))``: the branch reads ``x`` through ``N`` and also
    raw; "f is any subgraph" makes it a pre site (``Geo(x, whole gated product)``), but ``f(N(x))`` can
    also be read as "x only through N": either 2 pre sites or the norms skipped, never another update."""
    return LM([RawGate(), RawGate()])


class HalfNormFree(nn.Module):
    """``x = x + mix(N(x))`` (a pre site), then ``x = x + mlp(x)`` (no norm: not a site)."""

    def __init__(self):
        super().__init__()
        self.n1, self.mix, self.mlp = LN(), Mix(), MLP()

    def forward(self, x):
        x = x + self.mix(self.n1(x))
        return x + self.mlp(x)

    def geonorm(self, x, k):
        x = geo(x, self.mix(self.n1(x)), k)
        return x + self.mlp(x)


@case("pre-then-normfree-step", sites=S("pre", 0, 0, 1), inputs=token_inputs(), ref=lm_ref, kept=[Kept("final", why="final norm")])
def half_norm_free():
    """Blocks with a pre site then a norm-free step ``x + mlp(x)``: the next block's norm (and the final
    norm) literally reads ``x + mlp(x)`` like a post norm, but its output feeds a branch (or the head),
    not the next state: 2 pre sites only, the norm-free steps stay plain adds."""
    return LM([HalfNormFree(), HalfNormFree()])


class GemmaRMS(nn.Module):
    """Gemma's RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + w)``, w initialised to 0."""
    _norm_like = True

    def __init__(self, d=D):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + self.weight.float())).type_as(x)


@case("gemma-rms-one-plus-weight", sites=S("pre", 0, 0, 1, per=2), norms=["rms_norm"] * 4, inputs=token_inputs(),
      ref=lm_ref, kept=[Kept("final", why="final norm")])
def gemma_rms():
    """Gemma's ``(1 + w)`` RMSNorm spelling: rms_norm pre sites."""
    return LM([Pre(norm=GemmaRMS), Pre(norm=GemmaRMS)], final=GemmaRMS)


class AuxBlock(Pre1):
    """Returns ``(x + f(N(x)), aux)`` with an auxiliary loss computed from the branch output."""

    def __init__(self):
        super().__init__(norm=RMS)

    def forward(self, x):
        s = self.f(self.n(x))
        return x + s, s.pow(2).mean()

    def geonorm(self, x, k):
        s = self.f(self.n(x))
        return geo(x, s, k), s.pow(2).mean()


class AuxModel(LM):
    def _run(self, t, step):
        x = self.embed(t)
        aux = 0.0
        for k, b in enumerate(self.blocks):
            x, a = step(b, x, k)
            aux = aux + a
        return self.head(self.final(x)), aux


@case("block-returns-aux-tuple", sites=S("pre", 0, 0, 1, 2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def aux_tuple():
    """Blocks returning ``(x + f(N(x)), aux)`` (an auxiliary loss from the branch, as MoE blocks do): the
    tuple is not a barrier: 3 pre sites; the auxiliary output is unchanged."""
    return AuxModel([AuxBlock(), AuxBlock(), AuxBlock()])


class PreWithFinal(Pre):
    """A Pre-Norm block that applies the model's final norm itself when it is the last block."""

    def __init__(self, last):
        super().__init__()
        self.final_norm = LN() if last else None

    def forward(self, x):
        x = super().forward(x)
        return self.final_norm(x) if self.final_norm is not None else x

    def geonorm(self, x, k):
        x = super().geonorm(x, k)
        return self.final_norm(x) if self.final_norm is not None else x


@case("final-norm-inside-last-block", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("blocks.1.final_norm", why="final norm (inside the last block)")])
def final_inside_last():
    """The final norm lives inside the last block module and reads that block's last pre site
    ``x + f(N(x))``: the add is a pre site (its branch reads ``N(x)``), and the norm after it is the final
    norm before the head (its output is read by no further step), not a post site: 4 pre sites."""
    return LM([PreWithFinal(False), PreWithFinal(True)], final=None)


def _tied():
    m = LM([Post(), Post()], final=LN)
    m.final.weight = m.blocks[1].n2.weight
    return m


@case("tied-post-and-final-norm-weights", sites=S("post", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", params=("final.weight", "final.bias"), why="final norm sharing its weight")])
def tied_weights():
    """Post-Norm blocks and a final norm whose weight is the same Parameter as the last post norm's: the
    post norms are removed (4 post sites), the final norm is kept and must keep its (shared) weight in the
    converted model's state_dict, unchanged."""
    return _tied()


class Masked(LM):
    """A padding mask multiplies the stream after the embedding and after every block."""

    def _run(self, t, step):
        mask = (t != 0).unsqueeze(-1).float()
        x = self.embed(t) * mask
        for k, b in enumerate(self.blocks):
            x = step(b, x, k) * mask
        return self.head(self.final(x))


def _padded_inputs():
    from . import SHAPES, tokens
    out = []
    for b, t in SHAPES:
        tok = tokens(b, t)
        tok[:, -2:] = 0
        out.append((tok,))
    return out


@case("masked-stream-between-blocks", sites=S("pre", 0, 0, 1, per=2), inputs=_padded_inputs, ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def masked():
    """A padding mask ``x * mask`` between the blocks (padded tokens have an all-zero state): the mask is
    not a norm-only boundary, so one stream, blocks 0, 1; at the zero-state tokens the geodesic falls
    back to ``x + s`` (section 2 guard) and the output stays finite."""
    return Masked([Pre(), Pre()])


def _zero_mlp():
    m = LM([Pre(), Pre()])
    with torch.no_grad():
        for b in m.blocks:
            b.mlp.down.weight.zero_()
            b.mlp.down.bias.zero_()
    return m


@case("zero-init-branches", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref, kept=[Kept("final", why="final norm")])
def zero_init():
    """Zero-initialised MLP output projections (``s == 0``, as at the start of training in many models):
    still 4 pre sites; a token whose update has no tangent part keeps ``x`` (section 2 guard), no NaN."""
    return _zero_mlp()


def _padding_idx():
    m = LM([Pre(), Pre()])
    m.embed = nn.Embedding(VOCAB, D, padding_idx=0)
    return m


@case("zero-state-padding-token", sites=S("pre", 0, 0, 1, per=2), inputs=_padded_inputs, ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def zero_state():
    """An embedding with ``padding_idx=0`` gives the padded tokens an all-zero state entering the first
    site: there the geodesic falls back to ``x + s`` (section 2 guard); 4 pre sites, finite output."""
    return _padding_idx()


class PreNormWrap(nn.Module):
    """lucidrains' ``PreNorm(dim, fn)``: ``fn(norm(x))``; the residual add is in the caller."""

    def __init__(self, fn):
        super().__init__()
        self.norm, self.fn = LN(), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class Lucid(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList([nn.ModuleList([PreNormWrap(Mix()), PreNormWrap(MLP())]) for _ in range(2)])
        self.final = LN()
        self.head = nn.Linear(D, VOCAB)

    def forward(self, t):
        x = self.embed(t)
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.head(self.final(x))

    def geonorm(self, t, per_site=False):
        x = self.embed(t)
        for i, (attn, ff) in enumerate(self.layers):
            x = geo(x, attn(x), 2 * i if per_site else i)
            x = geo(x, ff(x), 2 * i + 1 if per_site else i)
        return self.head(self.final(x))


@case("lucidrains-prenorm-wrapper", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      alt_sites=[(S("pre", 0, 0, 1, 2, 3), lambda m, t: m.geonorm(t, per_site=True))], kept=[Kept("final", why="final norm")])
def lucid():
    """lucidrains style: ``layers = ModuleList([ModuleList([PreNorm(attn), PreNorm(ff)])])`` and the adds
    ``x = attn(x) + x`` written in the root's loop: 4 pre sites. The blocks are ``layers.i`` (0, 0, 1, 1);
    since ``layers.i.0`` / ``layers.i.1`` are themselves elements of a ModuleList, the grouping 0, 1, 2, 3
    (with its decays) is accepted too."""
    return Lucid()


class Parallel3(nn.Module):
    """``x + a(N1(x)) + b(N2(x)) + c(N3(x))``, associated as ``(x + a) + (b + c)``."""

    def __init__(self):
        super().__init__()
        self.n1, self.a, self.n2, self.b, self.n3, self.c = LN(), Mix(), LN(), MLP(), RMS(), MLP()

    def _abc(self, x):
        return self.a(self.n1(x)), self.b(self.n2(x)), self.c(self.n3(x))

    def forward(self, x):
        a, b, c = self._abc(x)
        return (x + a) + (b + c)

    def geonorm(self, x, k):
        a, b, c = self._abc(x)
        return geo(x, a + b + c, k)


@case("parallel-three-branches", sites=S("parallel", 0, 0, 1), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def parallel3():
    """Three parallel branches ``(x + a(N1 x)) + (b(N2 x) + c(N3 x))``: one parallel site per block (any
    association), ``Geo(x, a + b + c)``."""
    return LM([Parallel3(), Parallel3()])


class PySum(Post):
    """``N(sum([x, f(x)]))``: Python's ``sum`` starts from 0, so the graph holds ``(0 + x) + f(x)``."""

    def forward(self, x):
        x = self.n1(sum([x, self.mix(x)]))
        return self.n2(sum([x, self.mlp(x)]))


@case("python-sum-post", sites=S("post", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref, abstain=True,
      abstain_kept=[Kept(f"blocks.{i}.{n}", why="skipped when abstaining") for i in range(2) for n in ("n1", "n2")])
def python_sum():
    """Abstain allowed. Post norms over ``sum([x, f(x)])`` (``0 + x`` then ``+ f(x)``): either 4 post sites
    ``Geo(x, f(x))`` or the norms skipped."""
    return LM([PySum(), PySum()], final=None)


class SharedNorms(nn.Module):
    """Two norm modules owned by the root and used by every block's sites (the adds in the root's loop,
    the branches in ``blocks[i].attn`` / ``blocks[i].mlp``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.norm_a, self.norm_b = LN(), RMS()
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": Mix(), "mlp": MLP()}) for _ in range(2)])
        self.final = LN()
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, add):
        x = self.embed(t)
        for k, blk in enumerate(self.blocks):
            x = add(x, blk["attn"](self.norm_a(x)), k)
            x = add(x, blk["mlp"](self.norm_b(x)), k)
        return self.head(self.final(x))

    def forward(self, t):
        return self._run(t, lambda x, s, k: x + s)

    def geonorm(self, t):
        return self._run(t, geo)


@case("shared-norm-modules-across-blocks", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def shared_norms():
    """Two norm modules at the root shared by every block (weight-shared norms, adds in the root's loop):
    their path is outside the blocks, yet they are branch-input norms of pre sites: 4 pre sites, blocks 0,
    0, 1, 1 (by the ``blocks.i`` branches, or two per block), the norms kept."""
    return SharedNorms()


class Siamese(Stepped2):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.tower = nn.ModuleList([Pre(), Pre()])
        self.final = LN()
        self.head = nn.Linear(D, 4)

    def _tower(self, t, step):
        return self.head(self.final(stack(self.tower, self.embed(t), step)))

    def _run(self, a, b, step):
        return self._tower(a, step), self._tower(b, step)


def _two_token_inputs():
    from . import SHAPES, tokens
    return [(tokens(b, t), tokens(b, t + 1, seed=3)) for b, t in SHAPES]


@case("siamese-shared-tower", sites=S("pre", 0, 0, 1, per=2) + S("pre", 1, 0, 1, per=2),
      inputs=_two_token_inputs, ref=lambda m, a, b: m.geonorm(a, b), kept=[Kept("final", why="final norm")])
def siamese():
    """One tower (shared weights) applied to two independent inputs, outputs returned separately: two
    residual streams (no path between them), each with its blocks 0, 1; weight sharing across streams
    does not merge them into one 4-block stream."""
    return Siamese()


class DiTBlock(nn.Module):
    """DiT adaLN-Zero: ``x + gate * f(modulate(LN(x), shift, scale))`` with the modulation from ``c``."""

    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn, self.mlp = Mix(), MLP()
        self.ada = nn.Linear(D, 6 * D)

    def _mods(self, c):
        return self.ada(torch.nn.functional.silu(c)).unsqueeze(1).chunk(6, dim=-1)

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self._mods(c)
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + sh1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)

    def geonorm(self, x, c, k):
        sh1, sc1, g1, sh2, sc2, g2 = self._mods(c)
        x = geo(x, g1 * self.attn(self.norm1(x) * (1 + sc1) + sh1), k)
        return geo(x, g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2), k)


class DiT(Stepped2):
    def __init__(self):
        super().__init__()
        self.x_embed, self.t_embed = nn.Linear(4, D), nn.Linear(1, D)
        self.blocks = nn.ModuleList([DiTBlock(), DiTBlock()])
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_final, self.out = nn.Linear(D, 2 * D), nn.Linear(D, 4)

    def _run(self, x, t, step):
        x = self.x_embed(x)
        c = self.t_embed(t.unsqueeze(-1))
        x = stack(self.blocks, x, step, c)
        shift, scale = self.ada_final(torch.nn.functional.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        return self.out(self.norm_final(x) * (1 + scale) + shift)


def _dit_inputs():
    from . import SHAPES, randn
    return [(randn(b, t, 4), randn(b, seed=5)) for b, t in SHAPES]


@case("dit-adaln-zero", sites=S("pre", 0, 0, 1, per=2), norms=["layer_norm"] * 4, inputs=_dit_inputs,
      ref=lambda m, x, t: m.geonorm(x, t), kept=[Kept("norm_final", params=(), why="final norm")])
def dit():
    """DiT adaLN-Zero blocks ``x + gate(c) * f(LN(x) * (1 + scale(c)) + shift(c))``: the modulation and the
    gate are part of the branch (computed from the conditioning, not from the stream): 4 pre sites; the
    modulated final norm is a final norm."""
    return DiT()


def _tied_head():
    m = LM([Pre(), Pre()])
    m.head.weight = m.embed.weight
    return m


@case("tied-embedding-head", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm"), Kept("embed", params=("embed.weight", "head.weight"), why="tied weight kept", listed=False)])
def tied_head():
    """GPT-2-style tied input embedding and output head: 4 pre sites, and both state_dict names of the tied
    weight survive the conversion unchanged."""
    return _tied_head()
