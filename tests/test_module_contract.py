"""The converted module's contract around the capture: it starts in the source's mode, its report says
which input dims really stayed dynamic, and it rejects inputs its capture cannot take with an
InputShapeError that names the input, the dim, both sizes and the fix."""
import copy
import json
import warnings

import pytest
import torch
from torch import fx, nn

import geonorm_fx as gf
from geonorm_fx.errors import InputShapeError

from .tiny import PreNormBlock, Stack, tokens


def _quiet_convert(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gf.GeoNormWarning)
        return gf.convert(*args, **kwargs)


# ------------------------------------------------------------------------------------------- mode
@pytest.fixture(scope="module")
def dropout_model():
    torch.manual_seed(0)
    return Stack(PreNormBlock, depth=1, p=0.5), tokens()


def test_converted_module_starts_in_eval_when_the_source_is_in_eval(dropout_model):
    model, toks = dropout_model
    converted = gf.convert(model.eval(), (toks,))
    assert converted.training is False
    assert not any(m.training for m in converted.modules())
    with torch.no_grad():
        torch.testing.assert_close(converted(toks), converted(toks), rtol=0, atol=0)


def test_converted_module_starts_in_train_when_the_source_is_in_train(dropout_model):
    model, toks = dropout_model
    converted = gf.convert(model.train(), (toks,))
    assert converted.training is True
    with torch.no_grad():
        assert not torch.equal(converted(toks), converted(toks))
    assert copy.deepcopy(converted).training is True
    assert copy.deepcopy(converted.eval()).training is False


def test_given_graph_module_and_exported_program_keep_their_mode(dropout_model):
    model, toks = dropout_model
    traced = fx.symbolic_trace(model.eval())
    assert gf.convert(traced.eval(), (toks,)).training is False
    assert gf.convert(traced.train(), (toks,)).training is True
    ep = torch.export.export(model.eval(), (toks,), strict=False)
    converted = gf.convert(ep, (toks,))
    assert converted.training is False
    with torch.no_grad():
        torch.testing.assert_close(converted(toks), converted(toks), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- dynamic dims
class _Embedded(nn.Module):
    """Token ids -> embedding (+ a position table) -> one Pre-Norm site."""

    def __init__(self, positions="none", seq=6, d=8):
        super().__init__()
        self.embed = nn.Embedding(32, d)
        self.pos = nn.Parameter(torch.randn(seq, d))
        self.norm, self.f = nn.LayerNorm(d), nn.Linear(d, d)
        self.positions = positions

    def forward(self, ids):
        x = self.embed(ids)
        if self.positions == "whole":          # a fixed-length table added whole: fixes the length
            x = x + self.pos
        elif self.positions == "sliced":       # sliced to the length: bounds it by the table
            x = x + self.pos[: ids.shape[1]]
        elif self.positions == "checked" and ids.shape[1] == 6:  # a shape check: fixes the length
            x = x * 2
        return x + self.f(self.norm(x))


def test_dynamic_report_lists_the_dims_that_stay_dynamic():
    report = gf.inspect(_Embedded(), (tokens(),))
    assert report.dynamic is True
    assert report.dynamic_dims == {"ids": [0, 1]} and report.fixed_dims == {}
    data = json.loads(report.to_json())
    assert data["dynamic_dims"] == {"ids": [0, 1]} and data["fixed_dims"] == {}
    assert gf.inspect(_Embedded(), (tokens(),), dynamic=False).dynamic_dims == {"ids": []}


@pytest.mark.parametrize("positions", ["whole", "checked"])
def test_a_fixed_sequence_dim_is_reported_and_warned(positions):
    with pytest.warns(gf.GeoNormWarning, match=r"'ids' dim 1 \(size 6\)"):
        module = gf.convert(_Embedded(positions).eval(), (tokens(),))
    report = module.geonorm_report
    assert report.dynamic is False
    assert report.dynamic_dims == {"ids": [0]} and report.fixed_dims == {"ids": {1: 6}}
    assert json.loads(report.to_json())["fixed_dims"] == {"ids": {"1": 6}}
    assert "ids[1]=6" in str(report)
    assert module.dynamic_dims() == [[0]]
    assert module(tokens(batch=3)).shape == (3, 6, 8)   # the batch stays dynamic


def test_a_size_one_example_is_reported_as_fixed():
    with pytest.warns(gf.GeoNormWarning, match=r"'ids' dim 0 \(size 1\).*sizes >= 2"):
        report = gf.inspect(_Embedded(), (tokens(batch=1),))
    assert report.dynamic is False and report.fixed_dims == {"ids": {0: 1}} and report.dynamic_dims == {"ids": [1]}


def test_feature_dims_do_not_count_against_dynamic():
    """A (batch, features) input: the features are fixed by the first Linear, which is expected."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", gf.GeoNormWarning)
        report = gf.inspect(model, (torch.randn(3, 8),))
    assert report.dynamic is True and report.dynamic_dims == {"input": [0]} and report.fixed_dims == {}


# --------------------------------------------------------------------------------- input checks
def test_a_size_at_a_fixed_dim_raises_input_shape_error():
    module = _quiet_convert(_Embedded("whole").eval(), (tokens(),))
    with pytest.raises(InputShapeError) as info:
        module(tokens(seq=5))
    message = str(info.value)
    assert isinstance(info.value, gf.GeoNormError) and isinstance(info.value, ValueError)
    for part in ("'ids'", "dim 1", "size 5", "fixed to 6", "example whose dim 1 has size 5", "dynamic"):
        assert part in message, part
    with pytest.raises(InputShapeError, match=r"'ids' has 3 dims.*captured for 2 dims \(shape \[\*, 6\]"):
        module(tokens()[..., None])


def test_a_static_capture_checks_every_dim():
    module = gf.convert(_Embedded().eval(), (tokens(),), dynamic=False)
    assert module.geonorm_report.dynamic is False and module.geonorm_report.dynamic_dims == {"ids": []}
    module(tokens())
    with pytest.raises(InputShapeError, match=r"'ids' dim 0 has size 3.*fixed to 2.*static capture"):
        module(tokens(batch=3))
    twin = copy.deepcopy(module)
    with pytest.raises(InputShapeError, match="dim 1 has size 7"):
        twin(tokens(seq=7))


def test_a_bounded_dynamic_dim_raises_input_shape_error():
    module = gf.convert(_Embedded("sliced").eval(), (tokens(),))
    assert module.geonorm_report.dynamic is True
    assert module(tokens(batch=3, seq=4)).shape == (3, 4, 8)
    with pytest.raises(InputShapeError, match=r"'ids' dim 1 has size 7.*accepts sizes 0\.\.6"):
        module(tokens(seq=7))


def test_dynamic_dims_are_not_checked_and_the_module_still_re_exports():
    torch.manual_seed(0)
    model = Stack(PreNormBlock, depth=1).eval()
    module = gf.convert(model, (tokens(),))
    with torch.no_grad():
        torch.testing.assert_close(module(tokens(batch=5, seq=3)), gf.convert(model, (tokens(),))(tokens(5, 3)))
    again = gf.convert(module, (tokens(),))
    assert again.geonorm_report.dynamic is True and again.geonorm_report.sites == []
    assert again(tokens(batch=3, seq=9)).shape == (3, 9, 32)


class _Chunked(nn.Module):
    """Two pre blocks beside a reshape into chunks of 4 tokens: torch.export keeps the sequence dynamic but
    guards it to a multiple of 4 (a relation, not a fixed size or a bound)."""

    def __init__(self, d=8):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(2))
        self.fs = nn.ModuleList(nn.Linear(d, d) for _ in range(2))

    def forward(self, x):
        b, t, d = x.shape
        chunks = x.reshape(b, t // 4, 4, d).mean(2).repeat_interleave(4, 1)
        for norm, f in zip(self.norms, self.fs):
            x = x + f(norm(x)) + 0 * chunks
        return x


def test_a_relational_shape_guard_is_a_geonorm_error():
    module = gf.convert(_Chunked().eval(), (torch.randn(2, 8, 8),))
    assert module.geonorm_report.dynamic_dims == {"x": [0, 1]}
    assert module(torch.randn(3, 12, 8)).shape == (3, 12, 8)
    with pytest.raises(gf.InputShapeError, match="does not accept these input sizes"):
        module(torch.randn(3, 7, 8))
