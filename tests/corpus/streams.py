"""Class 4: block grouping and streams (GEONORM.md section 3, "Decision" on block indices; section 4, "a new
stream starts at a norm-only boundary")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import D, EVEN_SHAPES, VOCAB, Kept, S, case, geo, token_inputs, tokens
from .blocks import LM, LN, MLP, RMS, Attn, Mix, Post, Pre, Pre1, Stepped, Stepped2, lm_ref, plain, rewritten, stack


# ---------------------------------------------------------------- three different block classes

class BlockA(Pre1):
    """LayerNorm + MLP (``x + f(n(x))``), under a class of its own."""


class BlockB(nn.Module):
    def __init__(self):
        super().__init__()
        self.rms, self.mixer = RMS(), Mix()

    def forward(self, h):
        r = self.mixer(self.rms(h))
        return r + h

    def geonorm(self, h, k):
        return geo(h, self.mixer(self.rms(h)), k)


class BlockC(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(D) + 0.2 * torch.randn(D))
        self.b = nn.Parameter(0.2 * torch.randn(D))
        self.gate, self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def _branch(self, x):
        u = F.layer_norm(x, (D,), self.w, self.b, 1e-5)
        return self.down(F.silu(self.gate(u)) * self.up(u))

    def forward(self, x):
        return x + self._branch(x)

    def geonorm(self, x, k):
        return geo(x, self._branch(x), k)


@case("three-block-classes", sites=S("pre", 0, 0, 1, 2), inputs=token_inputs(), ref=lm_ref,
      norms=["layer_norm", "rms_norm", "layer_norm"], kept=[Kept("final", why="final norm")])
def three_classes():
    """A ModuleList of three blocks of three different classes (LayerNorm+MLP, RMSNorm+mixer written
    ``r + h``, functional layer_norm + gated MLP), one site each: blocks 0, 1, 2 (decays 1, 1/2, 1/3):
    a block is an element of the list, whatever its class."""
    return LM([BlockA(), BlockB(), BlockC()])


# ---------------------------------------------------------------- two heads after a shared trunk

class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Pre1()])
        self.norm = LN()
        self.out = nn.Linear(D, VOCAB)

    def _run(self, x, step, k0=0):
        return self.out(self.norm(stack(self.blocks, x, step, k0=k0)))

    def forward(self, x):
        return self._run(x, plain)

    def geonorm(self, x, k0):
        return self._run(x, rewritten, k0)


class TwoHeads(Stepped):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.trunk = nn.ModuleList([Pre1(), Pre1(branch=Mix)])
        self.head_a, self.head_b = Head(), Head()

    def _run(self, t, step):
        x = stack(self.trunk, self.embed(t), step)
        return step(self.head_a, x, 2), step(self.head_b, x, 2)


@case("heads-continue-trunk", sites=S("pre", 0, 0, 1, 2, 2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("head_a.norm", why="final norm of head A"), Kept("head_b.norm", why="final norm of head B")])
def two_heads():
    """Two heads, each with its own block, after a shared trunk of two blocks: no norm-only boundary, so
    each head's block continues the trunk's stream and numbering (block 2 in both heads); each head's
    norm is a final norm (skipped). The output is a tuple."""
    return TwoHeads()


# ---------------------------------------------------------------- stages separated by a merger

class Merger(nn.Module):
    """``kind``: "ln-linear" (LN(d) then Linear(d -> 2d)), "tokens" (Swin PatchMerging: merge pairs of
    tokens to 2d features, LN(2d), Linear(2d -> 2d)), "reshape" (merge pairs of tokens, nothing else)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        if kind == "ln-linear":
            self.norm, self.reduction = LN(D), nn.Linear(D, 2 * D)
        elif kind == "tokens":
            self.norm, self.reduction = LN(2 * D), nn.Linear(2 * D, 2 * D)

    def forward(self, x):
        if self.kind == "ln-linear":
            return self.reduction(self.norm(x))
        B, T, C = x.shape
        x = x.reshape(B, T // 2, 2 * C)
        if self.kind == "tokens":
            x = self.reduction(self.norm(x))
        return x


class Stages(Stepped):
    """Two stages of Pre blocks (width d, then 2d) and, between them, the module ``between()`` (by default a
    :class:`Merger` of ``kind``) under the attribute ``name``."""

    def __init__(self, kind=None, between=None, name="merge"):
        super().__init__()
        self._between = name
        self.embed = nn.Embedding(VOCAB, D)
        self.stage1 = nn.ModuleList([Pre(D), Pre(D)])
        self.add_module(name, between() if between else Merger(kind))
        self.stage2 = nn.ModuleList([Pre(2 * D), Pre(2 * D)])
        self.final = LN(2 * D)
        self.head = nn.Linear(2 * D, VOCAB)

    def _run(self, t, step):
        x = getattr(self, self._between)(stack(self.stage1, self.embed(t), step))
        return self.head(self.final(stack(self.stage2, x, step)))


_TWO_STAGES = S("pre", 0, 0, 1, per=2) + S("pre", 1, 0, 1, per=2)


@case("patch-merger-ln-linear", sites=_TWO_STAGES, inputs=token_inputs(), ref=lambda m, t: m.geonorm(t),
      kept=[Kept("merge.norm", why="patch merger norm"), Kept("final", why="final norm")])
def merger_ln_linear():
    """Two stages separated by a patch merger ``Linear(d -> 2d)(LN(x))``: every path from the first
    stream to the second passes through a norm and changes the feature size: a new stream that restarts
    at block 0 (decays 1, 1/2 again); the merger's norm is not a site."""
    return Stages("ln-linear")


@case("patch-merging-tokens", sites=_TWO_STAGES, inputs=token_inputs(EVEN_SHAPES),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("merge.norm", why="patch merger norm"), Kept("final", why="final norm")])
def merger_tokens():
    """Swin PatchMerging: pairs of tokens merged to 2d features, ``Linear(LN(merge(x)))``: a new stream
    restarting at block 0; the merger norm is not a site."""
    return Stages("tokens")


@case("downsample-reshape-no-norm", sites=_TWO_STAGES, inputs=token_inputs(EVEN_SHAPES),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("final", why="final norm")])
def merger_reshape():
    """A stage downsample that is only a reshape merging pairs of tokens (feature size d -> 2d, no norm):
    every path changes the feature size, so a new stream restarting at block 0."""
    return Stages("reshape")


# ---------------------------------------------------------------- encoder-decoder

class DecBlock(nn.Module):
    def __init__(self, kind="pre"):
        super().__init__()
        self.kind = kind
        self.n1, self.sa, self.n2, self.ca, self.n3, self.mlp = LN(), Mix(), LN(), Attn(), LN(), MLP()

    def forward(self, x, mem):
        if self.kind == "pre":
            x = x + self.sa(self.n1(x))
            x = x + self.ca(self.n2(x), mem)
            return x + self.mlp(self.n3(x))
        x = self.n1(x + self.sa(x))
        x = self.n2(x + self.ca(x, mem))
        return self.n3(x + self.mlp(x))

    def geonorm(self, x, mem, k):
        if self.kind == "pre":
            x = geo(x, self.sa(self.n1(x)), k)
            x = geo(x, self.ca(self.n2(x), mem), k)
            return geo(x, self.mlp(self.n3(x)), k)
        x = geo(x, self.sa(x), k)
        x = geo(x, self.ca(x, mem), k)
        return geo(x, self.mlp(x), k)


class EncDec(Stepped2):
    def __init__(self, kind="pre"):
        super().__init__()
        block = Pre if kind == "pre" else Post
        self.kind = kind
        self.src_embed, self.tgt_embed = nn.Embedding(VOCAB, D), nn.Embedding(VOCAB, D)
        self.encoder = nn.ModuleList([block(), block()])
        self.decoder = nn.ModuleList([DecBlock(kind), DecBlock(kind)])
        if kind == "pre":
            self.enc_norm, self.dec_norm = LN(), LN()
        self.head = nn.Linear(D, VOCAB)

    def _run(self, src, tgt, step):
        m = stack(self.encoder, self.src_embed(src), step)
        if self.kind == "pre":
            m = self.enc_norm(m)
        x = stack(self.decoder, self.tgt_embed(tgt), step, m)
        if self.kind == "pre":
            x = self.dec_norm(x)
        return self.head(x)


_ENCDEC_INPUTS = lambda: [(tokens(2, 5), tokens(2, 4, seed=1)), (tokens(3, 7), tokens(3, 6, seed=1))]  # noqa: E731


@case("encoder-decoder-pre", sites=S("pre", 0, 0, 1, per=2) + S("pre", 1, 0, 1, per=3), inputs=_ENCDEC_INPUTS,
      ref=lambda m, s, t: m.geonorm(s, t), kept=[Kept("enc_norm", why="final norm of the encoder"), Kept("dec_norm", why="final norm of the decoder")])
def encdec_pre():
    """An encoder-decoder has two residual streams, each indexed from 0; a decoder block's
    self-attention, cross-attention and MLP sites share its decay (section 3). The encoder's final norm
    (read by the cross-attentions) and the decoder's are not sites."""
    return EncDec("pre")


@case("encoder-decoder-post", sites=S("post", 0, 0, 1, per=2) + S("post", 1, 0, 1, per=3),
      inputs=_ENCDEC_INPUTS, ref=lambda m, s, t: m.geonorm(s, t))
def encdec_post():
    """The original (Post-Norm) Transformer: two streams, encoder post sites (2 per block) and decoder
    post sites (3 per block: self-attn, cross-attn, MLP share the block's decay); the cross-attention
    reads the encoder's last state, which after the rewrite is the geodesic output."""
    return EncDec("post")


# ---------------------------------------------------------------- weight sharing

class Shared(Stepped):
    def __init__(self, kind="pre", n=3):
        super().__init__()
        self.n = n
        self.embed = nn.Embedding(VOCAB, D)
        self.emb_norm = LN() if kind == "post" else None
        self.block = Pre() if kind == "pre" else Post()
        self.final = LN() if kind == "pre" else None
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, step):
        x = self.embed(t)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = stack([self.block] * self.n, x, step)
        if self.final is not None:
            x = self.final(x)
        return self.head(x)


@case("albert-shared-pre", sites=S("pre", 0, 0, 1, 2, per=2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("final", why="final norm")])
def shared_pre():
    """One Pre-Norm block applied 3 times (weight sharing): 3 blocks (section 3: a module applied n
    times is n blocks), decays 1, 1/2, 1/3; each application has its own two sites."""
    return Shared("pre")


@case("albert-shared-post", sites=S("post", 0, 0, 1, 2, per=2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("emb_norm", why="embedding norm")])
def shared_post():
    """ALBERT-like: an embedding norm, then one Post-Norm block applied 3 times: 3 blocks of two post
    sites, the shared post norms removed in every application; the embedding norm is not a site."""
    return Shared("post")


class SameClassAttrs(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.first, self.second, self.third = Pre(), Pre(), Pre()
        self.final = LN()
        self.head = nn.Linear(D, VOCAB)

    def forward(self, t):
        return self.head(self.final(self.third(self.second(self.first(self.embed(t))))))

    def geonorm(self, t):
        return self.head(self.final(stack((self.first, self.second, self.third), self.embed(t), rewritten)))


@case("same-class-attributes", sites=S("pre", 0, 0, 1, 2, per=2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("final", why="final norm")])
def same_class_attrs():
    """Three invocations of one block class under one parent, as plain attributes (no ModuleList): three
    blocks (section 4: several invocations of one class under one parent), numbered in order of
    application."""
    return SameClassAttrs()


# ---------------------------------------------------------------- flat graphs (no block modules)

class Flat(nn.Module):
    """Sites written directly in the model's forward: norms and branches are plain attributes."""

    def __init__(self, kind, n):
        super().__init__()
        self.kind, self.n = kind, n
        self.embed = nn.Embedding(VOCAB, D)
        for i in range(n):
            setattr(self, f"norm{i}", RMS() if i % 2 else LN())
            setattr(self, f"f{i}", Mix() if i % 2 == 0 else MLP())
            if kind == "parallel":
                setattr(self, f"norm{i}b", LN())
                setattr(self, f"g{i}", MLP())
        self.tail = MLP() if kind == "pre+tail" else None
        self.final = LN() if kind != "post" else None
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, rewrite):
        x = self.embed(t)
        per = 1 if self.kind == "parallel" else 2
        for i in range(self.n):
            n, f = getattr(self, f"norm{i}"), getattr(self, f"f{i}")
            k = i // per
            if self.kind == "post":
                x = geo(x, f(x), k) if rewrite else n(x + f(x))
            elif self.kind == "parallel":
                s = f(n(x)) + getattr(self, f"g{i}")(getattr(self, f"norm{i}b")(x))
                x = geo(x, s, k) if rewrite else x + s
            else:
                x = geo(x, f(n(x)), k) if rewrite else x + f(n(x))
        if self.tail is not None:
            x = x + self.tail(x)
        if self.final is not None:
            x = self.final(x)
        return self.head(x)

    def forward(self, t):
        if self.kind == "parallel":  # written out as in GPT-J: x + attn(ln(x)) + mlp(ln2(x))
            x = self.embed(t)
            for i in range(self.n):
                x = x + getattr(self, f"f{i}")(getattr(self, f"norm{i}")(x)) \
                    + getattr(self, f"g{i}")(getattr(self, f"norm{i}b")(x))
            return self.head(self.final(x))
        return self._run(t, False)

    def geonorm(self, t):
        return self._run(t, True)


@case("flat-pre-4", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lambda m, t: m.geonorm(t),
      kept=[Kept("final", why="final norm")])
def flat_pre():
    """Four Pre-Norm sites written directly in the model's forward, no block modules: grouped two sites
    per block in stream order (blocks 0, 0, 1, 1)."""
    return Flat("pre", 4)


@case("flat-parallel-3", sites=S("parallel", 0, 0, 1, 2), inputs=token_inputs(), ref=lambda m, t: m.geonorm(t),
      kept=[Kept("final", why="final norm")])
def flat_parallel():
    """Three parallel steps ``x + f(N1(x)) + g(N2(x))`` written flat: one site per block for parallel
    blocks (blocks 0, 1, 2)."""
    return Flat("parallel", 3)


@case("flat-post-4", sites=S("post", 0, 0, 1, per=2), inputs=token_inputs(), ref=lambda m, t: m.geonorm(t))
def flat_post():
    """Four Post-Norm steps written flat (no block modules, no final norm): each norm's output is read by
    the next step as its ``x`` (steps 1-3), and the last step's earlier steps are all post sites: 4 post
    sites, grouped two per block; the last norm is not a final norm."""
    return Flat("post", 4)


@case("flat-pre-then-tail-norm", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("final", why="final norm")])
def flat_pre_tail():
    """Four flat Pre-Norm sites, then ``final(x + tail(x))``: in a flat graph a post site needs a
    consistent stream; the final norm's output goes to the head and the earlier steps are pre sites, so
    it is not a post site (skipped); 4 pre sites."""
    return Flat("pre+tail", 4)
