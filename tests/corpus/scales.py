"""Class 10: scales on the skip (GEONORM.md section 4, "Decision (soundness)": a scale on the skip of a site
that is not DeepNorm, ``a*x + f(N(x))`` with ``a`` a number, a learned scalar or a per-channel vector, is
kept: the update's ``x`` is ``a*x``; only DeepNorm's ``a`` inside ``N(a*x + f(x))`` is removed with its
norm)."""
from __future__ import annotations

import torch
from torch import nn

from . import D, Kept, S, case, geo, token_inputs
from .blocks import LM, LN, MLP, RMS, Mix, Post, lm_ref


class Scale(nn.Module):
    """timm MetaFormer's ``Scale``: ``x * scale`` with a per-channel learned scale."""

    def __init__(self, d=D):
        super().__init__()
        self.scale = nn.Parameter(1.0 + 0.3 * torch.randn(d))

    def forward(self, x):
        return x * self.scale


class MetaFormerBlock(nn.Module):
    """``x = res_scale1(x) + token_mixer(norm1(x))``; ``x = res_scale2(x) + mlp(norm2(x))``."""

    def __init__(self):
        super().__init__()
        self.norm1, self.token_mixer, self.res_scale1 = LN(), Mix(), Scale()
        self.norm2, self.mlp, self.res_scale2 = LN(), MLP(), Scale()

    def forward(self, x):
        x = self.res_scale1(x) + self.token_mixer(self.norm1(x))
        return self.res_scale2(x) + self.mlp(self.norm2(x))

    def geonorm(self, x, k):
        x = geo(self.res_scale1(x), self.token_mixer(self.norm1(x)), k)
        return geo(self.res_scale2(x), self.mlp(self.norm2(x)), k)


def _scale_params(names, n=2):
    return [Kept(f"blocks.{i}.{name}", why="skip scale kept", listed=False) for i in range(n) for name in names]


@case("res-scale-per-channel", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")] + _scale_params(("res_scale1", "res_scale2")))
def res_scale_vector():
    """timm MetaFormer ``res_scale(x) + mixer(norm(x))`` with a per-channel learned scale: 4 pre sites whose
    update is ``Geo(a*x, f(N(x)))``; the scales stay (in the state_dict, unchanged)."""
    return LM([MetaFormerBlock(), MetaFormerBlock()])


class ScalarSkip(nn.Module):
    """``a * x + f(N(x))`` with ``a`` a learned scalar (``"param"``) or a constant (``"const"``)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.n1, self.mix, self.n2, self.mlp = LN(), Mix(), RMS(), MLP()
        if kind == "param":
            self.a = nn.Parameter(torch.tensor(0.8))

    def _a(self, x):
        return self.a * x if self.kind == "param" else x * 0.7

    def forward(self, x):
        x = self._a(x) + self.mix(self.n1(x))
        return self._a(x) + self.mlp(self.n2(x))

    def geonorm(self, x, k):
        x = geo(self._a(x), self.mix(self.n1(x)), k)
        return geo(self._a(x), self.mlp(self.n2(x)), k)


@case("res-scale-scalar-param", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm"), Kept("blocks.0", params=("blocks.0.a",), why="skip scale kept", listed=False),
            Kept("blocks.1", params=("blocks.1.a",), why="skip scale kept", listed=False)])
def res_scale_scalar():
    """``a * x + f(N(x))`` with a learned scalar ``a``: 4 pre sites, update ``Geo(a*x, f(N(x)))``; ``a``
    kept in the converted state_dict."""
    return LM([ScalarSkip("param"), ScalarSkip("param")])


@case("res-scale-constant", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def res_scale_const():
    """``x * 0.7 + f(N(x))`` with a constant: not DeepNorm (no norm after the sum), so the scale is kept:
    4 pre sites, update ``Geo(0.7*x, f(N(x)))``."""
    return LM([ScalarSkip("const"), ScalarSkip("const")])


class XResidual(nn.Module):
    """x-transformers ``Residual(scale_residual=True)``: ``out + residual * residual_scale``."""

    def __init__(self):
        super().__init__()
        self.residual_scale = nn.Parameter(1.0 + 0.3 * torch.randn(D))

    def forward(self, out, residual):
        residual = residual * self.residual_scale
        return out + residual


class XBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn, self.res1 = LN(), Mix(), XResidual()
        self.norm2, self.ff, self.res2 = LN(), MLP(), XResidual()

    def forward(self, x):
        residual = x
        x = self.res1(self.attn(self.norm1(x)), residual)
        residual = x
        return self.res2(self.ff(self.norm2(x)), residual)

    def geonorm(self, x, k, k2=None):
        x = geo(x * self.res1.residual_scale, self.attn(self.norm1(x)), k)
        return geo(x * self.res2.residual_scale, self.ff(self.norm2(x)), k if k2 is None else k2)


def _xscale_per_residual_ref(m, t):
    """The other grouping: each Residual module a block (blocks 0, 1, 2, 3)."""
    x = m.embed(t)
    for k, b in enumerate(m.blocks):
        x = b.geonorm(x, 2 * k, 2 * k + 1)
    return m.head(m.final(x))


@case("xtransformers-scale-residual", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      alt_sites=[(S("pre", 0, 0, 1, 2, 3), _xscale_per_residual_ref)],
      kept=[Kept("final", why="final norm")] + _scale_params(("res1", "res2")))
def xscale_residual():
    """x-transformers ``scale_residual``: the add is ``branch + residual * scale`` inside a Residual
    module: 4 pre sites, update ``Geo(scale*x, f(N(x)))``, the scales kept. Grouping: the blocks are the
    ModuleList elements (blocks 0, 0, 1, 1); since the two Residual modules of a block are also "several
    invocations of one class under one parent", the grouping 0, 1, 2, 3 (with its decays) is accepted too."""
    return LM([XBlock(), XBlock()])


class DeepNormBlock(Post):
    """``N(x * alpha + f(x))`` (``order="skip-first"``) or ``N(f(x) + alpha * x)``; the reference is the
    Post-Norm one, ``Geo(x, f(x))``."""

    def __init__(self, alpha, norm=LN, order="skip-first"):
        super().__init__(norm=norm)
        self.alpha, self.order = alpha, order

    def _sum(self, x, s):
        return x * self.alpha + s if self.order == "skip-first" else s + self.alpha * x

    def forward(self, x):
        x = self.n1(self._sum(x, self.mix(x)))
        return self.n2(self._sum(x, self.mlp(x)))


@case("deepnorm-constant", sites=S("deepnorm", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref)
def deepnorm_const():
    """DeepNet ``N(x * alpha + f(x))`` with alpha = (2L)^(1/4): 4 deepnorm sites, ``Geo(x, f(x))`` (the norm
    and alpha removed)."""
    return LM([DeepNormBlock((2 * 2) ** 0.25), DeepNormBlock((2 * 2) ** 0.25)], final=None)


@case("deepnorm-rms-branch-first", sites=S("deepnorm", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref)
def deepnorm_rms():
    """DeepNorm written ``N(f(x) + alpha * x)`` with RMSNorm: 4 deepnorm sites, ``Geo(x, f(x))``."""
    return LM([DeepNormBlock(1.9, RMS, "branch-first"), DeepNormBlock(1.9, RMS, "branch-first")], final=None)


class LearnedAlphaDeepNorm(DeepNormBlock):
    def __init__(self):
        super().__init__(1.0)
        self.alpha = nn.Parameter(torch.tensor(1.6))


@case("deepnorm-learned-alpha", sites=S("deepnorm", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      abstain=True, abstain_kept=[Kept(f"blocks.{i}.{n}", why="skipped when abstaining") for i in range(2) for n in ("n1", "n2")])
def deepnorm_learned():
    """Abstain allowed. DeepNorm ``N(alpha * x + f(x))`` with ``alpha`` a learned scalar: the table's
    ``N(a*x + f(x))`` reads as a deepnorm site (``Geo(x, f(x))``, the norm and ``alpha`` removed), but
    DeepNet's ``a`` is a constant and removing a learned parameter is not forced by the spec: the norms
    may instead be skipped (nothing rewritten). Never ``Geo(alpha*x, f(x))`` with the norm removed."""
    return LM([LearnedAlphaDeepNorm(), LearnedAlphaDeepNorm()], final=None)


class SharedShift(nn.Module):
    """``x + mlp(N(x) + b) + b`` with ``b`` a learned per-channel shift used inside the branch too: ``b`` is
    computed from parameters only, so it is part of the branch sum ``s`` (GEONORM.md section 4: every term
    other than the stream that is not an earlier state belongs to the update's ``s``), even though another
    term is computed from it. A reading that takes ``b`` for an extra term added after the update
    (``Geo(x, mlp(..)) + b``) computes another function."""

    def __init__(self):
        super().__init__()
        self.n, self.mlp = LN(), MLP()
        self.shift = nn.Parameter(0.3 * torch.randn(D))

    def forward(self, x):
        b = self.shift.expand_as(x)
        return x + self.mlp(self.n(x) + b) + b

    def geonorm(self, x, k):
        b = self.shift.expand_as(x)
        return geo(x, self.mlp(self.n(x) + b) + b, k)


@case("param-term-feeds-branch", sites=S("pre", 0, 0, 1), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")] + _scale_params(("shift",)))
def param_term_feeds_branch():
    """A parameter-only term that the branch also reads stays in the branch sum: 2 pre sites whose ``s`` is
    ``mlp(N(x) + b) + b``; the shift parameter stays."""
    return LM([SharedShift(), SharedShift()])


class NextBlockPostNorm(nn.Module):
    """MiniMax-style layer: ``h = in_norm(x)`` first, then ``h = post_attn_norm(a*h + attn(h))``,
    then ``h = a*h + mlp(h)``, returned unnormalized: the MLP step's sum is normalized by the NEXT layer's
    ``in_norm`` (or by the final norm after the last layer)."""

    def __init__(self):
        super().__init__()
        self.in_norm, self.mix, self.post_norm, self.mlp = RMS(), Mix(), RMS(), MLP()

    def forward(self, x):
        h = self.in_norm(x)
        h = self.post_norm(2.0 * h + self.mix(h))
        return 2.0 * h + self.mlp(h)

    def geonorm(self, x, k):
        h = self.in_norm(x)
        h = geo(h, self.mix(h), 0)   # every layer starts a stream of its own (block 0, decay 1)
        return 2.0 * h + self.mlp(h)


@case("post-norm-in-next-block", sites=[("deepnorm", 0, 0), ("deepnorm", 1, 0)], inputs=token_inputs(),
      ref=lm_ref, kept=[Kept("blocks.0.in_norm", why="embedding norm"),
                        Kept("blocks.1.in_norm", why="next block's input norm: abstain"),
                        Kept("final", why="final norm")])
def post_norm_in_next_block():
    """Abstain where a post norm sits in the next block: each layer's attention step ``N(2h + f(h))`` is a
    DeepNorm site of its own block; the MLP step's sum is normalized only by the next layer's ``in_norm`` (or
    the final norm), outside its block, so it stays a plain add and those norms are kept. Each layer's
    ``in_norm`` ends the previous stream, so each layer is a stream of its own (block 0)."""
    return LM([NextBlockPostNorm(), NextBlockPostNorm()], final=RMS)
