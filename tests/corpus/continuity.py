"""Class 4 (continued): one stream through ops between the blocks that are neither norms nor feature-size
changes (GEONORM.md section 4: "A new stream starts at a norm-only boundary: where every path from the old
stream to the new one passes through a norm or changes the feature size"; otherwise the stream, its block
numbering and its decays continue)."""
from __future__ import annotations

import torch
from torch import nn

from . import D, VOCAB, Kept, S, case, token_inputs
from .blocks import LN, Pre, Stepped


class Between(Stepped):
    """Three Pre-Norm blocks with ``op`` applied to the stream between consecutive blocks."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Pre(), Pre(), Pre()])
        self.reg = nn.Parameter(torch.randn(1, 1, D))
        self.final = LN()
        self.head = nn.Linear(D, VOCAB)

    def _between(self, x, t, k):
        if self.op == "register":          # prepend a learned register token after block 0
            return torch.cat([self.reg.expand(x.shape[0], -1, -1), x], dim=1) if k == 0 else x
        if self.op == "roll":              # shift the tokens by one (a Swin-style cyclic shift)
            return torch.roll(x, shifts=1 if k % 2 == 0 else -1, dims=1)
        if self.op == "gather":            # token pruning: keep the T-1 tokens of largest norm
            idx = x.norm(dim=-1).argsort(dim=1, descending=True)[:, : x.shape[1] - 1]
            return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])) if k == 0 else x
        mask = (t != 0).unsqueeze(-1)      # "where": zero the padded tokens' state
        return torch.where(mask, x, torch.zeros_like(x))

    def _run(self, t, step):
        x = self.embed(t)
        for k, b in enumerate(self.blocks):
            x = step(b, x, k)
            if k < len(self.blocks) - 1:
                x = self._between(x, t, k)
        return self.head(self.final(x.mean(1)))


_SITES = S("pre", 0, 0, 1, 2, per=2)


@case("register-token-cat-between-blocks", sites=_SITES, inputs=token_inputs(), ref=lambda m, t: m.geonorm(t),
      kept=[Kept("final", why="final norm")])
def register():
    """A register token concatenated to the stream after block 0 (``cat`` along the tokens keeps the
    feature size, no norm): one stream, blocks 0, 1, 2."""
    return Between("register")


@case("rolled-stream-between-blocks", sites=_SITES, inputs=token_inputs(), ref=lambda m, t: m.geonorm(t),
      kept=[Kept("final", why="final norm")])
def rolled():
    """The stream cyclically shifted along the tokens between blocks (``torch.roll``): one stream,
    blocks 0, 1, 2."""
    return Between("roll")


@case("token-pruning-gather", sites=_SITES, inputs=token_inputs(), ref=lambda m, t: m.geonorm(t),
      kept=[Kept("final", why="final norm")])
def pruned():
    """Token pruning between blocks (``gather`` of the tokens with the largest norm): the feature size is
    kept and no norm is passed: one stream, blocks 0, 1, 2."""
    return Between("gather")


def _padded():
    from . import SHAPES, tokens
    out = []
    for b, t in SHAPES:
        tok = tokens(b, t)
        tok[:, -1] = 0
        out.append((tok,))
    return out


@case("where-mask-between-blocks", sites=_SITES, inputs=_padded, ref=lambda m, t: m.geonorm(t),
      kept=[Kept("final", why="final norm")])
def where_mask():
    """``torch.where(mask, x, 0)`` on the stream between blocks (padding): one stream, blocks 0, 1, 2; the
    zeroed tokens take the ``x + s`` fallback of the geodesic (section 2)."""
    return Between("where")
