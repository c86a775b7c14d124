"""Cached decoding in ONNX Runtime: the GeoNorm decoder against the source model exported the same way.

    python benchmarks/onnx_decode.py [--tokens 128] [--reps 7] [--layers 4 --hidden 256] [--threads 0]

A Llama causal LM (random weights, stock config) is exported twice with ``export_decoder`` (Optimum-style inputs
and outputs, dynamic batch / sequence / past length, verified at two past lengths): as it is, and after
``gf.install``. ``generate_onnx`` decodes greedily from an 8-token prompt in ONNX Runtime's CPU provider (graph
optimisation "all"). Per-token time is ``(t(1 + N tokens) - t(1 token)) / N`` (the prompt cancels), medians over
``--reps`` rounds run in turn (source, GeoNorm, source, ...). Results go to ``benchmarks/results/onnx_decode.json``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import geonorm_fx as gf  # noqa: E402
from benchmarks.install_decode import build  # noqa: E402
from benchmarks.timing import per_token_decode, write_json  # noqa: E402
from geonorm_fx.exporters import export_decoder, generate_onnx, ort_session  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    ap.add_argument("--providers", default="CPUExecutionProvider")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "onnx_decode.json"))
    args = ap.parse_args(argv)
    providers = args.providers.split(",")

    source = build(args.layers, args.hidden)
    geonorm = copy.deepcopy(source)
    prompt = torch.randint(1, 1000, (1, 8), generator=torch.Generator().manual_seed(1))
    gf.install(geonorm, (prompt,), backend="eager")
    folder = tempfile.mkdtemp(prefix="geonorm_onnx_decode_")
    exports = {"source": export_decoder(source, os.path.join(folder, "source.onnx"), providers=providers),
               "geonorm": export_decoder(geonorm, os.path.join(folder, "geonorm.onnx"), providers=providers)}
    sessions = {k: ort_session(e.path, providers, threads=args.threads) for k, e in exports.items()}

    def timed(name, n):
        start = time.perf_counter()
        out = generate_onnx(sessions[name], prompt, n)
        elapsed = time.perf_counter() - start
        assert out.shape[1] == 8 + n
        return elapsed

    for name in sessions:  # warm-up
        timed(name, 8)
    med, rounds = per_token_decode(timed, list(sessions), args.tokens, args.reps)
    result = {
        "command": "python benchmarks/onnx_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "providers": sessions["geonorm"].get_providers(), "layers": args.layers, "hidden": args.hidden,
        "tokens": args.tokens, "reps": args.reps, "ort_threads": args.threads,
        **rounds,
        "ratio": med["geonorm"] / med["source"],
        "max_abs_diff": {k: e.max_abs_diff for k, e in exports.items()},
        "sites": len(geonorm.geonorm_report.sites),
    }
    print(f"ONNX Runtime {result['providers'][0]}, Llama {args.layers} x {args.hidden}, prompt 8, {args.tokens} new "
          f"tokens, {args.reps} rounds")
    print("| decoder | per-token decode (ms, median) |")
    print("|---|---|")
    print(f"| source, exported with export_decoder | {med['source'] * 1e3:.3f} |")
    print(f"| GeoNorm ({result['sites']} sites), export_decoder | {med['geonorm'] * 1e3:.3f} |")
    print(f"ratio GeoNorm / source: {result['ratio']:.3f}")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
