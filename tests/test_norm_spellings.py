"""Norm detection by what is computed: every spelling of a normalization over the feature dim, in
torch.export (aten) and fx (torch-level) graphs, gets the right kind, source and output node."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from geonorm_fx.capture import capture
from geonorm_fx.passes.norms import RESIDUAL_NORM_KINDS, find_norms
from geonorm_fx.passes.ops import GraphView, norm_spellings

D = 8
EPS = 1e-5


class Norm(nn.Module):
    """A tiny norm module whose forward is a given function of (self, x)."""

    def __init__(self, fn, gain_shape=(D,)):
        super().__init__()
        self.fn = fn
        self.g = nn.Parameter(1 + 0.1 * torch.randn(gain_shape))
        self.b = nn.Parameter(0.1 * torch.randn(D))

    def forward(self, x):
        return self.fn(self, x)


def _centred(x, dim=-1):
    return x - x.mean(dim, keepdim=True)


def _var_mean_rsqrt(m, x):
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + EPS)


def _var_mean_sqrt(m, x):
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    return (x - mean) / torch.sqrt(var + EPS) * m.g + m.b


def _llama(m, x):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return m.g * h.to(x.dtype)


def _t5(m, x):
    var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return m.g * (x * torch.rsqrt(var + 1e-6))


def _gemma(m, x):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (h * (1.0 + m.g.float())).type_as(x)


def _channels_first(m, x):  # (N, C, L) normalized over C
    h = x.transpose(1, 2)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return h.transpose(1, 2)


def _max_values(m, x):
    return x / x.abs().max(-1, keepdim=True).values


def _max_getitem(m, x):
    return x / x.abs().max(dim=-1, keepdim=True)[0]


LN, RMS, LIKE = "layer_norm", "rms_norm", "norm_like"

# name -> (forward, kind, words the skip reason must contain); the source is the input x
CASES = {
    # 1. F.normalize spellings (x-transformers' ScaleNorm / SimpleRMSNorm / RMSNorm)
    "normalize*g*sqrt(d)": (lambda m, x: F.normalize(x, dim=-1) * m.g * D ** 0.5, RMS, None),
    "normalize*scale*(g+0) scalar g": (lambda m, x: F.normalize(x, dim=-1) * D ** 0.5 * (m.g + 0.0), RMS, None),
    "normalize alone": (lambda m, x: F.normalize(x, dim=-1), RMS, None),
    "normalize dim=ndim-1": (lambda m, x: F.normalize(x, dim=2), RMS, None),
    "old ScaleNorm x/(norm*d**-0.5).clamp*g":
        (lambda m, x: x / (torch.norm(x, dim=-1, keepdim=True) * D ** -0.5).clamp(min=EPS) * m.g, RMS, None),
    # 2. x / |x|
    "x/x.norm*sqrt(d)": (lambda m, x: x / x.norm(dim=-1, keepdim=True) * D ** 0.5, RMS, None),
    "x/(vector_norm+eps)": (lambda m, x: x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + EPS), RMS, None),
    "x/x.norm.clamp(min)": (lambda m, x: x / x.norm(dim=2, keepdim=True).clamp(min=EPS), RMS, None),
    "x*reciprocal(norm)": (lambda m, x: x * torch.reciprocal(x.norm(p=2, dim=-1, keepdim=True) + EPS), RMS, None),
    "x*rsqrt(sum sq) (L2, nGPT)": (lambda m, x: x * torch.rsqrt((x * x).sum(-1, keepdim=True) + EPS), RMS, None),
    # 3. var_mean
    "var_mean unbiased=False rsqrt": (_var_mean_rsqrt, LN, None),
    "var_mean correction=0 sqrt, affine": (_var_mean_sqrt, LN, None),
    # 4. var
    "var unbiased=False": (lambda m, x: _centred(x) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + EPS),
                           LN, None),
    "var positional unbiased (Bessel)": (lambda m, x: _centred(x) / torch.sqrt(x.var(-1, True, True) + EPS), LN, None),
    "torch.var correction=0, rsqrt first": (
        lambda m, x: torch.rsqrt(EPS + torch.var(x, dim=2, correction=0, keepdim=True)) * _centred(x), LN, None),
    "var of the centred value": (lambda m, x: _centred(x) * (_centred(x).var(-1, keepdim=True, unbiased=False)
                                                              + EPS) ** -0.5, LN, None),
    "eps a buffer": (lambda m, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps), RMS, None),
    "centring by an unsqueezed mean": (
        lambda m, x: (x - x.mean(-1).unsqueeze(-1)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + EPS),
        LN, None),
    # 5. eps as a clamp, std forms
    "rsqrt(ms.clamp)": (lambda m, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp(min=EPS)), RMS, None),
    "x/sqrt(ms).clamp": (lambda m, x: x / torch.sqrt(x.square().mean(-1, keepdim=True)).clamp(min=EPS), RMS, None),
    "x/sqrt(ms).clamp_min, eps outside": (
        lambda m, x: x / (torch.sqrt(torch.mean(x ** 2, dim=-1, keepdim=True)) + EPS), RMS, None),
    "centred/(std+eps)": (lambda m, x: _centred(x) / (_centred(x).std(-1, keepdim=True, unbiased=False) + EPS),
                          LN, None),
    "annotated transformer a*(x-m)/(std+eps)+b": (
        lambda m, x: m.g * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + EPS) + m.b, LN, None),
    "LayerNorm by hand, 1/sqrt": (
        lambda m, x: (x - x.mean(-1, keepdim=True)) * (1 / torch.sqrt(((x - x.mean(-1, keepdim=True)) ** 2)
                                                                          .mean(-1, keepdim=True) + EPS)) * m.g + m.b,
        LN, None),
    # 7. norm-like: found, with a reason, never a LayerNorm/RMSNorm
    "SimpleNorm x/sqrt(var+eps)": (lambda m, x: x / torch.sqrt(x.var(-1, keepdim=True) + EPS), LIKE,
                                   "standard deviation over the last dimension without centring"),
    "x/std (biased) no centring": (lambda m, x: x / (x.std(-1, keepdim=True, unbiased=False) + EPS), LIKE,
                                   "without centring"),
    "x/rms(centred)": (lambda m, x: x * torch.rsqrt(_centred(x).pow(2).mean(-1, keepdim=True) + EPS), LIKE,
                       "without centring"),
    "mean abs": (lambda m, x: x / x.abs().mean(-1, keepdim=True), LIKE, "mean absolute value"),
    "max abs amax": (lambda m, x: x / x.abs().amax(-1, keepdim=True) * m.g, LIKE, "maximum absolute value"),
    "max abs .values": (_max_values, LIKE, "maximum absolute value"),
    "max abs [0]": (_max_getitem, LIKE, "maximum absolute value"),
    "L1 normalize": (lambda m, x: F.normalize(x, p=1.0, dim=-1), LIKE, "L1"),
    "x/mean square (not scale-invariant)": (lambda m, x: x / (x.pow(2).mean(-1, keepdim=True) + EPS), LIKE,
                                            "does not cancel"),
    # 8. the spellings found before
    "nn.LayerNorm": (lambda m, x: m.ln(x), LN, None),
    "F.layer_norm": (lambda m, x: F.layer_norm(x, (D,), m.g, m.b, 1e-5), LN, None),
    "nn.RMSNorm": (lambda m, x: m.rms(x), RMS, None),
    "F.rms_norm": (lambda m, x: F.rms_norm(x, (D,), m.g, 1e-6), RMS, None),
    "llama": (_llama, RMS, None),
    "t5": (_t5, RMS, None),
    "gemma (1+w)": (_gemma, RMS, None),
}


def _model(fn):
    model = Norm(fn)
    model.ln, model.rms = nn.LayerNorm(D), nn.RMSNorm(D, eps=1e-6)
    model.register_buffer("eps", torch.tensor(1e-6))
    return model.eval()


def _graph(model, tracer, shape=(2, 3, D)):
    x = torch.randn(*shape)
    gm = capture(model, (x,), tracer=tracer, modes=("eval",)).graphs["eval"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    return gm


def _returned(gm) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    nodes = []
    torch.fx.node.map_arg(out.args, nodes.append)
    return nodes


def _has_statistic(view, match) -> bool:
    whole = set().union(*(v for k, v in norm_spellings().items() if k.endswith("ops"))) | {F.normalize}
    return any(view.reduction(n) is not None or n.op == "call_module" or n.target in whole for n in match.nodes)


def _check(view, match, kind, words, gm):
    assert match.kind == kind
    assert match.output in _returned(gm), "the norm's output is the module's result"
    assert _has_statistic(view, match)
    assert match.output in match.nodes and match.input in match.nodes | {match.source}
    assert match.dim == -1 and match.over == "the last dimension"
    assert match.feature_norm == (kind in RESIDUAL_NORM_KINDS)
    if words is None:
        assert match.skip_reason is None
    else:
        assert words in match.skip_reason and "neither a LayerNorm nor an RMSNorm" in match.skip_reason


@pytest.mark.parametrize("tracer", ["export", "fx"])
@pytest.mark.parametrize("name", list(CASES))
def test_spelling(name, tracer):
    fn, kind, words = CASES[name]
    gm = _graph(_model(fn), tracer)
    view = GraphView(gm)
    norms = find_norms(view)
    assert [(m.kind, m.source.op, m.source.name) for m in norms] == [(kind, "placeholder", "x")]
    _check(view, norms[0], kind, words, gm)


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_centring_over_another_dim_is_an_rms_norm_of_the_centred_tensor(tracer):
    """``c = x - mean(x, dim=1)``, then RMS over the features: an RMSNorm of ``c``, not a LayerNorm of ``x``."""
    def fn(m, x):
        c = x - x.mean(dim=1, keepdim=True)
        return c * torch.rsqrt(torch.mean(c ** 2, -1, keepdim=True) + EPS)

    gm = _graph(_model(fn), tracer)
    view = GraphView(gm)
    norms = find_norms(view)
    assert len(norms) == 1
    (match,) = norms
    assert view.sub_operands(match.source) is not None and match.source is match.input
    _check(view, match, RMS, None, gm)
    assert not any(view.sub_operands(n) for n in match.nodes), "the other-dim centring is not part of the norm"


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_channels_first_norm_read_through_a_permute(tracer):
    gm = _graph(_model(_channels_first), tracer, shape=(2, D, 3))
    view = GraphView(gm)
    (match,) = find_norms(view)
    assert (match.kind, match.source.name, match.dim) == (RMS, "x", -2)
    assert match.output in _returned(gm) and match.output_in_source_layout


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_norm_over_another_dim_is_not_a_feature_norm(tracer):
    gm = _graph(_model(lambda m, x: x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + EPS)), tracer)
    (match,) = find_norms(GraphView(gm))
    assert match.kind == RMS and match.dim is None and not match.feature_norm and "[1]" in match.over


NOT_NORMS = {
    "softmax by hand": lambda m, x: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True),
    "times its mean square": lambda m, x: x * x.pow(2).mean(-1, keepdim=True),
    "signed max": lambda m, x: x / x.amax(-1, keepdim=True),
    "divided by another tensor's norm": lambda m, x: x / m.ln(x).norm(dim=-1, keepdim=True),
    "constant scale": lambda m, x: x / math.sqrt(D) * m.g,
}


@pytest.mark.parametrize("tracer", ["export", "fx"])
@pytest.mark.parametrize("name", list(NOT_NORMS))
def test_not_norms(name, tracer):
    gm = _graph(_model(NOT_NORMS[name]), tracer)
    norms = find_norms(GraphView(gm))
    assert [m.kind for m in norms] == (["layer_norm"] if "norm" in name else [])


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_llama_norm_in_bfloat16_reads_through_the_casts(tracer):
    model = _model(_llama).to(torch.bfloat16)
    gm = capture(model, (torch.randn(2, 3, D, dtype=torch.bfloat16),), tracer=tracer, modes=("eval",)).graphs["eval"]
    view = GraphView(gm)
    (match,) = find_norms(view)
    assert (match.kind, match.source.name) == (RMS, "x") and match.output in _returned(gm)
    assert any(view.is_cast(n) for n in match.nodes)


class _Block(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.norm, self.f = _model(fn), nn.Linear(D, D)

    def forward(self, x):
        return x + self.f(self.norm(x))


class _Stack(nn.Module):
    def __init__(self, fn, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(fn) for _ in range(depth))
        self.final = _model(fn)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.final(x)


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_normalize_rms_norm_makes_pre_sites_and_norm_like_never_does(tracer):
    from geonorm_fx.passes.sites import analyze

    x_transformers_rms = CASES["normalize*g*sqrt(d)"][0]
    gm = _graph(_Stack(x_transformers_rms).eval(), tracer)
    analysis = analyze(GraphView(gm))
    assert [(s.kind, s.norm.kind) for s in analysis.sites] == [("pre", RMS)] * 2

    gm = _graph(_Stack(CASES["SimpleNorm x/sqrt(var+eps)"][0]).eval(), tracer)
    view = GraphView(gm)
    norms = find_norms(view)
    assert [m.kind for m in norms] == [LIKE] * 3
    analysis = analyze(view)
    assert analysis.sites == []
    assert [s.reason for s in analysis.skipped] == [m.skip_reason for m in norms]
