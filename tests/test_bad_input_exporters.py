"""Bad input to the update and the exporters: each case gets a typed ``gf.GeoNormError`` that names what was
wrong and what to do (or a correct result), nothing is lost, and the caller's model and inputs are unchanged.

Covers ``gf.geodesic_step`` at huge scales and its argument checks, ``export_onnx`` (external-data threshold,
stale ``.data`` files, opset / path / argument checks, atomic writes) and ``export_aot`` / ``load_aot``."""
import math
import os
import re

import pytest
import torch
from torch import nn

import geonorm_fx as gf
from geonorm_fx.errors import InvalidInputError
from geonorm_fx.geodesic import R2_FLOOR, R_FLOOR, V_FLOOR, GeodesicUpdate

from .reference import reference_geodesic


def _pair(*shape, x_scale=1.0, s_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return x_scale * torch.randn(*shape, generator=g), s_scale * torch.randn(*shape, generator=g)


def _relative_gap(out, x):
    """max over tokens of | |out| - |x| | / |x|, in float64."""
    out, x = out.detach().double(), x.detach().double()
    xn = x.norm(dim=-1)
    return float(((out.norm(dim=-1) - xn).abs() / xn).max())


def _relative_error(out, ref):
    """max over tokens of |out - ref| / |ref|, in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float(((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


def _unscaled_step(x, s, scale=1.0, bias=0.0, decay=1.0, clamp=math.pi / 4):
    """The float32 formula before the per-token scaling (the autograd path of geodesic_step as it was)."""
    xf, sf = x.float(), s.float()
    radius_raw = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    r2_safe = (radius_raw * radius_raw).clamp_min(R2_FLOOR)
    radius = radius_raw.clamp_min(math.sqrt(R2_FLOOR))
    along = torch.linalg.vecdot(xf, sf, dim=-1).unsqueeze(-1) / r2_safe
    v = torch.addcmul(sf, along, xf, value=-1.0)
    v_raw = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    v_norm = v_raw.clamp_min(V_FLOOR)
    theta = ((scale * torch.clamp(v_norm / radius, max=clamp) + bias) * decay).clamp(-clamp, clamp)
    parallel, empty = v_raw < V_FLOOR, radius_raw < R_FLOOR
    a = torch.where(empty, 1.0 + along, torch.where(parallel, 1.0, torch.cos(theta)))
    b = torch.where(empty, 1.0, torch.where(parallel, 0.0, torch.sin(theta) * radius / v_norm))
    return torch.addcmul(a * xf, b, v)


# ---------------------------------------------------------------------------------------------------------------
# geodesic_step: huge states (|x| >= ~1.8e19 used to overflow the float32 squares into NaN)

@pytest.mark.parametrize("x_scale", [1e19, 1e25, 1e30])
@pytest.mark.parametrize("grad", [True, False])
def test_huge_states_give_finite_exact_results(x_scale, grad):
    x, s = _pair(3, 5, 64, x_scale=x_scale, seed=1)
    with torch.set_grad_enabled(grad):
        out = gf.geodesic_step(x, s, bias=0.05, decay=0.7)
    assert torch.isfinite(out).all()
    assert _relative_gap(out, x) <= 1e-5                      # the norm invariant at huge scales
    assert _relative_error(out, reference_geodesic(x, s, bias=0.05, decay=0.7)) <= 1e-5


@pytest.mark.parametrize("x_scale,s_scale", [(1e19, 1.0), (1e30, 1.0), (1e25, 1e25), (1.0, 1e25)])
def test_huge_inputs_give_finite_gradients_matching_float64(x_scale, s_scale):
    x, s = _pair(2, 4, 32, x_scale=x_scale, s_scale=s_scale, seed=2)
    w = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(3))
    xf, sf = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    (gf.geodesic_step(xf, sf, decay=0.5, bias=0.1) * w).sum().backward()
    xd, sd = x.double().requires_grad_(True), s.double().requires_grad_(True)
    (reference_geodesic(xd, sd, decay=0.5, bias=0.1) * w.double()).sum().backward()
    for got, ref in ((xf.grad, xd.grad), (sf.grad, sd.grad)):
        assert torch.isfinite(got).all()
        assert float((got.double() - ref).norm() / ref.norm()) <= 1e-4


def test_mixed_huge_and_ordinary_tokens():
    x, s = _pair(2, 8, 48, seed=4)
    x = x * torch.logspace(-3, 30, 8).view(1, 8, 1)        # one token per scale, from 1e-3 to 1e30
    s = s * torch.logspace(0, 20, 8).flip(0).view(1, 8, 1)
    x.requires_grad_(True)
    out = gf.geodesic_step(x, s)
    (out * torch.randn_like(out)).sum().backward()
    out = out.detach()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert _relative_gap(out, x) <= 1e-5
    assert _relative_error(out, reference_geodesic(x.detach(), s)) <= 1e-5
    with torch.no_grad():                                    # the one-buffer inference path agrees
        assert _relative_error(gf.geodesic_step(x, s), out.detach()) <= 1e-6


def test_tokens_within_one_are_computed_exactly_as_before():
    # a = max(max|x|, max|s|, 1) == 1: the scaling divides and multiplies by exactly 1, bit for bit
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(6, 7, 40, generator=g) * 2 - 1) * torch.logspace(-7, 0, 7).view(1, 7, 1)
    s = (torch.rand(6, 7, 40, generator=g) * 2 - 1) * 0.5
    x[0, 0] = 0.0                                              # R < 1e-6: x + s
    s[1, 1] = -0.5 * x[1, 1]                                   # parallel: x
    for kwargs in ({}, {"decay": 0.3, "bias": 0.1, "scale": 2.0}):
        assert torch.equal(gf.geodesic_step(x, s, **kwargs), _unscaled_step(x, s, **kwargs))


def test_ordinary_tokens_match_the_float64_formula_and_the_unscaled_formula_bit_for_bit():
    x, s = _pair(4, 6, 64, x_scale=3.0, s_scale=0.7, seed=6)   # values above 1: scaled, rounding only
    before = _unscaled_step(x, s, decay=0.5)
    out = gf.geodesic_step(x, s, decay=0.5)
    torch.testing.assert_close(out, reference_geodesic(x, s, decay=0.5), atol=1e-5, rtol=1e-5)
    # the scales are powers of two, so scaling is exact: bit for bit the unscaled formula wherever it did not
    # overflow (a ranking of tokens by norm, e.g. token pruning, comes out the same)
    assert torch.equal(out, before)
    for x_scale, s_scale in ((1e3, 1e-3), (1e6, 1e5), (1e-4, 1e8)):
        x, s = _pair(3, 5, 48, x_scale=x_scale, s_scale=s_scale, seed=9)
        assert torch.equal(gf.geodesic_step(x, s, decay=0.7), _unscaled_step(x, s, decay=0.7))


def test_huge_branch_output_on_a_small_state():
    x, s = _pair(2, 3, 32, x_scale=1e-2, s_scale=1e22, seed=7)
    out = gf.geodesic_step(x, s)
    assert torch.isfinite(out).all() and _relative_gap(out, x) <= 1e-5
    assert _relative_error(out, reference_geodesic(x, s)) <= 1e-5


def test_geodesic_update_module_at_huge_scale_trains():
    update = GeodesicUpdate(decay=0.5)
    x, s = _pair(2, 4, 16, x_scale=1e28, seed=8)
    x.requires_grad_(True)
    out = update(x, s)
    (out / 1e28).sum().backward()
    assert torch.isfinite(out).all() and _relative_gap(out, x) <= 1e-5
    for t in (x.grad, update.scale.grad, update.bias.grad):
        assert t is not None and torch.isfinite(t).all()


def test_exported_step_handles_huge_states():
    # torch.export takes the vecdot + sqrt norms (the ONNX / AOTInductor path); no data-dependent branch
    update = GeodesicUpdate(decay=0.5).eval()
    x, s = _pair(2, 5, 16, seed=9)
    program = torch.export.export(update, (x, s), strict=False)
    for scale in (1.0, 1e25):
        xs = x * scale
        out = program.module()(xs, s)
        assert torch.isfinite(out).all() and _relative_gap(out, xs) <= 1e-5
        torch.testing.assert_close(out, update(xs, s), rtol=1e-5, atol=0)


def test_onnx_step_handles_huge_states(tmp_path):
    pytest.importorskip("onnxruntime")
    from geonorm_fx.exporters import export_onnx, ort_session

    update = GeodesicUpdate(decay=0.5).eval()
    x, s = _pair(2, 5, 16, seed=10)
    result = export_onnx(update, (x, s), str(tmp_path / "step.onnx"))
    session = ort_session(result.path)
    names = [i.name for i in session.get_inputs()]
    xs = x * 1e25
    out = torch.from_numpy(session.run(None, dict(zip(names, (xs.numpy(), s.numpy()))))[0])
    assert torch.isfinite(out).all() and _relative_gap(out, xs) <= 1e-5
    torch.testing.assert_close(out, update(xs, s).detach(), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# geodesic_step: argument checks

@pytest.mark.parametrize("clamp", [0.0, -0.1, float("nan"), float("inf"), math.pi + 1e-6, 4, "pi/4", None, True])
def test_bad_clamp_names_the_value_and_the_range(clamp):
    x, s = _pair(2, 8)
    with pytest.raises(InvalidInputError, match=r"clamp must be an angle in \(0, pi\].*got " + re.escape(repr(clamp))):
        gf.geodesic_step(x, s, clamp=clamp)


@pytest.mark.parametrize("clamp", [math.pi, 1, 1e-3])
def test_clamp_at_the_edges_of_the_range_works(clamp):
    x, s = _pair(2, 8, s_scale=5.0)
    out = gf.geodesic_step(x, s, clamp=clamp)
    assert _relative_gap(out, x) <= 1e-5


def test_geodesic_update_rejects_a_string_clamp_and_decay():
    with pytest.raises(InvalidInputError, match="clamp must be an angle"):
        GeodesicUpdate(clamp="abc")
    with pytest.raises(InvalidInputError, match="decay must be a finite real number"):
        GeodesicUpdate(decay="abc")


@pytest.mark.parametrize("dim", [2, -3, 1.0, "x", True, None])
def test_bad_dim_names_the_allowed_range(dim):
    x, s = _pair(2, 8)
    with pytest.raises(InvalidInputError, match=r"dim must be an int in \[-2, 1\].*got"):
        gf.geodesic_step(x, s, dim=dim)


def test_positive_dim_in_range_works():
    x, s = _pair(8, 3)                                         # features first
    torch.testing.assert_close(gf.geodesic_step(x, s, dim=0), gf.geodesic_step(x.T, s.T).T)


@pytest.mark.parametrize("x,s", [
    (torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4)),
    (torch.ones(2, 4), torch.ones(2, 4, dtype=torch.int32)),
    (torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)),
    ([[1.0, 2.0]], torch.ones(1, 2)),
    (torch.tensor(1.0), torch.tensor(2.0)),
])
def test_non_floating_or_featureless_inputs_are_rejected(x, s):
    with pytest.raises(InvalidInputError, match="geodesic_step needs"):
        gf.geodesic_step(x, s)


def test_step_leaves_its_inputs_alone():
    x, s = _pair(2, 3, 8, x_scale=1e25)
    x0, s0 = x.clone(), s.clone()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            gf.geodesic_step(x, s)
    assert torch.equal(x, x0) and torch.equal(s, s0)


# ---------------------------------------------------------------------------------------------------------------
# export_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from geonorm_fx.exporters import export_aot, export_onnx, load_aot  # noqa: E402
from geonorm_fx.exporters import onnx as onnx_exporter  # noqa: E402
from geonorm_fx.exporters.onnx import tensor_bytes  # noqa: E402


class Tiny(nn.Module):
    """LayerNorm + Linear with a 300-float buffer (1200 bytes) and 272 bytes of parameters."""

    def __init__(self):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(4), nn.Linear(4, 4)
        self.register_buffer("table", torch.linspace(-1, 1, 300))

    def forward(self, x):
        return self.proj(self.norm(x)) + self.table[:4]


class Fails(nn.Module):
    def forward(self, x):
        raise RuntimeError("this module cannot be exported")


def _x():
    return torch.randn(2, 3, 4)


def _valid_onnx(path):
    onnx.checker.check_model(onnx.load(path))
    from geonorm_fx.exporters import ort_session

    return ort_session(path)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model.training


def _unchanged(model, snap):
    state, training = snap
    return model.training == training and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_tensor_bytes_counts_buffers_and_each_storage_once():
    model = Tiny()
    assert tensor_bytes(model) == 4 * (4 + 4 + 16 + 4) + 4 * 300       # params + buffer
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert tensor_bytes(tied) == 4 * 40


def test_external_data_threshold_counts_buffers(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_exporter, "EXTERNAL_DATA_BYTES", 1000)   # params 112 bytes, buffer 1200
    path = str(tmp_path / "tiny.onnx")
    result = export_onnx(Tiny(), (_x(),), path)
    assert os.path.exists(path + ".data")
    assert result.size_bytes == os.path.getsize(path) + os.path.getsize(path + ".data")
    assert result.max_abs_diff < 1e-5                                     # the weights are found and used


def test_stale_data_file_is_removed_and_not_counted(tmp_path):
    path = str(tmp_path / "tiny.onnx")
    export_onnx(Tiny(), (_x(),), path, external_data=True)
    assert os.path.exists(path + ".data")
    result = export_onnx(Tiny(), (_x(),), path, external_data=False)
    assert not os.path.exists(path + ".data")
    assert result.size_bytes == os.path.getsize(path)
    _valid_onnx(path)


def test_unrelated_stale_data_file_is_removed(tmp_path):
    path = tmp_path / "tiny.onnx"
    (tmp_path / "tiny.onnx.data").write_bytes(b"x" * 10_000)
    result = export_onnx(Tiny(), (_x(),), str(path), verify=False)
    assert not (tmp_path / "tiny.onnx.data").exists() and result.size_bytes == path.stat().st_size


@pytest.mark.parametrize("opset,match", [("abc", "opset must be an integer"), (18.5, "opset must be an integer"),
                                         (18.0, "opset must be an integer"), (True, "opset must be an integer"),
                                         (17, "opset 17 is too old"), (-1, "opset -1 is too old")])
def test_bad_opset(opset, match, tmp_path):
    with pytest.raises(InvalidInputError, match=match):
        export_onnx(Tiny(), (_x(),), str(tmp_path / "x.onnx"), opset=opset)
    assert not os.listdir(tmp_path)


def test_directory_path_is_refused_before_export(tmp_path):
    (tmp_path / "out.onnx").mkdir()
    for path in (tmp_path, tmp_path / "out.onnx", str(tmp_path / "new") + "/"):
        with pytest.raises(InvalidInputError, match=rf"{os.fspath(path)}.* is a directory"):
            export_onnx(Fails(), (_x(),), path)                       # refused before the export could fail


def test_parent_that_cannot_be_created_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    path = tmp_path / "file" / "sub" / "model.onnx"
    with pytest.raises(InvalidInputError, match=rf"cannot create the folder .*{path}"):
        export_onnx(Fails(), (_x(),), str(path))


def test_unwritable_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        with pytest.raises(InvalidInputError, match=rf"cannot write the ONNX file at {folder}/m.onnx.*not writable"):
            export_onnx(Fails(), (_x(),), str(folder / "m.onnx"))
    finally:
        folder.chmod(0o700)


def test_unwritable_folder_is_refused_even_as_root(tmp_path, monkeypatch):
    # the same check with the permission answer forced, so it runs where chmod cannot stop root
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, *a, **k: os.fspath(p) != str(tmp_path) and real(p, *a, **k))
    with pytest.raises(InvalidInputError, match="not writable; choose another path"):
        export_onnx(Fails(), (_x(),), str(tmp_path / "m.onnx"))


@pytest.mark.parametrize("path", ["", None, 3])
def test_non_path_is_refused(path):
    with pytest.raises(InvalidInputError, match="path for the ONNX file"):
        export_onnx(Tiny(), (_x(),), path)


def test_failed_export_leaves_the_earlier_file(tmp_path):
    path = tmp_path / "model.onnx"
    export_onnx(Tiny(), (_x(),), str(path))
    good = path.read_bytes()
    with pytest.raises(gf.GeoNormError, match="(?s)could not export Fails.*cannot be exported"):
        export_onnx(Fails(), (_x(),), str(path))
    assert path.read_bytes() == good
    _valid_onnx(str(path))
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]                  # no staging folder left behind


def test_failed_write_leaves_the_earlier_file(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    export_onnx(Tiny(), (_x(),), str(path))
    good = path.read_bytes()

    def broken_save(self, destination, **kwargs):
        with open(destination, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", broken_save)
    with pytest.raises(gf.GeoNormError, match=r"could not write the ONNX file .*No space left"):
        export_onnx(Tiny(), (_x(),), str(path))
    assert path.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["model.onnx"]
    _valid_onnx(str(path))


def test_pathlike_path_is_accepted(tmp_path):
    result = export_onnx(Tiny(), (_x(),), tmp_path / "sub" / "model.onnx", verify=False)
    assert result.path == str(tmp_path / "sub" / "model.onnx")
    _valid_onnx(result.path)


@pytest.mark.parametrize("module,args,kwargs,match", [
    ("model", (torch.randn(2, 4),), None, "needs an nn.Module, got str"),
    (nn.Linear(4, 4).state_dict(), (torch.randn(2, 4),), None, "needs an nn.Module"),
    (nn.Linear(4, 4), "abc", None, "args must be a tuple"),
    (nn.Linear(4, 4), 3, None, "args must be a tuple"),
    (nn.Linear(4, 4), {"x": torch.randn(2, 4)}, None, "args must be a tuple"),
    (nn.Linear(4, 4), (torch.randn(2, 4),), [1, 2], "kwargs must be a dict"),
])
def test_bad_module_args_kwargs(module, args, kwargs, match, tmp_path):
    with pytest.raises(InvalidInputError, match=match):
        export_onnx(module, args, str(tmp_path / "x.onnx"), kwargs=kwargs)


def test_export_leaves_the_model_and_inputs_alone(tmp_path):
    model = Tiny().train()
    x = _x()
    snap, x0 = _snapshot(model), x.clone()
    export_onnx(model, (x,), str(tmp_path / "ok.onnx"))
    assert _unchanged(model, snap) and torch.equal(x, x0)

    def refuse(*_):
        raise RuntimeError("this hook refuses")

    model.norm.register_forward_hook(refuse)
    with pytest.raises(gf.GeoNormError):
        export_onnx(model, (x,), str(tmp_path / "bad.onnx"))
    assert _unchanged(model, snap) and torch.equal(x, x0)


# ---------------------------------------------------------------------------------------------------------------
# export_aot / load_aot

def _expect_load_error(path, match):
    with pytest.raises(gf.GeoNormError, match=match) as info:
        load_aot(path)
    assert str(path) in str(info.value)
    assert not isinstance(info.value, RuntimeError)
    return info.value


def test_load_aot_missing(tmp_path):
    _expect_load_error(tmp_path / "none.pt2", "no AOT package at .*write one with export_aot")


def test_load_aot_empty(tmp_path):
    (tmp_path / "empty.pt2").write_bytes(b"")
    _expect_load_error(tmp_path / "empty.pt2", "is empty.*write it again with export_aot")


def test_load_aot_corrupt(tmp_path):
    path = tmp_path / "junk.pt2"
    path.write_bytes(os.urandom(4096))
    error = _expect_load_error(path, "could not load the AOT package .*corrupt.*write it again with export_aot")
    assert error.__cause__ is not None                                         # the cause is kept


def test_load_aot_directory(tmp_path):
    _expect_load_error(tmp_path, "is a directory, not an AOT package")


def test_load_aot_warns_about_native_code():
    assert "native code" in load_aot.__doc__ and "trust" in load_aot.__doc__


def test_export_aot_refuses_a_directory_before_compiling(tmp_path):
    (tmp_path / "model.pt2").mkdir()
    with pytest.raises(InvalidInputError, match=r"model\.pt2 is a directory"):
        export_aot(Fails(), (_x(),), str(tmp_path / "model.pt2"))


def test_export_aot_refuses_a_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(InvalidInputError, match=r"cannot create the folder .*file/sub"):
        export_aot(Fails(), (_x(),), str(tmp_path / "file" / "sub" / "model.pt2"))


@pytest.mark.parametrize("path", ["model.zip", None, 3])
def test_export_aot_refuses_a_path_without_pt2(path):
    with pytest.raises(InvalidInputError, match=r"end in \.pt2"):
        export_aot(Tiny(), (_x(),), path)
