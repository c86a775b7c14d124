"""Small building blocks shared by the corpus: branches (token mixers, MLPs, attention), the usual
residual blocks with a hand-written ``geonorm(x, k)`` (the block after the rewrite), and a token model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import D, VOCAB, geo


def LN(d=D):
    return nn.LayerNorm(d)


def RMS(d=D):
    return nn.RMSNorm(d, eps=1e-6)


class Mix(nn.Module):
    """A causal token mixer (cumulative mean of a nonlinear projection): a real sequence-mixing branch
    that works at any sequence length."""

    def __init__(self, d=D, d_out=None):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.out = nn.Linear(d, d_out or d)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        n = torch.arange(1, h.shape[-2] + 1, device=h.device, dtype=h.dtype).unsqueeze(-1)
        return self.out(h.cumsum(-2) / n)


class MLP(nn.Module):
    def __init__(self, d=D, hidden=None, d_out=None):
        super().__init__()
        self.up = nn.Linear(d, hidden or 2 * d)
        self.down = nn.Linear(hidden or 2 * d, d_out or d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Attn(nn.Module):
    """Multi-head softmax attention over the tokens of ``x`` (or of ``mem`` for cross-attention), with an
    optional QK-norm over the head dim."""

    def __init__(self, d=D, heads=2, qk_norm=None):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.q_norm = qk_norm(self.dh) if qk_norm else None
        self.k_norm = qk_norm(self.dh) if qk_norm else None

    def forward(self, x, mem=None):
        kv = x if mem is None else mem
        B, T, S = x.shape[0], x.shape[1], kv.shape[1]
        q = self.q(x).reshape(B, T, self.h, self.dh).transpose(1, 2)
        k = self.k(kv).reshape(B, S, self.h, self.dh).transpose(1, 2)
        v = self.v(kv).reshape(B, S, self.h, self.dh).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        att = torch.softmax(q @ k.transpose(-1, -2) * self.dh ** -0.5, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(B, T, self.h * self.dh))


class Pre(nn.Module):
    """Pre-Norm block, two sites: ``x + mix(n1(x))``, ``x + mlp(n2(x))`` (``norm2``: another norm for n2)."""

    def __init__(self, d=D, norm=LN, mixer=Mix, norm2=None):
        super().__init__()
        self.n1, self.mix, self.n2, self.mlp = norm(d), mixer(d), (norm2 or norm)(d), MLP(d)

    def forward(self, x):
        x = x + self.mix(self.n1(x))
        return x + self.mlp(self.n2(x))

    def geonorm(self, x, k):
        x = geo(x, self.mix(self.n1(x)), k)
        return geo(x, self.mlp(self.n2(x)), k)


class LayerScaleBlock(nn.Module):
    """Pre-Norm block with LayerScale, two sites: ``x + g1 * mix(n1(x))``, ``x + mlp(n2(x)) * g2`` (per-channel
    gains drawn around ``init``)."""

    def __init__(self, d=D, init=0.3):
        super().__init__()
        self.n1, self.mix, self.g1 = LN(d), Mix(d), nn.Parameter(init + 0.1 * torch.randn(d))
        self.n2, self.mlp, self.g2 = LN(d), MLP(d), nn.Parameter(init + 0.1 * torch.randn(d))

    def forward(self, x):
        x = x + self.g1 * self.mix(self.n1(x))
        return x + self.mlp(self.n2(x)) * self.g2

    def geonorm(self, x, k):
        x = geo(x, self.g1 * self.mix(self.n1(x)), k)
        return geo(x, self.mlp(self.n2(x)) * self.g2, k)


class Pre1(nn.Module):
    """Pre-Norm block with one site: ``x + mlp(n(x))`` (mlp may be any branch)."""

    def __init__(self, d=D, norm=LN, branch=MLP):
        super().__init__()
        self.n, self.f = norm(d), branch(d)

    def forward(self, x):
        return x + self.f(self.n(x))

    def geonorm(self, x, k):
        return geo(x, self.f(self.n(x)), k)


class Post(nn.Module):
    """Post-Norm block, two sites: ``n1(x + mix(x))``, ``n2(x + mlp(x))``."""

    def __init__(self, d=D, norm=LN, mixer=Mix):
        super().__init__()
        self.mix, self.n1, self.mlp, self.n2 = mixer(d), norm(d), MLP(d), norm(d)

    def forward(self, x):
        x = self.n1(x + self.mix(x))
        return self.n2(x + self.mlp(x))

    def geonorm(self, x, k):
        x = geo(x, self.mix(x), k)
        return geo(x, self.mlp(x), k)


class NormFree(nn.Module):
    """``x + mix(x)`` then ``x + mlp(x)``: residual steps without any norm (not sites)."""

    def __init__(self, d=D):
        super().__init__()
        self.mix, self.mlp = Mix(d), MLP(d)

    def forward(self, x):
        x = x + self.mix(x)
        return x + self.mlp(x)


class ResPost(nn.Module):
    """Res-post-norm block (SwinV2 / Swin2SR; OLMo 2 with RMSNorm), two sites: ``x + n1(mix(x))``,
    ``x + n2(mlp(x))``."""

    def __init__(self, d=D, norm=LN):
        super().__init__()
        self.mix, self.n1, self.mlp, self.n2 = Mix(d), norm(d), MLP(d), norm(d)

    def forward(self, x):
        x = x + self.n1(self.mix(x))
        return x + self.n2(self.mlp(x))

    def geonorm(self, x, k):
        x = geo(x, self.n1(self.mix(x)), k)
        return geo(x, self.n2(self.mlp(x)), k)


# ---------------------------------------------------------------------------------------------------
# models written once as ``_run(*inputs, step)``: ``step(block, x, k, *context)`` applies block ``k``

def plain(block, x, k, *context):
    """A block as it is: ``block(x, *context)``."""
    return block(x, *context)


def rewritten(block, x, k, *context):
    """A block after the rewrite (the hand-written reference): ``block.geonorm(x, *context, k)``."""
    return block.geonorm(x, *context, k)


def stack(blocks, x, step, *context, k0=0):
    """Apply ``blocks`` in order to the stream ``x``, numbered from ``k0``."""
    for k, block in enumerate(blocks):
        x = step(block, x, k0 + k, *context)
    return x


class Stepped(nn.Module):
    """A model with one input whose computation is ``_run(t, step)``: ``forward`` runs its blocks as they
    are, ``geonorm`` (the float64 GeoNorm reference) runs their rewritten steps."""

    def forward(self, t):
        return self._run(t, plain)

    def geonorm(self, t):
        return self._run(t, rewritten)


class Stepped2(nn.Module):
    """As :class:`Stepped`, for a model with two inputs: ``_run(a, b, step)``."""

    def forward(self, a, b):
        return self._run(a, b, plain)

    def geonorm(self, a, b):
        return self._run(a, b, rewritten)


class LM(Stepped):
    """Embedding -> blocks (a ModuleList) -> optional final norm -> head."""

    def __init__(self, blocks, d=D, vocab=VOCAB, final=LN):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(blocks)
        self.final = final(d) if final else None
        self.head = nn.Linear(d, vocab)

    def _run(self, t, step):
        x = stack(self.blocks, self.embed(t), step)
        if self.final is not None:
            x = self.final(x)
        return self.head(x)


def lm_ref(m, t):
    return m.geonorm(t)
