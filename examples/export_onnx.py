"""Convert built-in models, export each to ONNX and verify it in ONNX Runtime; print a markdown table.

Usage: python examples/export_onnx.py [SPEC ...] [--out DIR]   (default: every hf: spec of the zoo)
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import geonorm_fx as gf
from geonorm_fx import zoo
from geonorm_fx.exporters import export_onnx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="*", default=[s for s in zoo.BUILTIN if s.startswith("hf:")])
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="geonorm-onnx-"))
    opts = ap.parse_args()
    warnings.filterwarnings("ignore")
    print("| spec | sites | shapes checked | providers | max abs diff vs PyTorch | size (KB) | export+verify (s) |")
    print("|---|---|---|---|---|---|---|")
    for spec in opts.specs:
        built = zoo.load(spec)
        module = gf.convert(built.model, built.args, built.kwargs)
        start = time.perf_counter()
        r = export_onnx(module, built.args, os.path.join(opts.out, spec.replace(":", "_") + ".onnx"),
                        kwargs=built.kwargs)
        seconds = time.perf_counter() - start
        sites = ", ".join(f"{k}={v}" for k, v in module.geonorm_report.counts().items())
        print(f"| `{spec}` | {sites} | {r.checked_shapes} | {', '.join(r.providers)} | {r.max_abs_diff:.1e} | "
              f"{r.size_bytes // 1024} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
