"""Cached decoding in ONNX Runtime (``export_decoder`` / ``generate_onnx`` / ``examples/serve_onnx.py``), ONNX
output names from the output structure, and export errors that keep their cause."""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from torch import nn

import geonorm_fx as gf
from geonorm_fx.exporters import export_decoder, export_onnx, generate_onnx, ort_session
from geonorm_fx.exporters.decoder import decoder_inputs
from tests.install_models import causal_lm, perturb_updates

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    spec = importlib.util.spec_from_file_location("serve_onnx", os.path.join(ROOT, "examples", "serve_onnx.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_onnx_example_generates_the_same_32_tokens_as_pytorch(tmp_path):
    result = _example().serve("llama", 32, str(tmp_path))
    assert result["onnx"].shape == (2, 8 + 32)
    assert torch.equal(result["onnx"], result["torch"])
    exported = result["export"]
    assert exported.input_names[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert exported.output_names[:3] == ["logits", "present.0.key", "present.0.value"]
    assert [c["past"] for c in exported.checked] == [5, 9] and exported.max_abs_diff < 1e-4
    # the file computes the GeoNorm model, not the source: its logits differ from the source model's
    source, prompt = causal_lm("llama")
    session = ort_session(exported.path)
    inputs = decoder_inputs(source, 2, 3, 5)
    got = session.run(["logits"], {n: t.numpy() for n, t in zip(exported.input_names, inputs)})[0]
    from transformers import DynamicCache

    past = inputs[3:]
    cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(exported.n_layers)])
    with torch.no_grad():
        plain = source(input_ids=inputs[0], attention_mask=inputs[1], position_ids=inputs[2], cache=cache).logits
    assert (torch.from_numpy(got) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_decoder_export_verifies_at_two_past_lengths(name, tmp_path):
    model, ids = causal_lm(name)
    gf.install(model, (ids,), backend="eager")
    perturb_updates(model)
    exported = export_decoder(model, str(tmp_path / "decoder.onnx"))
    assert exported.n_layers == 2 and len(exported.output_names) == 1 + 2 * 2
    assert exported.max_abs_diff < 1e-4
    tokens = generate_onnx(exported.path, ids[:1], 6)
    with torch.no_grad():
        assert torch.equal(tokens, model.generate(ids[:1], max_new_tokens=6, do_sample=False))


def test_a_converted_model_is_served_through_install_and_load_updates(tmp_path):
    model, ids = causal_lm("llama")
    converted = gf.convert(copy.deepcopy(model), (ids,), {"use_cache": False})
    perturb_updates(converted)
    gf.install(model, (ids,), backend="eager")
    gf.load_updates(model, converted)
    exported = export_decoder(model, str(tmp_path / "decoder.onnx"))
    tokens = generate_onnx(exported.path, ids, 8)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, converted(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, seq)


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        return self.f(x), {"gate": torch.sigmoid(x)}


def test_onnx_output_names_follow_the_output_structure(tmp_path):
    import onnx

    model, ids = causal_lm("llama")
    model.config.use_cache = False
    converted = gf.convert(model, (ids,))
    result = export_onnx(converted, (ids,), str(tmp_path / "lm.onnx"))
    assert [o.name for o in onnx.load(result.path).graph.output] == ["logits"]
    result = export_onnx(_Pair().eval(), (torch.randn(2, 4),), str(tmp_path / "pair.onnx"))
    assert [o.name for o in onnx.load(result.path).graph.output] == ["output_0", "output_1.gate"]
    result = export_onnx(nn.Linear(4, 3).eval(), (torch.randn(2, 4),), str(tmp_path / "one.onnx"))
    assert [o.name for o in onnx.load(result.path).graph.output] == ["output"]


@torch.library.custom_op("geonorm_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_opaque.register_fake
def _(x):
    return torch.empty_like(x)


class _Untranslatable(nn.Module):
    def forward(self, x):
        return _opaque(x) + 1


def test_export_errors_keep_the_cause(tmp_path):
    with pytest.raises(gf.GeoNormError) as info:
        export_onnx(_Untranslatable(), (torch.randn(2, 3),), str(tmp_path / "bad.onnx"))
    message = str(info.value)
    assert "torch.onnx could not export _Untranslatable" in message
    assert "geonorm_test" in message and "opaque" in message   # the op the exporter could not translate
    assert "\x1b[" not in message
    assert len(message.splitlines()) > 1   # not cut to its first line


def test_the_cached_decoder_as_an_aot_package(tmp_path):
    from geonorm_fx.exporters import export_decoder_aot, load_aot

    model, ids = causal_lm("llama")
    gf.install(model, (ids,), backend="eager")
    perturb_updates(model)
    path = export_decoder_aot(model, str(tmp_path / "decoder.pt2"))   # verified at past lengths 5 and 9
    runner = load_aot(path)
    inputs = decoder_inputs(model, 1, 4, 6, seed=11)
    logits = runner(*inputs)[0]
    from transformers import DynamicCache

    past = inputs[3:]
    cache = DynamicCache([(past[2 * i].clone(), past[2 * i + 1].clone()) for i in range(2)])
    with torch.no_grad():
        expected = model(input_ids=inputs[0], attention_mask=inputs[1], position_ids=inputs[2], cache=cache).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
