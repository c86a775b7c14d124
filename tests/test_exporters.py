"""Deployment: ONNX export verified in ONNX Runtime, torch.compile parity, the AOTInductor package."""
from collections import Counter

import pytest
import torch

import geonorm_fx as gf
from geonorm_fx import zoo

from .stacks import MixedStack
from .tiny import tokens

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from geonorm_fx.exporters import (VerificationError, compile_model, export_aot, export_onnx, kernel_launches, load_aot,  # noqa: E402
                                  ort_session)
from geonorm_fx.exporters.onnx import verify_onnx  # noqa: E402


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    built = zoo.load("hf:llama")
    module = gf.convert(built.model, built.args)
    path = str(tmp_path_factory.mktemp("onnx") / "llama.onnx")
    return built, module, export_onnx(module, built.args, path)


@pytest.mark.parametrize("spec", ["hf:gpt2", "hf:bert", "hf:t5"])
def test_onnx_parity_in_onnx_runtime(spec, tmp_path):
    built = zoo.load(spec)
    module = gf.convert(built.model, built.args)
    result = export_onnx(module, built.args, str(tmp_path / "model.onnx"))
    assert result.providers == ["CPUExecutionProvider"]
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert result.checked_shapes == [[(2, 8)], [(3, 10)]]  # the example and another batch / sequence size
    assert result.opset == 18 and result.size_bytes > 0


def test_llama_onnx_parity_and_clean_graph(llama_onnx):
    built, module, result = llama_onnx
    assert result.max_abs_diff < 1e-4 and len(result.checked_shapes) == 2
    model = onnx.load(result.path)
    onnx.checker.check_model(model)
    ops = Counter(n.op_type for n in model.graph.node)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}       # standard ops only
    assert not ops.keys() & {"Dropout", "ATen", "PythonOp"}              # no training-only or fallback nodes
    n_sites = len(module.geonorm_report.sites)
    # |x|^2, <x,s>, |v|^2 as Mul + ReduceSum once per update (ORT's CPU ReduceL2 is ~3x slower); the
    # model's own RMSNorms reduce with ReduceMean
    assert ops["ReduceSum"] == 3 * n_sites and "ReduceL2" not in ops


def test_both_ort_optimisation_levels_load_and_agree(llama_onnx):
    built, _, result = llama_onnx
    feeds = {"input_ids": tokens(3, 11, vocab=128).numpy()}
    full = ort_session(result.path, level="all").run(None, feeds)[0]
    none = ort_session(result.path, level="none").run(None, feeds)[0]
    torch.testing.assert_close(torch.from_numpy(full), torch.from_numpy(none), atol=1e-5, rtol=1e-5)


def test_tampered_file_fails_verification_naming_the_output(llama_onnx, tmp_path):
    built, module, result = llama_onnx
    model = onnx.load(result.path)
    init = max(model.graph.initializer, key=lambda t: t.dims[0] if t.dims else 0)
    array = onnx.numpy_helper.to_array(init) * 3.0
    init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    bad = str(tmp_path / "tampered.onnx")
    onnx.save(model, bad)
    tampered = type(result)(path=bad, opset=result.opset, size_bytes=0)
    with pytest.raises(VerificationError, match=r"disagrees with PyTorch on output 0 .*max \|diff\|"):
        verify_onnx(module, built.args, {}, tampered)


def test_compile_matches_eager_for_inference_and_training():
    torch._dynamo.reset()
    model = MixedStack(["pre", "post", "parallel"], spelling="hand_rms").eval()
    module = gf.convert(model, (tokens(),))
    compiled = compile_model(module)
    other = tokens(3, 7)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(other), module(other), atol=1e-5, rtol=1e-5)
    eager_grads = torch.autograd.grad(module(other).square().mean(), list(module.parameters()))
    compiled_grads = torch.autograd.grad(compiled(other).square().mean(), list(module.parameters()))
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_each_update_fuses_into_the_kernels_the_source_needed():
    # Inductor fuses x + s and the following norm into one kernel; the update (three row reductions and a
    # per-token combination) must fuse the same way, leaving no extra kernel launch at any site kind.
    model = MixedStack(["pre", "post", "respost"], spelling="hand_rms").eval()
    module = gf.convert(model, (tokens(),)).eval()
    assert module.geonorm_report.counts() == {"pre": 2, "post": 2, "respost": 2}
    assert kernel_launches(module, (tokens(),)) <= kernel_launches(model, (tokens(),))


def test_kernel_count_refuses_split_graphs():
    class Breaks(torch.nn.Module):
        def forward(self, x):
            x = x.relu()
            torch._dynamo.graph_break()
            return x + 1
    with pytest.raises(gf.GeoNormError, match="splits Breaks into 2 graphs"):
        kernel_launches(Breaks(), (torch.randn(2, 3),))


def test_aot_package_round_trip_without_the_model_class(tmp_path):
    model = MixedStack(["pre", "sandwich"]).eval()
    module = gf.convert(model, (tokens(),)).eval()
    path = export_aot(module, (tokens(),), str(tmp_path / "model.pt2"))
    runner = load_aot(path)          # needs no MixedStack / GeoNormModule class
    other = tokens(3, 9)
    with torch.no_grad():
        torch.testing.assert_close(runner(other), module(other), atol=1e-5, rtol=1e-5)


def test_exporters_reject_bad_input(tmp_path):
    with pytest.raises(gf.GeoNormError, match="needs an nn.Module"):
        export_onnx("model", (), str(tmp_path / "x.onnx"))
    with pytest.raises(gf.GeoNormError, match="opset 17 is too old"):
        export_onnx(torch.nn.Linear(2, 2), (torch.randn(2, 2),), str(tmp_path / "x.onnx"), opset=17)
    with pytest.raises(gf.GeoNormError, match=r"end in \.pt2"):
        export_aot(torch.nn.Linear(2, 2), (torch.randn(2, 2),), str(tmp_path / "x.zip"))


def test_half_precision_export(tmp_path):
    model = MixedStack(["pre", "post", "sandwich", "parallel"], spelling="hand_rms").half().eval()
    module = gf.convert(model, (tokens(),))
    result = export_onnx(module, (tokens(),), str(tmp_path / "fp16.onnx"))
    assert result.max_abs_diff < 1e-2 and len(result.checked_shapes) == 2   # float16 tolerance
    bf16 = gf.convert(MixedStack(["pre", "post"], spelling="hand_rms").bfloat16().eval(), (tokens(),))
    try:
        assert export_onnx(bf16, (tokens(),), str(tmp_path / "bf16.onnx")).max_abs_diff < 5e-2
    except VerificationError as e:  # ORT's CPU provider lacks some bfloat16 kernels; the error says so
        assert "bfloat16" in str(e)
    assert (tmp_path / "bf16.onnx").exists()



def test_bfloat16_model_compiles_and_matches_eager():
    # the update computes in float32 inside and casts back: compiled and eager bf16 agree to bf16 precision
    torch._dynamo.reset()
    module = gf.convert(MixedStack(["pre", "post"], spelling="hand_rms").bfloat16().eval(), (tokens(),))
    with torch.no_grad():
        eager = module(tokens(3, 7))
        compiled = compile_model(module)(tokens(3, 7))
    assert eager.dtype == compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled.float(), eager.float(), atol=5e-2, rtol=2e-2)
