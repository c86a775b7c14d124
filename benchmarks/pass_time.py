"""How long the pass itself takes, next to torch.export, and how it scales with depth (issue 5).

The pass is everything after capture: site analysis of the eval and train graphs, the rewrite, the module
wrapper with its generated forward code (``geonorm_fx.api.convert_captured``). Targets: at 32 blocks the pass takes <= 5% of one
``torch.export.export`` of the same model; time(64 blocks) / time(8 blocks) <= 10 (linear in graph size).

Usage: python benchmarks/pass_time.py [--blocks 8,32,64] [--reps 20] [--export-reps 3]
                                      [--json benchmarks/results/pass_time.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from geonorm_fx.api import convert_captured  # noqa: E402
from geonorm_fx.capture import capture  # noqa: E402
from models import table_model  # noqa: E402
from timing import machine, quantile  # noqa: E402


def time_pass(model, args, reps: int) -> dict:
    """Median / p10 / p90 seconds of the pass on fresh copies of one capture (copying is not timed)."""
    captured = capture(model, args)
    nodes = sum(len(gm.graph.nodes) for gm in captured.graphs.values())
    seconds, sites = [], 0
    for _ in range(reps):
        work = copy.deepcopy(captured)
        start = time.perf_counter()
        module = convert_captured(work)
        seconds.append(time.perf_counter() - start)
        sites = len(module.geonorm_report.sites)
    return {"nodes": nodes, "sites": sites, "pass_s": statistics.median(seconds),
            "pass_p10_s": quantile(seconds, 0.1), "pass_p90_s": quantile(seconds, 0.9)}


def time_export(model, args, reps: int) -> float:
    """Median seconds of one non-strict ``torch.export.export`` (the capture the pass starts from)."""
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.export.export(model, args, strict=False)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="8,32,64")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--export-reps", type=int, default=3)
    ap.add_argument("--export-at", type=int, default=32)
    ap.add_argument("--json", default="benchmarks/results/pass_time.json")
    opts = ap.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for blocks in map(int, opts.blocks.split(",")):
        model, args = table_model("llama", width=64, blocks=blocks, batch=2, seq=32)
        row = {"blocks": blocks, **time_pass(model, args, opts.reps)}
        if blocks == opts.export_at:
            row["export_s"] = time_export(model, args, opts.export_reps)
            row["pass_over_export"] = row["pass_s"] / row["export_s"]
            # convert() captures eval and train graphs (two exports) and runs the pass on both
            row["pass_over_capture_exports"] = row["pass_s"] / (2 * row["export_s"])
        rows.append(row)
        print(f"{blocks} blocks: {row['nodes']} nodes, {row['sites']} sites, pass {row['pass_s']:.3f} s "
              f"(p10 {row['pass_p10_s']:.3f}, p90 {row['pass_p90_s']:.3f})"
              + (f", torch.export {row['export_s']:.2f} s" if "export_s" in row else ""), flush=True)
    by = {r["blocks"]: r for r in rows}
    summary = {}
    if opts.export_at in by:
        summary["pass_over_export"] = by[opts.export_at]["pass_over_export"]
        summary["pass_over_capture_exports"] = by[opts.export_at]["pass_over_capture_exports"]
    if 8 in by and 64 in by:
        summary["scaling_64_over_8"] = by[64]["pass_s"] / by[8]["pass_s"]
    print(f"\nmachine: {machine()}")
    print("| measure | value | target | met |\n|---|---|---|---|")
    if "pass_over_export" in summary:
        v = summary["pass_over_export"]
        print(f"| pass (eval + train graphs) / one torch.export, {opts.export_at} blocks | {100 * v:.1f}% | <= 5% | "
              f"{'yes' if v <= 0.05 else '**no**'} |")
        v = summary["pass_over_capture_exports"]
        print(f"| pass / the two torch.export calls of convert(), {opts.export_at} blocks | {100 * v:.1f}% | - | - |")
    if "scaling_64_over_8" in summary:
        v = summary["scaling_64_over_8"]
        print(f"| pass time 64 blocks / 8 blocks | {v:.2f} | <= 10 | {'yes' if v <= 10 else '**no**'} |")
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
