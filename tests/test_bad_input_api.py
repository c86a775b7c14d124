"""Bad and unusual inputs to the Python API (``inspect`` / ``convert`` / ``install`` / ``load_updates``): each gets a
typed ``GeoNormError`` that says what was wrong and what to do, or a correct result, and the source model is never
mutated. (The command line: tests/test_bad_input_cli.py; exporters and the math: tests/test_bad_input_exporters.py.)"""
from __future__ import annotations

import copy
import math
import threading
import warnings

import pytest
import torch
from torch import nn

import geonorm_fx as gf

from .tiny import PreNormBlock, Stack, tokens


class _Counted(Stack):
    """Counts its forward calls (a class attribute: also copies and captures count)."""

    calls = 0

    def forward(self, ids):
        type(self).calls += 1
        return super().forward(ids)


def _model():
    return _Counted(PreNormBlock, depth=2).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return set(model.state_dict()) == set(state) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


BAD_SCHEDULES = [
    ("cubic", "unknown schedule"),
    (lambda k: 1.0, "does not take two arguments"),
    (lambda k, n, extra: 1.0, "does not take two arguments"),
    (lambda k, n: 1 / 0, "raised ZeroDivisionError"),
    (lambda k, n: "fast", "not a number"),
    (lambda k, n: float("inf"), "not finite"),
    ([1.0, float("nan")], "not finite"),
    ([1.0, "x"], "not a number"),
    (42, "must be a name"),
    (None, "must be a name"),
]


@pytest.mark.parametrize("entry", ["inspect", "convert", "install"])
@pytest.mark.parametrize("schedule,message", BAD_SCHEDULES, ids=[f"schedule{i}" for i in range(len(BAD_SCHEDULES))])
def test_a_bad_schedule_is_refused_before_any_capture(entry, schedule, message):
    model = _model()
    state = _state(model)
    _Counted.calls = 0
    fn = {"inspect": gf.inspect, "convert": gf.convert, "install": gf.install}[entry]
    with pytest.raises(gf.ScheduleError, match=message):
        fn(model, (tokens(),), schedule=schedule)
    assert _Counted.calls == 0  # refused before the model ran or was traced
    assert _same(model, state) and not hasattr(model, "geonorm")


def test_a_sequence_schedule_of_the_wrong_length_names_both_lengths():
    with pytest.raises(gf.ScheduleError, match="3 values but the model has 2 blocks"):
        gf.convert(_model(), (tokens(),), schedule=[1.0, 0.5, 0.25])


@pytest.mark.parametrize("kwargs,error,message", [
    ({"clamp": 0.0}, gf.InvalidInputError, "clamp"),
    ({"clamp": -1.0}, gf.InvalidInputError, "clamp"),
    ({"clamp": float("nan")}, gf.InvalidInputError, "clamp"),
    ({"clamp": 4.0}, gf.InvalidInputError, "clamp"),
    ({"kinds": ["pre", "residual"]}, gf.InvalidInputError, "unknown site kind"),
    ({"kinds": 3}, gf.InvalidInputError, "kinds"),
    ({"tracer": "jit"}, gf.InvalidInputError, "tracer"),
    ({"copy": "no"}, gf.InvalidInputError, "copy"),
])
def test_convert_argument_errors_change_nothing(kwargs, error, message):
    model = _model()
    state = _state(model)
    with pytest.raises(error, match=message):
        gf.convert(model, (tokens(),), **kwargs)
    assert _same(model, state)


@pytest.mark.parametrize("args,kwargs", [("ids", None), ((tokens(),), ["not", "a", "dict"]), ({"x": 1}, None)])
def test_example_inputs_of_the_wrong_kind(args, kwargs):
    for fn in (gf.inspect, gf.convert, gf.install):
        with pytest.raises(gf.InvalidInputError):
            fn(_model(), args, kwargs)


@pytest.mark.parametrize("thing", [None, 3, "model", torch.randn(2, 2), [nn.Linear(2, 2)]])
def test_install_needs_a_module(thing):
    with pytest.raises(gf.InvalidInputError, match="install needs a torch.nn.Module"):
        gf.install(thing, (tokens(),))


def test_install_refuses_a_converted_module_and_a_second_install():
    model = _model()
    converted = gf.convert(model, (tokens(),))
    with pytest.raises(gf.InvalidInputError, match="already a captured graph"):
        gf.install(converted, (tokens(),))
    gf.install(model, (tokens(),), backend="eager")
    with pytest.raises(gf.InvalidInputError, match="already has GeoNorm installed"):
        gf.install(model, (tokens(),), backend="eager")


def test_install_refuses_a_replaced_forward():
    model = _model()
    model.forward = lambda ids: ids
    with pytest.raises(gf.InvalidInputError, match="replaced on the instance"):
        gf.install(model, (tokens(),))


def test_install_with_inputs_the_model_cannot_take_changes_nothing():
    model = _model()
    state = _state(model)
    with pytest.raises(gf.GeoNormError):
        gf.install(model, (torch.randn(2, 3, 4),), backend="eager")
    assert _same(model, state) and not hasattr(model, "geonorm") and "forward" not in model.__dict__


@pytest.mark.parametrize("source,error,message", [
    ("/nonexistent/geonorm/dir", gf.InvalidInputError, "does not exist"),
    (42, gf.InvalidInputError, "directory, a file or a state_dict"),
    ({"geonorm.bogus.scale": torch.ones(1)}, gf.ConversionError, "do not fit"),
])
def test_load_updates_bad_sources(source, error, message):
    model = _model()
    gf.install(model, (tokens(),), backend="eager")
    state = _state(model)
    with pytest.raises(error, match=message):
        gf.load_updates(model, source)
    assert _same(model, state)


def test_load_updates_from_an_empty_or_corrupt_folder(tmp_path):
    model = _model()
    gf.install(model, (tokens(),), backend="eager")
    with pytest.raises(gf.InvalidInputError, match="no \\*.safetensors"):
        gf.load_updates(model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(gf.InvalidInputError, match="could not read"):
        gf.load_updates(model, tmp_path)


def test_two_threads_converting_at_once_both_succeed():
    results, errors = [], []

    def work(seed):
        try:
            torch.manual_seed(seed)
            results.append(gf.convert(Stack(PreNormBlock, depth=2).eval(), (tokens(),)).geonorm_report.counts())
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [{"pre": 4}] * 3


class _ValueBranch(nn.Module):
    """Python control flow on a tensor value: neither torch.export nor symbolic_trace can follow it."""

    def __init__(self):
        super().__init__()
        self.norm, self.f = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return x + self.f(self.norm(x))
        return x


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_capture_advice_does_not_go_in_a_circle(tracer):
    with pytest.raises(gf.CaptureError) as info:
        gf.convert(_ValueBranch(), (torch.randn(2, 3, 8),), tracer=tracer)
    message = str(info.value)
    assert "torch.cond" in message and "gf.install" in message
    if tracer == "export":  # the export error does not send the user to fx, whose error sends them back
        assert "try tracer='fx'" not in message and "only helps when the branch reads no tensor" in message


class _LayerDrop(nn.Module):
    """Wav2Vec2-style LayerDrop: in training a layer is skipped when a random draw says so (data-dependent)."""

    def __init__(self, d=16, n=2, p=0.1):
        super().__init__()
        self.blocks = nn.ModuleList(PreNormBlock(d) for _ in range(n))
        self.p = p

    def forward(self, x):
        for block in self.blocks:
            if self.training and bool(torch.rand(()) < self.p):
                continue
            x = block(x)
        return x


def test_a_train_mode_forward_that_cannot_be_captured_falls_back_to_the_eval_graph_with_a_warning():
    model = _LayerDrop().train()
    x = torch.randn(2, 5, 16)
    with pytest.warns(gf.GeoNormWarning, match="train-mode forward could not be captured"):
        converted = gf.convert(model, (x,))
    assert converted.geonorm_report.counts() == {"pre": 4}
    converted.train()
    out = converted(x)
    out.sum().backward()
    assert all(p.grad is not None for n, p in converted.named_parameters() if n.startswith("geonorm."))
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), converted.train()(x))  # the same graph (no dropout in it)


def test_hooks_that_convert_cannot_keep_are_named_in_a_warning_and_install_runs_them():
    model = Stack(PreNormBlock, depth=2).eval()
    seen = []

    def record(module, inputs, output):
        seen.append(output.shape)

    model.blocks[0].register_forward_hook(record)
    with pytest.warns(gf.GeoNormWarning, match="forward hook .*record on blocks.0"):
        gf.convert(model, (tokens(),))
    with warnings.catch_warnings():
        warnings.simplefilter("error", gf.GeoNormWarning)
        gf.install(model, (tokens(),), backend="eager")
    seen.clear()
    with torch.no_grad():
        model(tokens())
    assert len(seen) == 1  # the installed model runs its hook on every call


def test_inspect_of_a_model_that_fails_leaves_its_modes():
    model = _ValueBranch().train()
    model.norm.eval()
    with pytest.raises(gf.CaptureError):
        gf.inspect(model, (torch.randn(2, 3, 8),))
    assert model.training and not model.norm.training and model.f.training


def test_geodesic_update_rejects_bad_construction():
    for kwargs in ({"decay": float("nan")}, {"clamp": 0.0}, {"dim": 0}, {"dim": 1.5}):
        with pytest.raises(gf.InvalidInputError):
            gf.GeodesicUpdate(**kwargs)
    assert math.isfinite(gf.GeodesicUpdate(decay=0.5).decay)


def test_a_converted_module_called_with_the_wrong_rank_names_the_input():
    converted = gf.convert(_model(), (tokens(),))
    with pytest.raises(gf.InputShapeError, match="dims"):
        converted(torch.zeros(2, 3, 4, dtype=torch.long))


def test_a_deep_copy_of_an_installed_model_is_independent():
    model = _model()
    gf.install(model, (tokens(),), backend="eager")
    twin = copy.deepcopy(model)
    assert twin.forward.module is twin and twin.geonorm is not model.geonorm


def test_an_output_structure_that_depends_on_the_mode_is_rebuilt_per_mode():
    """XLNet returns its memory (``mems``) in eval mode only: each mode's graph rebuilds its own structure."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.XLNetConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, d_inner=64)
    model = transformers.XLNetLMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = gf.convert(model, (ids,))
    other = torch.randint(0, 64, (3, 10))
    with torch.no_grad():
        eval_out = converted(other)
        train_out = converted.train()(other)
    assert eval_out.mems is not None and len(eval_out.mems) == 2
    assert train_out.mems is None and train_out.logits.shape == (3, 10, 64)
