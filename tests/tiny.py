"""Tiny hand-written models with known ground truth, shared by the tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORM_SPELLINGS = ("nn.LayerNorm", "F.layer_norm", "nn.RMSNorm", "F.rms_norm", "hand_rms", "t5_rms")


class FunctionalLayerNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.bias = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, 1e-5)


class FunctionalRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)


class HandRMSNorm(nn.Module):
    """Hugging Face Llama's RMSNorm: float32 upcast, pow/mean/add/rsqrt/mul, cast back, weight."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + self.eps)
        return self.weight * h.to(dtype)


class T5RMSNorm(nn.Module):
    """Hugging Face T5's LayerNorm: variance of the float32 cast, the product on the original."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def make_norm(spelling: str, d: int) -> nn.Module:
    if spelling == "nn.LayerNorm":
        norm = nn.LayerNorm(d)
        with torch.no_grad():
            norm.weight.add_(0.1 * torch.randn(d))
            norm.bias.add_(0.1 * torch.randn(d))
        return norm
    if spelling == "nn.RMSNorm":
        norm = nn.RMSNorm(d, eps=1e-6)
        with torch.no_grad():
            norm.weight.add_(0.1 * torch.randn(d))
        return norm
    return {"F.layer_norm": FunctionalLayerNorm, "F.rms_norm": FunctionalRMSNorm,
            "hand_rms": HandRMSNorm, "t5_rms": T5RMSNorm}[spelling](d)


def norm_kind(spelling: str) -> str:
    return "layer_norm" if "layer" in spelling.lower() else "rms_norm"


class Mixer(nn.Module):
    """A causal token mixer standing in for attention (a real sequence-mixing branch)."""

    def __init__(self, d, p=0.0):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.cumsum(h, dim=-2) / torch.arange(1, x.shape[-2] + 1, device=x.device).unsqueeze(-1)
        return self.drop(self.out(h))


class MLP(nn.Module):
    def __init__(self, d, p=0.0):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.drop(self.down(F.gelu(self.up(x))))


class PreNormBlock(nn.Module):
    def __init__(self, d, spelling="nn.LayerNorm", p=0.0):
        super().__init__()
        self.norm1, self.mix = make_norm(spelling, d), Mixer(d, p)
        self.norm2, self.mlp = make_norm(spelling, d), MLP(d, p)

    def forward(self, x):
        x = x + self.mix(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PostNormBlock(nn.Module):
    def __init__(self, d, spelling="nn.LayerNorm", p=0.0):
        super().__init__()
        self.mix, self.norm1 = Mixer(d, p), make_norm(spelling, d)
        self.mlp, self.norm2 = MLP(d, p), make_norm(spelling, d)

    def forward(self, x):
        x = self.norm1(x + self.mix(x))
        return self.norm2(x + self.mlp(x))


class TokenStack(nn.Module):
    """Embedding -> blocks -> optional final norm -> head; ``x`` is a (batch, seq) token tensor.
    ``make_blocks()`` builds the blocks (after the embedding, so weights come out the same order)."""

    def __init__(self, make_blocks, d, vocab, final_spelling=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(make_blocks())
        self.final = make_norm(final_spelling, d) if final_spelling else None
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        if self.final is not None:
            x = self.final(x)
        return self.head(x)


class Stack(TokenStack):
    """``depth`` copies of one block class, all with the same norm spelling."""

    def __init__(self, block_cls, depth=3, d=16, vocab=32, spelling="nn.LayerNorm", final_norm=True, p=0.0):
        super().__init__(lambda: [block_cls(d, spelling, p) for _ in range(depth)], d, vocab,
                         spelling if final_norm else None)


def tokens(batch=2, seq=6, vocab=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


class QKNormMixer(nn.Module):
    """Attention-like branch with a QK-norm and a norm over the last two dims inside it."""

    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.q_norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        q, k = self.q_norm(self.q(x)), self.k(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        h = att @ self.v(x)
        h = F.layer_norm(h, h.shape[-2:])  # over (seq, d): not a last-dim norm
        return self.out(h)


class OddNormsModel(nn.Module):
    """Token + position embeddings summed, an embedding norm, one Pre-Norm block whose mixer has a
    QK-norm and a 2-dim norm, a final norm, a head: exactly 2 sites and 4 skipped norms."""

    def __init__(self, d=16, vocab=32, seq=64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.emb_norm = nn.LayerNorm(d)
        self.norm1, self.mix = nn.LayerNorm(d), QKNormMixer(d)
        self.norm2, self.mlp = nn.RMSNorm(d), MLP(d)
        self.final = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.emb_norm(self.tok(tokens) + self.pos(pos))
        x = x + self.mix(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.final(x))


class FlatPreNorm(nn.Module):
    """Four Pre-Norm sites written in the model's own forward (no block modules to group by)."""

    def __init__(self, d=16):
        super().__init__()
        self.norms = nn.ModuleList(nn.RMSNorm(d) for _ in range(4))
        self.fs = nn.ModuleList(nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        x = x + self.fs[0](self.norms[0](x))
        x = x + self.fs[1](self.norms[1](x))
        x = x + self.fs[2](self.norms[2](x))
        return x + self.fs[3](self.norms[3](x))


def factory():
    """A ``module:factory`` spec for the CLI tests."""
    torch.manual_seed(0)
    return Stack(PreNormBlock, depth=2).eval(), (tokens(),)
