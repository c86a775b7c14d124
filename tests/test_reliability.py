"""Odd input: several inputs and outputs, dict and dataclass outputs, keyword-only inputs, half precision,
a residual stream returned directly, things that are not models. Each converts correctly or raises a
GeoNormError that says why, and the source model is never changed."""
import dataclasses
import math

import pytest
import torch
from torch import nn

import geonorm_fx as gf

from .reference import reference_geodesic
from .stacks import MixedStack
from .tiny import tokens


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    return all(torch.equal(model.state_dict()[k], v) for k, v in snap.items())


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.f = nn.LayerNorm(8), nn.Linear(8, 8)
        self.g = nn.Linear(4, 8)

    def forward(self, x, extra):
        h = x + self.f(self.norm(x))
        return {"hidden": h, "mixed": h + self.g(extra).unsqueeze(1), "count": extra.sum()}


def test_several_inputs_and_a_dict_output():
    model = TwoInTwoOut().eval()
    x, extra = torch.randn(2, 5, 8), torch.randn(2, 4)
    module = gf.convert(model, (x, extra)).eval()
    assert module.geonorm_report.counts() == {"pre": 1}
    with torch.no_grad():
        out = module(x, extra)
        assert set(out) == {"hidden", "mixed", "count"}
        expected = reference_geodesic(x, model.f(model.norm(x)), 1.0)
        torch.testing.assert_close(out["hidden"], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["mixed"], expected + model.g(extra).unsqueeze(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["count"], extra.sum())


def test_dataclass_output_names_the_fix_then_converts_once_registered():
    @dataclasses.dataclass
    class BlockOutput:  # defined here: registering it below touches no other test
        hidden: torch.Tensor
        aux: torch.Tensor

    class DataclassOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.f = nn.RMSNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            return BlockOutput(x + self.f(self.norm(x)), x.mean())

    model = DataclassOut().eval()
    x = torch.randn(2, 3, 8)
    with pytest.raises(gf.CaptureError, match=r"register_dataclass\(BlockOutput\)"):
        gf.convert(model, (x,))
    torch.export.register_dataclass(BlockOutput)
    module = gf.convert(model, (x,)).eval()
    out = module(x)
    assert isinstance(out, BlockOutput) and out.hidden.shape == x.shape


def test_keyword_only_inputs():
    class KeywordOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.f = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, *, hidden, gate=None):
            out = hidden + self.f(self.norm(hidden))
            return out if gate is None else out * gate

    model = KeywordOnly().eval()
    h, gate = torch.randn(2, 3, 8), torch.rand(2, 3, 1)
    module = gf.convert(model, (), {"hidden": h, "gate": gate}).eval()
    assert module.geonorm_report.counts() == {"pre": 1}
    with torch.no_grad():
        torch.testing.assert_close(module(hidden=h, gate=gate),
                                   reference_geodesic(h, model.f(model.norm(h))) * gate, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_half_precision_models(dtype, tol):
    model = MixedStack(["pre", "post", "parallel", "sandwich"], spelling="hand_rms").to(dtype).eval()
    snap = _snapshot(model)
    toks = tokens()
    module = gf.convert(model, (toks,)).eval()
    assert module.geonorm_report.counts() == {"pre": 2, "post": 2, "parallel": 1, "sandwich": 2}
    assert all(p.dtype == dtype for n, p in module.named_parameters() if not n.startswith("geonorm"))
    with torch.no_grad():
        out = module(toks)
        assert out.dtype == dtype and torch.isfinite(out).all()
        reference = model.geonorm_forward(toks, [1, 1 / 2, 1 / 3, 1 / 4], math.pi / 4)
        scale = reference.float().abs().max()
        assert ((out.float() - reference.float()).abs().max() / scale) < tol
    assert _unchanged(model, snap)


def test_residual_stream_returned_directly():
    model = MixedStack(["pre", "respost", "pre"], final_norm=False).eval()
    model.head = nn.Identity()  # the output is the residual stream itself
    toks = tokens()
    module = gf.convert(model, (toks,)).eval()
    assert module.geonorm_report.counts() == {"pre": 4, "respost": 2}
    assert module.geonorm_report.skipped == []
    with torch.no_grad():
        torch.testing.assert_close(module(toks), model.geonorm_forward(toks, [1, 1 / 2, 1 / 3], math.pi / 4),
                                   atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("thing", ["a string", torch.randn(3), nn.Linear, lambda x: x, None])
def test_things_that_are_not_models(thing):
    with pytest.raises(gf.GeoNormError, match="expected a torch.nn.Module"):
        gf.convert(thing, (torch.randn(2, 3),))
    with pytest.raises(gf.GeoNormError, match="expected a torch.nn.Module"):
        gf.inspect(thing, (torch.randn(2, 3),))


def test_inputs_the_model_cannot_take_leave_it_unchanged():
    model = MixedStack(["pre", "post"]).train()
    snap = _snapshot(model)
    with pytest.raises(gf.CaptureError, match="could not capture MixedStack"):
        gf.convert(model, (torch.randn(2, 3, 16),))
    with pytest.raises(gf.CaptureError):
        gf.convert(model, (tokens(),), {"unexpected": 1})
    assert _unchanged(model, snap) and model.training
