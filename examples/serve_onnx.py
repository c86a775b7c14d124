"""Serve a GeoNorm causal LM with ONNX Runtime: cached greedy decoding from an exported decoder.

    python examples/serve_onnx.py [--model llama|qwen2|gpt2] [--tokens 32] [--out /tmp/geonorm_serve]

1. A tiny causal LM (random weights, stock config) gets GeoNorm in place (``gf.install``); its updates are moved
   off their initial values, as training would.
2. ``export_decoder`` writes it as an Optimum-style decoder (``input_ids``, ``attention_mask``, ``position_ids``,
   ``past_key_values.{i}.key|value`` -> ``logits``, ``present.{i}.key|value``) and checks it in ONNX Runtime at
   two past lengths.
3. ``generate_onnx`` decodes greedily in ONNX Runtime (prompt with an empty past, then one token per step); the
   tokens are compared with PyTorch's ``model.generate`` on the same GeoNorm weights.

A model trained with ``gf.convert`` is served the same way: ``gf.install(source, ...)``, then
``gf.load_updates(source, converted)`` and the steps above.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import geonorm_fx as gf  # noqa: E402
from geonorm_fx.exporters import export_decoder, generate_onnx  # noqa: E402


def serve(model_name: str = "llama", tokens: int = 32, out: str = "/tmp/geonorm_serve", seed: int = 0) -> dict:
    """Install, export, generate in ONNX Runtime and in PyTorch; return both token tensors and the export."""
    from tests.install_models import causal_lm, perturb_updates

    model, prompt = causal_lm(model_name, seed=seed)
    gf.install(model, (prompt,), backend="eager")
    perturb_updates(model, seed=seed + 1)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    exported = export_decoder(model, os.path.join(out, f"{model_name}_decoder.onnx"))
    export_s = time.perf_counter() - start
    onnx_tokens = generate_onnx(exported.path, prompt, tokens)
    with torch.no_grad():
        torch_tokens = model.generate(prompt, max_new_tokens=tokens, do_sample=False)
    return {"onnx": onnx_tokens, "torch": torch_tokens, "export": exported, "export_s": export_s,
            "sites": len(model.geonorm_report.sites)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama", choices=["llama", "qwen2", "gpt2"])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default="/tmp/geonorm_serve")
    args = ap.parse_args(argv)
    result = serve(args.model, args.tokens, args.out)
    exported = result["export"]
    same = torch.equal(result["onnx"], result["torch"])
    print(f"{args.model}: {result['sites']} GeoNorm sites; decoder {exported.path} ({exported.size_bytes // 1024} KB, "
          f"{result['export_s']:.1f} s incl. verification, max |diff| {exported.max_abs_diff:.2g} at past lengths "
          f"{[c['past'] for c in exported.checked]})")
    print("inputs: ", ", ".join(exported.input_names[:4]), "...")
    print("outputs:", ", ".join(exported.output_names[:3]), "...")
    print("ONNX Runtime:", result["onnx"][0].tolist())
    print("PyTorch:     ", result["torch"][0].tolist())
    print(f"{args.tokens} tokens, batch {result['onnx'].shape[0]}: {'identical' if same else 'DIFFERENT'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
