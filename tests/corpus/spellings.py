"""Class 6: norm spellings (GEONORM.md section 4: every normalization over the feature dim in any spelling
is either rewritten or skipped with a reason; ``F.normalize(x) * g`` is RMSNorm up to a constant;
``x / |x| * sqrt(d)``; ``var``/``var_mean`` with ``unbiased`` by position or keyword; eps inside or outside
the square root or as a clamp; a centring over another dim is not a LayerNorm)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import D, Kept, S, case, token_inputs
from .blocks import LM, Post, Pre, lm_ref


class _Norm(nn.Module):
    _norm_like = True

    def __init__(self, d=D, weight=True, bias=False, eps=1e-5):
        super().__init__()
        self.d, self.eps = d, eps
        self.weight = nn.Parameter(torch.ones(d)) if weight else None
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def affine(self, y):
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


class ScaleNorm(nn.Module):
    """x-transformers ScaleNorm: ``F.normalize(x, dim=-1) * sqrt(d) * g`` (g a learned scalar)."""
    _norm_like = True

    def __init__(self, d=D):
        super().__init__()
        self.scale = d ** 0.5
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * self.g


class SimpleRMSNorm(nn.Module):
    """x-transformers SimpleRMSNorm: ``F.normalize(x, dim=-1) * sqrt(d)``, no parameter."""

    def __init__(self, d=D):
        super().__init__()
        self.scale = d ** 0.5

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale


class NormSqrtD(_Norm):
    """``x / |x| * sqrt(d) * w``."""

    def forward(self, x):
        return self.affine(x / x.norm(dim=-1, keepdim=True) * math.sqrt(self.d))


class VarMeanLN(_Norm):
    """``torch.var_mean(x, -1, keepdim=True, unbiased=False)``, eps inside the sqrt."""

    def forward(self, x):
        var, mean = torch.var_mean(x, -1, keepdim=True, unbiased=False)
        return self.affine((x - mean) / torch.sqrt(var + self.eps))


class VarKwLN(_Norm):
    """``x.var(-1, keepdim=True, unbiased=False)``, rsqrt."""

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return self.affine((x - mu) * torch.rsqrt(var + self.eps))


class VarPositionalLN(_Norm):
    """``torch.var(x, -1, False, True)`` (unbiased=False, keepdim=True by position) and ``var_mean`` with
    ``correction=0``."""

    def forward(self, x):
        _, mu = torch.var_mean(x, -1, correction=0, keepdim=True)
        var = torch.var(x, -1, False, True)
        return self.affine((x - mu) / (var + self.eps).sqrt())


class VarUnbiasedLN(_Norm):
    """``x.var(-1, keepdim=True)``: the unbiased variance (LayerNorm up to the constant sqrt((d-1)/d))."""

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        return self.affine((x - mu) / torch.sqrt(x.var(-1, keepdim=True) + self.eps))


class RMSClamp(_Norm):
    """``x * rsqrt(mean(x^2).clamp(min=eps))``: eps as a clamp."""

    def forward(self, x):
        return self.affine(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp(min=self.eps)))


class RMSEpsOutside(_Norm):
    """``x / (sqrt(mean(x^2)) + eps)``: eps outside the square root."""

    def forward(self, x):
        return self.affine(x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps))


class BiasedStdLN(_Norm):
    """``(x - mean) / (x.std(-1, unbiased=False) + eps) * w + b``: eps outside the sqrt."""

    def __init__(self, d=D):
        super().__init__(d, bias=True)

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        return self.affine((x - mu) / (x.std(-1, keepdim=True, unbiased=False) + self.eps))


class AnnotatedLN(_Norm):
    """The Annotated Transformer's LayerNorm: ``a * (x - mean) / (std + eps) + b``, std unbiased."""

    def __init__(self, d=D):
        super().__init__(d, bias=True, eps=1e-6)

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.weight * (x - mean) / (std + self.eps) + self.bias


class DecomposedLN(_Norm):
    """``c = x - mean(x)``; ``c * rsqrt(mean(c^2) + eps) * w + b``."""

    def __init__(self, d=D):
        super().__init__(d, bias=True)

    def forward(self, x):
        c = x - x.mean(-1, keepdim=True)
        return self.affine(c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + self.eps))


class LlamaRMS(_Norm):
    """Hugging Face Llama's RMSNorm: float32 upcast, pow/mean/add/rsqrt/mul, cast back, weight."""

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class StdNoCentre(_Norm):
    """``x / (x.std(-1) + eps) * w``: divides by the standard deviation without centring ``x``: neither a
    LayerNorm nor an RMSNorm."""

    def forward(self, x):
        return self.affine(x / (x.std(-1, keepdim=True) + self.eps))


class TokenCentredRMS(_Norm):
    """A centring over the tokens, then an RMSNorm over the features: ``rms_norm(x - x.mean(dim=1))``."""

    def forward(self, x):
        c = x - x.mean(1, keepdim=True)
        return F.rms_norm(c, (self.d,), self.weight, 1e-6)


def _blocks_kept(names=("n1", "n2"), n=2, why="skipped when abstaining"):
    return [Kept(f"blocks.{i}.{name}", why=why) for i in range(n) for name in names]


_PRE4 = S("pre", 0, 0, 1, per=2)
_POST4 = S("post", 0, 0, 1, per=2)


def _pre(norm, final=True):
    return LM([Pre(norm=norm), Pre(norm=norm)], final=norm if final else None)


def _post(norm):
    return LM([Post(norm=norm), Post(norm=norm)], final=None)


@case("scalenorm-fnormalize-pre", sites=_PRE4, norms=["rms_norm"] * 4, inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def scalenorm_pre():
    """x-transformers ScaleNorm ``F.normalize(x, dim=-1) * sqrt(d) * g`` is an RMSNorm up to a constant:
    Pre-Norm blocks with it are 4 pre sites of norm kind rms_norm; the final ScaleNorm is a final norm."""
    return _pre(ScaleNorm)


@case("simplermsnorm-fnormalize-post", sites=_POST4, norms=["rms_norm"] * 4, inputs=token_inputs(), ref=lm_ref)
def simplermsnorm_post():
    """x-transformers SimpleRMSNorm ``F.normalize(x, dim=-1) * sqrt(d)`` as a post norm: 4 post sites of
    kind rms_norm, the norms removed."""
    return _post(SimpleRMSNorm)


@case("norm-over-sqrt-d-post", sites=_POST4, norms=["rms_norm"] * 4, inputs=token_inputs(), ref=lm_ref)
def sqrt_d_post():
    """``x / |x| * sqrt(d) * w`` as a post norm: rms_norm post sites."""
    return _post(NormSqrtD)


@case("var-mean-layernorm-pre", sites=_PRE4, norms=["layer_norm"] * 4, inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def var_mean_pre():
    """``torch.var_mean(x, -1, keepdim=True, unbiased=False)``, ``(x - mean) / sqrt(var + eps)``: a
    LayerNorm; 4 pre sites of kind layer_norm."""
    return _pre(VarMeanLN)


@case("var-unbiased-false-kw-post", sites=_POST4, norms=["layer_norm"] * 4, inputs=token_inputs(), ref=lm_ref)
def var_kw_post():
    """``x.var(-1, keepdim=True, unbiased=False)`` with rsqrt as a post norm: layer_norm post sites."""
    return _post(VarKwLN)


@case("var-positional-post", sites=_POST4, norms=["layer_norm"] * 4, inputs=token_inputs(), ref=lm_ref)
def var_positional_post():
    """``torch.var(x, -1, False, True)`` (unbiased, keepdim by position) and ``var_mean(correction=0)``:
    a LayerNorm; layer_norm post sites."""
    return _post(VarPositionalLN)


@case("var-unbiased-default-pre", sites=_PRE4, inputs=token_inputs(), ref=lm_ref,
      abstain=True, abstain_kept=_blocks_kept())
def var_unbiased_pre():
    """Abstain allowed. A LayerNorm spelled with the unbiased variance (``x.var(-1)``) is a LayerNorm only
    up to the constant sqrt((d-1)/d): the spec does not say whether that counts; either 4 pre sites
    (the norms kept in the branches) or all its norms skipped."""
    return _pre(VarUnbiasedLN, final=False)


@case("rms-eps-clamp-pre", sites=_PRE4, norms=["rms_norm"] * 4, inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def rms_clamp_pre():
    """RMSNorm with eps as a clamp (``rsqrt(mean(x^2).clamp(min=eps))``): rms_norm pre sites."""
    return _pre(RMSClamp)


@case("rms-eps-outside-sqrt-post", sites=_POST4, norms=["rms_norm"] * 4, inputs=token_inputs(), ref=lm_ref)
def rms_outside_post():
    """RMSNorm with eps outside the square root (``x / (sqrt(mean(x^2)) + eps)``) as a post norm: rms_norm
    post sites, the norms removed."""
    return _post(RMSEpsOutside)


@case("ln-biased-std-eps-outside-post", sites=_POST4, norms=["layer_norm"] * 4, inputs=token_inputs(),
      ref=lm_ref)
def biased_std_post():
    """``(x - mean) / (x.std(-1, unbiased=False) + eps)`` (eps outside the sqrt) as a post norm:
    layer_norm post sites."""
    return _post(BiasedStdLN)


@case("annotated-transformer-ln-post", sites=_POST4, inputs=token_inputs(), ref=lm_ref, abstain=True,
      abstain_kept=_blocks_kept())
def annotated_post():
    """Abstain allowed. The Annotated Transformer's LayerNorm (unbiased std, eps outside): a LayerNorm up
    to a constant; either 4 post sites (norms removed) or every norm skipped."""
    return _post(AnnotatedLN)


@case("decomposed-layernorm-pre", sites=_PRE4, norms=["layer_norm"] * 4, inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def decomposed_pre():
    """A LayerNorm decomposed as ``c = x - mean(x)``, ``c * rsqrt(mean(c^2) + eps) * w + b`` (an RMSNorm of
    the feature-centred value, i.e. a LayerNorm): layer_norm pre sites."""
    return _pre(DecomposedLN)


@case("std-no-centring-post", sites=[], inputs=token_inputs(), kept=_blocks_kept(why="neither LN nor RMS"))
def std_post():
    """``x / std(x)`` (no centring) in post position ``N(x + f(x))``: neither a LayerNorm nor an RMSNorm,
    so not a site; a norm-like layer over the features must be listed in skipped and left as it is."""
    return _post(StdNoCentre)


@case("std-no-centring-pre", sites=[], inputs=token_inputs(),
      kept=_blocks_kept(why="neither LN nor RMS") + [Kept("final", why="final norm")])
def std_pre():
    """``x / std(x)`` (no centring) in pre position ``x + f(N(x))`` (and as the final norm): not a site,
    every one skipped, nothing rewritten."""
    return _pre(StdNoCentre)


@case("token-centring-rms-post", sites=[], inputs=token_inputs(),
      kept=_blocks_kept(why="centring over the tokens"))
def token_centring_post():
    """``rms_norm(h - h.mean(dim=1))`` over the features of ``h = x + f(x)``: a centring over another dim
    (the tokens) is not a LayerNorm, and it is not seen through (only casts, dropout, clones, views and
    aliases are), so the RMSNorm does not read ``x + f(x)``: not a post site; removing it would drop the
    token centring. 0 sites, the norms skipped."""
    return _post(TokenCentredRMS)


@case("token-centring-rms-pre", sites=_PRE4, inputs=token_inputs(), ref=lm_ref, abstain=True,
      abstain_kept=_blocks_kept())
def token_centring_pre():
    """Abstain allowed. ``x + f(rms_norm(x - x.mean(dim=1)))``: the branch reads ``x`` through a token
    centring and an RMSNorm; whether that is a pre site's ``N(x)`` is not decided by the spec. Either 4
    pre sites (the norm kept in the branch: ``Geo(x, f(N(c(x))))``) or the norms skipped."""
    return _pre(TokenCentredRMS, final=False)


class PositiveDimRMS(_Norm):
    """``x * rsqrt(x.square().sum(2) / d + eps)`` on a 3-d state: the last dim given as ``2``."""

    def forward(self, x):
        return self.affine(x * torch.rsqrt(x.square().sum(2, keepdim=True) / self.d + self.eps))


class VectorNormRMS(_Norm):
    """``x / (torch.linalg.vector_norm(x, 2, -1, True) * d**-0.5 + eps)``."""

    def forward(self, x):
        return self.affine(x / (torch.linalg.vector_norm(x, 2, -1, True) * self.d ** -0.5 + self.eps))


@case("positive-dim-index-rms-post", sites=_POST4, norms=["rms_norm"] * 4, inputs=token_inputs(), ref=lm_ref)
def positive_dim_post():
    """An RMSNorm over the last dim given by its positive index (``sum(2)`` of a 3-d state, ``square``):
    rms_norm post sites, the norms removed."""
    return _post(PositiveDimRMS)


@case("linalg-vector-norm-rms-pre", sites=_PRE4, norms=["rms_norm"] * 4, inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def vector_norm_pre():
    """``x / (torch.linalg.vector_norm(x, 2, -1, True) / sqrt(d) + eps)``: an RMSNorm (eps outside): rms_norm
    pre sites."""
    return _pre(VectorNormRMS)


class PowHalfRMS(_Norm):
    """``x * (mean(x^2) + eps) ** -0.5``."""

    def forward(self, x):
        return self.affine(x * (x.pow(2).mean(-1, keepdim=True) + self.eps) ** -0.5)


class StdMeanLN(_Norm):
    """``std, mean = torch.std_mean(x, -1, keepdim=True, unbiased=False)``; ``(x - mean) / (std + eps)``."""

    def __init__(self, d=D):
        super().__init__(d, bias=True)

    def forward(self, x):
        std, mean = torch.std_mean(x, -1, keepdim=True, unbiased=False)
        return self.affine((x - mean) / (std + self.eps))


@case("rms-pow-minus-half-post", sites=_POST4, norms=["rms_norm"] * 4, inputs=token_inputs(), ref=lm_ref)
def pow_half_post():
    """RMSNorm spelled ``x * (mean(x^2) + eps) ** -0.5`` as a post norm: rms_norm post sites."""
    return _post(PowHalfRMS)


@case("std-mean-layernorm-pre", sites=_PRE4, norms=["layer_norm"] * 4, inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")])
def std_mean_pre():
    """LayerNorm spelled with ``torch.std_mean(unbiased=False)`` and eps outside the sqrt: layer_norm pre
    sites."""
    return _pre(StdMeanLN)
