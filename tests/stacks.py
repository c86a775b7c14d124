"""Configurable stacks with every residual placement of GEONORM.md section 4, with their ground truth
(site kinds and counts) and a hand-written GeoNorm reference built from the same weights."""
from __future__ import annotations

from torch import nn

from .reference import reference_geodesic
from .tiny import MLP, Mixer, TokenStack, make_norm

PLACEMENTS = ("pre", "post", "sandwich", "respost", "parallel", "deepnorm")
ASSOCIATIONS = ("left", "right", "first")   # (x + a) + b, x + (a + b), (a + b) + x
NORMS_PER_PLACEMENT = {"pre": 2, "post": 2, "sandwich": 4, "respost": 2, "parallel": 2, "deepnorm": 2}


class Block(nn.Module):
    def __init__(self, d, placement="pre", spelling="nn.LayerNorm", p=0.0, assoc="left", shared=False, alpha=2.0):
        super().__init__()
        self.placement, self.assoc, self.shared, self.alpha = placement, assoc, shared, alpha
        count = 1 if placement == "parallel" and shared else NORMS_PER_PLACEMENT[placement]
        self.norms = nn.ModuleList(make_norm(spelling, d) for _ in range(count))
        self.mix, self.mlp = Mixer(d, p), MLP(d, p)

    @property
    def n_sites(self) -> int:
        return 1 if self.placement == "parallel" else 2

    def _parallel_norms(self):
        return self.norms[0], self.norms[0 if self.shared else 1]

    def forward(self, x):
        n, kind = self.norms, self.placement
        if kind == "pre":
            x = x + self.mix(n[0](x))
            return x + self.mlp(n[1](x))
        if kind == "post":
            x = n[0](x + self.mix(x))
            return n[1](x + self.mlp(x))
        if kind == "sandwich":
            x = x + n[1](self.mix(n[0](x)))
            return x + n[3](self.mlp(n[2](x)))
        if kind == "respost":
            x = x + n[0](self.mix(x))
            return x + n[1](self.mlp(x))
        if kind == "deepnorm":
            x = n[0](x * self.alpha + self.mix(x))
            return n[1](x * self.alpha + self.mlp(x))
        na, nb = self._parallel_norms()
        a, b = self.mix(na(x)), self.mlp(nb(x))
        if self.assoc == "left":
            return (x + a) + b
        if self.assoc == "right":
            return x + (a + b)
        return (a + b) + x

    def geonorm(self, x, decay, clamp):
        """The block after the rewrite of GEONORM.md section 4."""
        n, kind = self.norms, self.placement

        def geo(state, s):
            return reference_geodesic(state, s, decay, clamp)
        if kind == "pre":
            x = geo(x, self.mix(n[0](x)))
            return geo(x, self.mlp(n[1](x)))
        if kind in ("post", "deepnorm"):
            x = geo(x, self.mix(x))
            return geo(x, self.mlp(x))
        if kind == "sandwich":
            x = geo(x, n[1](self.mix(n[0](x))))
            return geo(x, n[3](self.mlp(n[2](x))))
        if kind == "respost":
            x = geo(x, n[0](self.mix(x)))
            return geo(x, n[1](self.mlp(x)))
        na, nb = self._parallel_norms()
        return geo(x, self.mix(na(x)) + self.mlp(nb(x)))


class MixedStack(TokenStack):
    """Embedding -> one Block per placement -> optional final norm -> head."""

    def __init__(self, placements, d=16, vocab=32, spelling="nn.LayerNorm", final_norm=True, p=0.0,
                 assoc="left", shared=False, spellings=None):
        spellings = spellings or [spelling] * len(placements)
        super().__init__(lambda: [Block(d, pl, sp, p, assoc, shared) for pl, sp in zip(placements, spellings)],
                         d, vocab, spellings[-1] if final_norm else None)

    def expected_counts(self, kinds=None) -> dict:
        out: dict = {}
        for b in self.blocks:
            if kinds is None or b.placement in kinds:
                out[b.placement] = out.get(b.placement, 0) + b.n_sites
        return out

    def geonorm_forward(self, tokens, decays, clamp, kinds=None):
        x = self.embed(tokens)
        for k, block in enumerate(self.blocks):
            x = block.geonorm(x, decays[k], clamp) if kinds is None or block.placement in kinds else block(x)
        if self.final is not None:
            x = self.final(x)
        return self.head(x)
