"""Class 9: stochastic depth between the branch and the add (GEONORM.md section 4: ``f`` is any subgraph;
CONTRACT.md: the result honours ``.train()`` / ``.eval()``; the sites must be the same in both modes).

The DropPath masks are drawn in float32 whatever the model dtype, so the float64 reference draws the same
masks after reseeding the RNG; train-mode outputs are compared with the RNG reseeded before each call."""
from __future__ import annotations

import torch
from torch import nn

from . import D, Kept, S, case, geo, token_inputs
from .blocks import LM, LN, MLP, RMS, Mix, lm_ref, stack


class DropPath(nn.Module):
    """``x * bernoulli(keep) / keep`` per sample in train mode, the identity in eval mode."""

    def __init__(self, p=0.3):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device).bernoulli_(keep)
        return x * mask.to(x.dtype) / keep


class DPBlock(nn.Module):
    """``kind``: "pre" ``x + dp(f(N(x)))``; "respost" ``x + dp(N(f(x)))`` (SwinV2); "layerscale"
    ``x + dp(gamma * f(N(x)))`` (CaiT / DeiT III)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.n1, self.mix, self.dp1 = LN(), Mix(), DropPath()
        self.n2, self.mlp, self.dp2 = RMS(), MLP(), DropPath()
        if kind == "layerscale":
            self.gamma1 = nn.Parameter(0.5 + 0.1 * torch.randn(D))
            self.gamma2 = nn.Parameter(0.5 + 0.1 * torch.randn(D))

    def _s(self, x, i):
        """The update of site ``i``: the branch ``mix`` (1) or ``mlp`` (2) with its norm ``n{i}``, DropPath
        ``dp{i}`` and, for "layerscale", gain ``gamma{i}``."""
        n, f, dp = getattr(self, f"n{i}"), (self.mix, self.mlp)[i - 1], getattr(self, f"dp{i}")
        if self.kind == "respost":
            return dp(n(f(x)))
        if self.kind == "layerscale":
            return dp(getattr(self, f"gamma{i}") * f(n(x)))
        return dp(f(n(x)))

    def forward(self, x):
        x = x + self._s(x, 1)
        return x + self._s(x, 2)

    def geonorm(self, x, k):
        x = geo(x, self._s(x, 1), k)
        return geo(x, self._s(x, 2), k)


@case("droppath-pre-train", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")], train=True, seed_calls=True)
def dp_pre_train():
    """Pre-Norm blocks ``x + drop_path(f(N(x)))`` converted in train mode: 4 pre sites (the same in
    train and eval mode: the conversion must succeed), the converted module stays in train mode, draws
    the same masks, and matches the reference in both modes."""
    return LM([DPBlock("pre"), DPBlock("pre")])


@case("droppath-respost-train", sites=S("respost", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")], train=True, seed_calls=True)
def dp_respost_train():
    """SwinV2 res-post-norm with stochastic depth after the branch-output norm, ``x + drop_path(N(f(x)))``,
    converted in train mode: 4 respost sites in both modes."""
    return LM([DPBlock("respost"), DPBlock("respost")])


class DropoutPost(nn.Module):
    """BERT-style Post-Norm block with hidden dropout on each branch: ``N(x + dropout(f(x)))``."""

    def __init__(self):
        super().__init__()
        self.mix, self.d1, self.n1 = Mix(), nn.Dropout(0.1), LN()
        self.mlp, self.d2, self.n2 = MLP(), nn.Dropout(0.1), LN()

    def forward(self, x):
        x = self.n1(x + self.d1(self.mix(x)))
        return self.n2(x + self.d2(self.mlp(x)))

    def geonorm(self, x, k):
        x = geo(x, self.d1(self.mix(x)), k)
        return geo(x, self.d2(self.mlp(x)), k)


class DropoutBert(LM):
    def __init__(self):
        super().__init__([DropoutPost(), DropoutPost()], final=None)
        self.emb_norm, self.emb_drop = LN(), nn.Dropout(0.1)

    def _run(self, t, step):
        return self.head(stack(self.blocks, self.emb_drop(self.emb_norm(self.embed(t))), step))


@case("dropout-train-bert-post", sites=S("post", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("emb_norm", why="embedding norm")], train=True, train_outputs=False)
def dropout_bert_train():
    """BERT-style Post-Norm blocks with hidden dropout (``N(x + dropout(f(x)))``) and embedding dropout,
    converted in train mode: the sites are the same in both modes (4 post sites); the converted module
    stays in train mode; outputs are compared after ``.eval()`` (nn.Dropout masks depend on the dtype)."""
    return DropoutBert()
