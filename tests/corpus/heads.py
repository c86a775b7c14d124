"""Class 11: heads, gated residuals, LayerScale, parallel / sandwich / respost / post blocks, embedding norms,
QK-norms, norms over other dims, BatchNorm / GroupNorm, half precision, shared norms, position adds
(GEONORM.md section 4: the table of kinds, the "Not sites" list, and the soundness decisions)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import D, SHAPES, VOCAB, Kept, S, case, geo, randn, token_inputs
from .blocks import LM, LN, MLP, RMS, Attn, LayerScaleBlock, Mix, Post, Pre, Pre1, ResPost, Stepped, lm_ref, stack


# ---------------------------------------------------------------- pooling heads

class AttnPoolHead(nn.Module):
    """A learned query attends over the tokens, then ``h + mlp(LN(h))``."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(0.5 * torch.randn(1, 1, D))
        self.attn, self.norm, self.mlp, self.out = Attn(), LN(), MLP(), nn.Linear(D, 7)

    def forward(self, x):
        h = self.attn(self.query.expand(x.shape[0], -1, -1), x)
        h = h + self.mlp(self.norm(h))
        return self.out(h[:, 0])


class SigLIPMAPHead(nn.Module):
    """SigLIP's multihead-attention pooling head (nn.MultiheadAttention, residual named as in HF)."""

    def __init__(self):
        super().__init__()
        self.probe = nn.Parameter(0.5 * torch.randn(1, 1, D))
        self.attention = nn.MultiheadAttention(D, 2, batch_first=True)
        self.layernorm, self.mlp = LN(), MLP()

    def forward(self, hidden_state):
        probe = self.probe.repeat(hidden_state.shape[0], 1, 1)
        hidden_state = self.attention(probe, hidden_state, hidden_state, need_weights=False)[0]
        residual = hidden_state
        hidden_state = self.layernorm(hidden_state)
        hidden_state = residual + self.mlp(hidden_state)
        return hidden_state[:, 0]


class PooledModel(Stepped):
    def __init__(self, head):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Pre(), Pre()])
        self.final = LN()
        self.pool = head

    def _run(self, t, step):
        return self.pool(self.final(stack(self.blocks, self.embed(t), step)))


@case("pooling-head-attn-mlp", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm"), Kept("pool.norm", why="norm inside a pooling head")])
def pooling_head():
    """Pre blocks, a final norm, then an attention-pooling head with ``h + mlp(LN(h))``: the head's add
    reads like a pre site, but a norm inside a head or pooling head is not a site: the blocks' 4 pre
    sites only."""
    return PooledModel(AttnPoolHead())


@case("siglip-map-head", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="post_layernorm"), Kept("pool.layernorm", why="MAP head norm")])
def siglip_head():
    """SigLIP's MAP head (probe, nn.MultiheadAttention, ``residual + mlp(layernorm(h))``) after pre blocks
    and the post_layernorm: named in the spec as not a site: 4 pre sites only."""
    return PooledModel(SigLIPMAPHead())


# ---------------------------------------------------------------- gated / scaled branches

class Highway(nn.Module):
    def __init__(self):
        super().__init__()
        self.n, self.f, self.gate = LN(), MLP(), nn.Linear(D, D)

    def forward(self, x):
        g = torch.sigmoid(self.gate(x))
        return g * x + (1 - g) * self.f(self.n(x))


@case("highway-gated", sites=[], inputs=token_inputs(),
      kept=[Kept("blocks.0.n", why="gated residual: abstain"), Kept("blocks.1.n", why="gated residual: abstain"),
            Kept("final", why="final norm")])
def highway():
    """Highway / gated residual ``g*x + (1-g)*f(N(x))`` with a data-dependent gate: the stream step is not
    ``x + s`` nor ``a*x + s`` with ``a`` a number or learned scalar/vector (the kept skip scales of the
    spec), so the evidence is incomplete: abstain, 0 sites, the norms skipped."""
    return LM([Highway(), Highway()])


@case("layerscale-pre", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def layerscale():
    """LayerScale ``x + gamma * f(N(x))`` (and ``f(N(x)) * gamma``): gamma is part of the update ``s``:
    4 pre sites, ``Geo(x, gamma * f(N(x)))``."""
    return LM([LayerScaleBlock(), LayerScaleBlock()])


# ---------------------------------------------------------------- parallel, sandwich, respost, post

class Parallel(nn.Module):
    """``assoc``: "gptj" (one shared norm, ``x + attn(h) + mlp(h)``), "right" ``x + (a + b)``, "first"
    ``(a + b) + x`` (two norms)."""

    def __init__(self, assoc):
        super().__init__()
        self.assoc = assoc
        self.ln1, self.attn, self.mlp = LN(), Mix(), MLP()
        self.ln2 = LN() if assoc != "gptj" else None

    def _ab(self, x):
        h = self.ln1(x)
        return self.attn(h), self.mlp(h if self.ln2 is None else self.ln2(x))

    def forward(self, x):
        a, b = self._ab(x)
        if self.assoc == "gptj":
            return x + a + b
        if self.assoc == "right":
            return x + (a + b)
        return (a + b) + x

    def geonorm(self, x, k):
        a, b = self._ab(x)
        return geo(x, a + b, k)


@case("parallel-gptj-shared-norm", sites=S("parallel", 0, 0, 1), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def parallel_gptj():
    """GPT-J ``x + attn(ln(x)) + mlp(ln(x))`` with one shared norm: one parallel site per block,
    ``Geo(x, attn + mlp)``."""
    return LM([Parallel("gptj"), Parallel("gptj")])


@case("parallel-neox-right-assoc", sites=S("parallel", 0, 0, 1), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def parallel_right():
    """GPT-NeoX ``x + (attn(ln1(x)) + mlp(ln2(x)))``: parallel sites in any association."""
    return LM([Parallel("right"), Parallel("right")])


class Sandwich(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm, self.attn, self.post_attention_layernorm = RMS(), Mix(), RMS()
        self.pre_feedforward_layernorm, self.mlp, self.post_feedforward_layernorm = RMS(), MLP(), RMS()

    def forward(self, x):
        x = x + self.post_attention_layernorm(self.attn(self.input_layernorm(x)))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def geonorm(self, x, k):
        x = geo(x, self.post_attention_layernorm(self.attn(self.input_layernorm(x))), k)
        return geo(x, self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), k)


@case("sandwich-gemma2", sites=S("sandwich", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def sandwich():
    """Gemma 2 ``x + N2(attn(N1(x)))``: 4 sandwich sites, both norms kept in the update."""
    return LM([Sandwich(), Sandwich()], final=RMS)


@case("respost-olmo2", sites=S("respost", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def respost():
    """OLMo 2 ``x + N(attn(x))``: 4 respost sites, the norms kept in the update."""
    return LM([ResPost(norm=RMS), ResPost(norm=RMS)], final=RMS)


class Bert(Stepped):
    def __init__(self, final=False):
        super().__init__()
        self.word, self.position, self.token_type = nn.Embedding(VOCAB, D), nn.Embedding(16, D), nn.Embedding(2, D)
        self.emb_norm = LN()
        self.layers = nn.ModuleList([Post(), Post()])
        self.final = LN() if final else None
        self.pooler = nn.Linear(D, D)
        self.cls = nn.Linear(D, VOCAB)

    def _run(self, t, step):
        pos = torch.arange(t.shape[1], device=t.device)
        x = self.emb_norm(self.word(t) + self.position(pos) + self.token_type(torch.zeros_like(t)))
        x = stack(self.layers, x, step)
        if self.final is not None:
            x = self.final(x)
        return self.cls(x), torch.tanh(self.pooler(x[:, 0]))


@case("post-bert-embnorm", sites=S("post", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("emb_norm", why="embedding norm")])
def bert():
    """BERT-like: word + position + token-type embeddings, an embedding norm (not a site), Post-Norm
    blocks (4 post sites, norms removed), a token head and a pooler (a tuple output)."""
    return Bert()


@case("post-then-final-norm", sites=S("post", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("emb_norm", why="embedding norm"), Kept("final", why="final norm")])
def post_final():
    """Post-Norm blocks followed by a final norm: the blocks' last post norm is still a post site (it is a
    block's step), the norm after the blocks is a final norm (skipped)."""
    return Bert(final=True)


class Wav2Vec2Like(Stepped):
    """Feature projection, ``layer_norm(x + pos_conv(x))`` (the encoder norm), Post-Norm layers."""

    def __init__(self):
        super().__init__()
        self.feature_projection = nn.Linear(8, D)
        self.pos_conv = nn.Conv1d(D, D, 3, padding=1, groups=2)
        self.layer_norm = LN()
        self.layers = nn.ModuleList([Post(), Post()])
        self.out = nn.Linear(D, 5)

    def _run(self, feats, step):
        x = self.feature_projection(feats)
        x = self.layer_norm(x + F.gelu(self.pos_conv(x.transpose(1, 2))).transpose(1, 2))
        return self.out(stack(self.layers, x, step))


@case("wav2vec2-encoder-norm", sites=S("post", 0, 0, 1, per=2),
      inputs=lambda: [(randn(b, t, 8),) for b, t in SHAPES], ref=lm_ref,
      kept=[Kept("layer_norm", why="position norm before the blocks")])
def wav2vec2():
    """wav2vec2's encoder norm ``N(e + pos_conv(e))`` literally reads ``x + f(x)`` but is an embedding /
    position norm outside the blocks (named in the spec): not a site; the Post-Norm layers' 4 post sites."""
    return Wav2Vec2Like()


class ClipVision(Stepped):
    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(6, D)
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, D))
        self.pos = nn.Parameter(0.5 * torch.randn(1, 16, D))
        self.pre_layrnorm = LN()
        self.layers = nn.ModuleList([Pre(mixer=Attn), Pre(mixer=Attn)])
        self.post_layernorm = LN()
        self.proj = nn.Linear(D, 5)

    def _run(self, patches, step):
        x = self.patch(patches)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pre_layrnorm(x + self.pos[:, : x.shape[1]])
        return self.proj(self.post_layernorm(stack(self.layers, x, step)[:, 0]))


@case("clip-pre-layrnorm", sites=S("pre", 0, 0, 1, per=2), inputs=lambda: [(randn(b, t, 6),) for b, t in SHAPES],
      ref=lm_ref, kept=[Kept("pre_layrnorm", why="embedding norm"), Kept("post_layernorm", why="final norm")])
def clip():
    """CLIP vision: class token, position add, ``pre_layrnorm`` (an embedding norm), Pre-Norm layers (4 pre
    sites), ``post_layernorm`` on the class token (a final norm)."""
    return ClipVision()


# ---------------------------------------------------------------- norms that are never sites

@case("qknorm-inside-attn", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept(f"blocks.{i}.mix.{n}", why="QK-norm") for i in range(2) for n in ("q_norm", "k_norm")]
      + [Kept("final", why="final norm")])
def qk_norm():
    """QK-norm (RMSNorm over the head dim of q and k) inside attention: a norm over the last dim that is
    off the stream: skipped; the 4 pre sites around it."""
    return LM([Pre(mixer=lambda d: Attn(d, qk_norm=RMS)), Pre(mixer=lambda d: Attn(d, qk_norm=RMS))])


class TwoDimNorm(nn.Module):
    def forward(self, x):
        return F.layer_norm(x, x.shape[-2:])


class TokenNormalize(nn.Module):
    _norm_like = True

    def __init__(self, d=D):
        super().__init__()
        self.g = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.g


@case("norm-over-last-two-dims-post", sites=[], inputs=token_inputs(),
      kept=[Kept(f"blocks.{i}.{n}", params=(), why="norm over (seq, d)") for i in range(2) for n in ("n1", "n2")])
def two_dim_post():
    """``F.layer_norm(h, h.shape[-2:])`` (over tokens and features) in post position: a norm over a
    dimension other than the last is not a site: 0 sites, skipped."""
    return LM([Post(norm=lambda d: TwoDimNorm()), Post(norm=lambda d: TwoDimNorm())], final=None)


@case("fnormalize-over-tokens-pre", sites=[], inputs=token_inputs(),
      kept=[Kept(f"blocks.{i}.{n}", why="normalizes over the tokens") for i in range(2) for n in ("n1", "n2")])
def token_normalize_pre():
    """``F.normalize(x, dim=1) * g`` (over the tokens, not the features) in pre position: not a site, 0
    sites, every one skipped."""
    return LM([Pre(norm=TokenNormalize), Pre(norm=TokenNormalize)], final=None)


class ConvResBlock(nn.Module):
    """Channels-first ResNet-style residual blocks: pre-activation ``x + conv(relu(BN(x)))`` and post
    ``relu(BN(x + conv(x)))`` (or with GroupNorm)."""

    def __init__(self, norm):
        super().__init__()
        self.n1, self.conv1 = norm(), nn.Conv1d(D, D, 3, padding=1)
        self.conv2, self.n2 = nn.Conv1d(D, D, 1), norm()

    def forward(self, x):
        x = x + self.conv1(F.relu(self.n1(x)))
        return F.relu(self.n2(x + self.conv2(x)))


class ConvNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([ConvResBlock(norm), ConvResBlock(norm)])
        self.head = nn.Linear(D, VOCAB)

    def forward(self, t):
        x = self.embed(t).transpose(1, 2)
        for b in self.blocks:
            x = b(x)
        return self.head(x.transpose(1, 2))


_CONV_KEPT = [Kept(f"blocks.{i}.{n}", why="BatchNorm/GroupNorm") for i in range(2) for n in ("n1", "n2")]


@case("batchnorm-resblocks", sites=[], inputs=token_inputs(), kept=_CONV_KEPT)
def batchnorm():
    """ResNet-style residual blocks with BatchNorm (pre-activation ``x + conv(relu(BN(x)))`` and post
    ``relu(BN(x + conv(x)))``): BatchNorm is never a site: 0 sites, every BN listed as skipped."""
    return ConvNet(lambda: nn.BatchNorm1d(D))


@case("groupnorm-resblocks", sites=[], inputs=token_inputs(), kept=_CONV_KEPT)
def groupnorm():
    """As batchnorm-resblocks with GroupNorm(2, C): 0 sites, every GroupNorm skipped."""
    return ConvNet(lambda: nn.GroupNorm(2, D))


# ---------------------------------------------------------------- half precision

@case("fp16-prenorm", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref, kept=[Kept("final", why="final norm")],
      dtype=torch.float16, rel_tol=1e-2)
def fp16():
    """A float16 Pre-Norm model (one block with Hugging Face Llama's float32-upcast RMSNorm): the same 4 pre
    sites; the geodesic is computed in float32 and cast back (section 2): compared with the float64
    reference within float16 accuracy."""
    from .spellings import LlamaRMS
    return LM([Pre(norm=LlamaRMS), Pre()])


@case("bf16-postnorm", sites=S("post", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      dtype=torch.bfloat16, rel_tol=4e-2)
def bf16():
    """A bfloat16 Post-Norm model: 4 post sites; compared with the float64 reference within bfloat16
    accuracy."""
    return LM([Post(), Post(norm=RMS)], final=None)


# ---------------------------------------------------------------- shared norms

class SharedNorm(nn.Module):
    """``kind``: "pre" (one norm module for both pre sites) or "post-pre" (``x = N(x + mix(x))``, then
    ``x + mlp(N(x))`` with the same N)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.norm, self.mix, self.mlp = LN(), Mix(), MLP()

    def forward(self, x):
        if self.kind == "pre":
            x = x + self.mix(self.norm(x))
        else:
            x = self.norm(x + self.mix(x))
        return x + self.mlp(self.norm(x))

    def geonorm(self, x, k):
        x = geo(x, self.mix(self.norm(x)) if self.kind == "pre" else self.mix(x), k)
        return geo(x, self.mlp(self.norm(x)), k)


@case("same-norm-twice-pre", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def same_norm_pre():
    """One norm module called twice in a block (both pre sites): 4 pre sites, the norm kept."""
    return LM([SharedNorm("pre"), SharedNorm("pre")])


@case("same-norm-post-then-pre", sites=[("post", 0, 0), ("pre", 0, 0), ("post", 0, 1), ("pre", 0, 1)],
      inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm"), Kept("blocks.0.norm", why="still the pre site's norm", listed=False),
            Kept("blocks.1.norm", why="still the pre site's norm", listed=False)])
def same_norm_post_pre():
    """One norm module used as a post norm ``x = N(x + mix(x))`` and then as the branch-input norm of
    ``x + mlp(N(x))``: a post site (that call removed) and a pre site (that call kept): the module's
    weights must stay in the converted model, the pre branch still uses them."""
    return LM([SharedNorm("post-pre"), SharedNorm("post-pre")])


# ---------------------------------------------------------------- adds that are not residual

class PosInBlock(nn.Module):
    """``normed``: False: ``x = x + pos[:, :T]`` (a parameter slice); True: ``x = x + pnorm(pos(arange(T)))``;
    then a pre site."""

    def __init__(self, normed):
        super().__init__()
        self.normed = normed
        if normed:
            self.pos, self.pnorm = nn.Embedding(16, D), LN()
        else:
            self.pos = nn.Parameter(0.5 * torch.randn(1, 16, D))
        self.n, self.f = LN(), MLP()

    def _pos(self, x):
        if self.normed:
            return self.pnorm(self.pos(torch.arange(x.shape[1], device=x.device)))
        return self.pos[:, : x.shape[1]]

    def forward(self, x):
        x = x + self._pos(x)
        return x + self.f(self.n(x))

    def geonorm(self, x, k):
        x = x + self._pos(x)
        return geo(x, self.f(self.n(x)), k)


@case("normed-position-add-in-block", sites=S("pre", 0, 0, 1), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm"), Kept("blocks.0.pnorm", why="position norm"), Kept("blocks.1.pnorm", why="position norm")])
def normed_pos_add():
    """Each block adds ``N(pos(arange(T)))``: it reads like a respost site ``x + N(f(x))`` but the branch
    does not depend on ``x`` (a position add): not a site, the norm skipped; 2 pre sites."""
    return LM([PosInBlock(True), PosInBlock(True)])


class HFStyle(nn.Module):
    """Hugging Face style: ``residual = x``; norm on a float32 cast; dropout (eval); clone; ``residual + h``."""

    def __init__(self):
        super().__init__()
        self.input_layernorm, self.attn, self.drop = LN(), Mix(), nn.Dropout(0.1)
        self.post_attention_layernorm, self.mlp = RMS(), MLP()

    def forward(self, x):
        residual = x
        h = self.input_layernorm(x.to(torch.float32)).type_as(x)
        h = self.drop(self.attn(h))
        x = residual.clone() + h
        residual = x
        h = self.mlp(self.post_attention_layernorm(x.contiguous()))
        return residual + self.drop(h)

    def geonorm(self, x, k):
        x = geo(x, self.attn(self.input_layernorm(x)), k)
        return geo(x, self.mlp(self.post_attention_layernorm(x)), k)


@case("hf-clone-cast-dropout-pre", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def hf_style():
    """Casts, eval-mode dropout, clones and aliases between the residual and the norm are seen through:
    4 pre sites."""
    return LM([HFStyle(), HFStyle()])


class HiddenStates(LM):
    def _run(self, t, step):
        hs = [self.embed(t)]
        for k, b in enumerate(self.blocks):
            hs.append(step(b, hs[-1], k))
        return self.head(self.final(hs[-1])), tuple(hs)


@case("all-hidden-states-output", sites=S("pre", 0, 0, per=2) + S("pre", 0, 1), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def hidden_states():
    """The model also returns every hidden state (HF ``output_hidden_states``): the states the sites
    produce are outputs too; 3 pre sites (a two-site and a one-site block), the output structure kept."""
    return HiddenStates([Pre(), Pre1()])


@case("batchnorm-train-mode", sites=[], inputs=token_inputs(), kept=_CONV_KEPT, train=True)
def batchnorm_train():
    """BatchNorm residual blocks converted in train mode: 0 sites in both modes, the BNs skipped; the
    converted module computes the source's function in train mode (batch statistics) and, having seen the
    same batches, in eval mode (running statistics); the source's buffers are not touched by convert."""
    return ConvNet(lambda: nn.BatchNorm1d(D))


class DictOut(LM):
    def _run(self, t, step):
        x = stack(self.blocks, self.embed(t), step)
        return {"logits": self.head(self.final(x)), "last_hidden_state": x}


@case("dict-output-pre", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref, kept=[Kept("final", why="final norm")])
def dict_output():
    """A model returning a dict with the logits and the last (pre-final-norm) hidden state: 4 pre sites, the
    output structure kept."""
    return DictOut([Pre(), Pre()])
