"""Capture: dynamic dims by default, static fallback with a warning, clear CaptureErrors."""
import pytest
import torch
from torch import nn

import geonorm_fx as gf
from geonorm_fx.capture import capture

from .tiny import PreNormBlock, Stack, tokens


def test_export_capture_is_dynamic_in_batch_and_sequence():
    cap = capture(Stack(PreNormBlock, depth=1).eval(), (tokens(),), modes=("eval",))
    assert cap.tracer == "export" and cap.dynamic
    placeholder = next(n for n in cap.graphs["eval"].graph.nodes if n.op == "placeholder")
    assert all(isinstance(d, torch.SymInt) for d in placeholder.meta["val"].shape)


def test_both_modes_are_captured_and_share_parameters():
    cap = capture(Stack(PreNormBlock, depth=1, p=0.2), (tokens(),))
    assert set(cap.graphs) == {"eval", "train"}
    ev, tr = cap.graphs["eval"], cap.graphs["train"]
    assert ev.get_parameter("blocks.0.mix.inp.weight") is tr.get_parameter("blocks.0.mix.inp.weight")
    flags = {mode: [n.args[2] for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default]
             for mode, gm in cap.graphs.items()}
    assert flags["eval"] and not any(flags["eval"]) and all(flags["train"])


class StaticOnly(nn.Module):
    """Stands in for a model whose code cannot run on symbolic sizes."""

    def __init__(self):
        super().__init__()
        self.norm, self.f = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        if not isinstance(x.shape[0], int):
            raise RuntimeError("this model needs concrete sizes")
        return x + self.f(self.norm(x))


def test_static_fallback_warns_and_still_converts():
    x = torch.randn(2, 3, 8)
    with pytest.warns(gf.GeoNormWarning, match="static shapes"):
        module = gf.convert(StaticOnly(), (x,))
    assert module.geonorm_report.dynamic is False
    assert module.geonorm_report.counts() == {"pre": 1}
    assert module(x).shape == x.shape


def test_size_one_examples_warn():
    with pytest.warns(gf.GeoNormWarning, match="sizes >= 2"):
        gf.inspect(Stack(PreNormBlock, depth=1).eval(), (tokens(batch=1),))


def test_data_dependent_control_flow_gives_a_capture_error_with_a_fix():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(gf.CaptureError, match=r"could not capture DataDependent.*Fix:"):
        gf.inspect(DataDependent(), (torch.randn(2, 3),))
    with pytest.raises(gf.CaptureError, match="symbolic_trace.*tracer='export'"):
        gf.inspect(DataDependent(), (torch.randn(2, 3),), tracer="fx")


def test_hugging_face_decoder_with_cache_gets_the_use_cache_hint():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(gf.CaptureError, match="use_cache=False"):
        gf.convert(model, (ids,))
    module = gf.convert(model, (ids,), {"use_cache": False})
    assert module.geonorm_report.counts() == {"pre": 2}


def test_kwargs_inputs():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.f = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x, *, scale=1.0, bias=None):
            h = x + self.f(self.norm(x)) * scale
            return h if bias is None else h + bias

    x, b = torch.randn(2, 3, 8), torch.randn(8)
    module = gf.convert(KW(), (x,), {"bias": b}).eval()
    assert module.geonorm_report.counts() == {"pre": 1}
    assert module(torch.randn(4, 5, 8), bias=b).shape == (4, 5, 8)


class _InPlaceBlock(nn.Module):
    """A Pre-Norm block; ``inplace`` writes the residual add as ``x.add_(...)`` without rebinding x."""

    def __init__(self, d, inplace):
        super().__init__()
        self.norm, self.f = nn.LayerNorm(d), nn.Linear(d, d)
        self.inplace = inplace

    def forward(self, x):
        if self.inplace:
            x.add_(self.f(self.norm(x)))
            return x
        x = x + self.f(self.norm(x))
        return x


class _InPlaceStack(nn.Module):
    def __init__(self, inplace, d=8, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(_InPlaceBlock(d, inplace) for _ in range(depth))
        self.final = nn.LayerNorm(d)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.final(x)


def test_fx_tracer_functionalizes_in_place_residual_adds():
    """symbolic_trace leaves later nodes reading the original x after ``x.add_(...)``; the capture makes
    the op out-of-place and points them at its result, so the rewritten add is not thrown away."""
    inplace = _InPlaceStack(True).eval()
    plain = _InPlaceStack(False).eval()
    plain.load_state_dict(inplace.state_dict())
    x = torch.randn(2, 5, 8)
    a = gf.convert(inplace, (x,), tracer="fx")
    b = gf.convert(plain, (x,), tracer="fx")
    assert a.geonorm_report.counts() == b.geonorm_report.counts() == {"pre": 3}
    assert not any(n.target == "add_" for n in a.graph.nodes)
    x2 = torch.randn(3, 7, 8)
    before = x2.clone()
    with torch.no_grad():
        torch.testing.assert_close(a(x2), b(x2), rtol=0, atol=0)
        assert not torch.allclose(a(x2), inplace(x2.clone()))  # the updates ran: not the source's output
    assert torch.equal(x2, before)  # the converted module no longer mutates its input


def test_fx_tracer_functionalizes_chains_and_keeps_the_result():
    class Chain(nn.Module):
        def forward(self, x, y):
            h = x * 1.0          # a fresh tensor, mutated three times
            h.add_(y).mul_(2)
            torch.relu_(h)
            return h + x

    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    cap = capture(Chain(), (x, y), tracer="fx", modes=("eval",))
    gm = cap.graphs["eval"]
    assert not [n for n in gm.graph.nodes if str(n.target).endswith("_")]
    torch.testing.assert_close(gm(x, y), Chain()(x, y))


def test_fx_tracer_refuses_to_functionalize_a_view_mutation():
    class ViewMutation(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.f = nn.LayerNorm(4), nn.Linear(4, 4)

        def forward(self, x):
            x[:, 0].add_(self.f(self.norm(x))[:, 0])
            return x

    with pytest.raises(gf.CaptureError, match=r"add_.*view.*tracer='export'"):
        gf.convert(ViewMutation(), (torch.randn(2, 3, 4),), tracer="fx")

    class EarlyView(nn.Module):
        def forward(self, x):
            t = x.transpose(0, 1)
            x.mul_(2)
            return t + 1

    with pytest.raises(gf.CaptureError, match=r"view of it made earlier.*tracer='export'"):
        capture(EarlyView(), (torch.randn(2, 3),), tracer="fx", modes=("eval",))
    # the default tracer captures both exactly
    module = gf.convert(ViewMutation(), (torch.randn(2, 3, 4),))
    assert module.geonorm_report.tracer == "export"


def test_fx_functionalization_keeps_the_in_place_dtype():
    class Mixed(nn.Module):
        def forward(self, x, y):
            h = x * 1
            h.add_(y)  # a float16 tensor plus a float32 one, in place: stays float16
            return torch.nn.functional.relu(h, inplace=True)

    x, y = torch.randn(2, 3).half(), torch.randn(2, 3)
    gm = capture(Mixed(), (x, y), tracer="fx", modes=("eval",)).graphs["eval"]
    assert gm(x, y).dtype == torch.float16
    torch.testing.assert_close(gm(x, y), Mixed()(x.clone(), y), rtol=0, atol=0)


def test_fx_refuses_an_augmented_assignment_it_cannot_follow():
    """``y = x; y += t; return x`` mutates ``x`` in eager Python; symbolic_trace records ``y = y + t`` and
    returns the stale ``x``: the traced graph is another function, so capture refuses it with the fix."""
    from .corpus.blocks import LM
    from .corpus.inplace import AliasReturn

    model = LM([AliasReturn(), AliasReturn()]).eval()
    ids = torch.randint(0, 16, (2, 5))
    with pytest.raises(gf.CaptureError, match="tracer='export'"):
        gf.convert(model, (ids,), tracer="fx")
