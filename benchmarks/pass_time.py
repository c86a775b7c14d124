"""How long the pass itself takes, next to torch.export, and how it scales with depth (issue 5).

The pass is everything after capture: site analysis of the eval and train graphs, the rewrite, the module
wrapper with its generated forward code (``geonorm_fx.api.convert_captured``). Targets: at 32 blocks the pass takes <= 5% of one
``torch.export.export`` of the same model; time(64 blocks) / time(8 blocks) <= 10 (linear in graph size).

Both are ratios, so their terms are timed in turn, as overhead.py times source and converted: each round runs
the pass once at every depth (on a fresh copy of that depth's capture; copying is not timed) and, in
--export-reps of the rounds spread over the run, one torch.export at --export-at blocks. A slow stretch of a
shared machine then hits every term alike instead of one depth's whole series.

Usage: python benchmarks/pass_time.py [--blocks 8,32,64] [--reps 20] [--export-reps 5]
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


def time_pass_once(captured) -> tuple[float, int]:
    """Seconds of one pass on a fresh copy of ``captured`` (copying is not timed), and the sites it rewrote."""
    work = copy.deepcopy(captured)
    start = time.perf_counter()
    module = convert_captured(work)
    return time.perf_counter() - start, len(module.geonorm_report.sites)


def time_export_once(model, args) -> float:
    """Seconds of one non-strict ``torch.export.export`` (the capture the pass starts from)."""
    start = time.perf_counter()
    torch.export.export(model, args, strict=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="8,32,64")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--export-reps", type=int, default=5)
    ap.add_argument("--export-at", type=int, default=32)
    ap.add_argument("--json", default="benchmarks/results/pass_time.json")
    opts = ap.parse_args()
    warnings.filterwarnings("ignore")
    depths = [int(b) for b in opts.blocks.split(",")]
    models = {b: table_model("llama", width=64, blocks=b, batch=2, seq=32) for b in depths}
    captures = {b: capture(*models[b]) for b in depths}
    seconds: dict[int, list[float]] = {b: [] for b in depths}
    sites: dict[int, int] = {}
    export_s: list[float] = []
    export_rounds = {round(i * opts.reps / opts.export_reps) for i in range(opts.export_reps)} \
        if opts.export_at in depths else set()
    for i in range(opts.reps):
        for b in depths:
            elapsed, sites[b] = time_pass_once(captures[b])
            seconds[b].append(elapsed)
        if i in export_rounds:
            export_s.append(time_export_once(*models[opts.export_at]))
    rows = []
    for b in depths:
        row = {"blocks": b, "nodes": sum(len(gm.graph.nodes) for gm in captures[b].graphs.values()),
               "sites": sites[b], "pass_s": statistics.median(seconds[b]),
               "pass_p10_s": quantile(seconds[b], 0.1), "pass_p90_s": quantile(seconds[b], 0.9)}
        if b == opts.export_at:
            row["export_s"] = statistics.median(export_s)
            row["export_runs_s"] = export_s
            row["pass_over_export"] = row["pass_s"] / row["export_s"]
            # convert() captures eval and train graphs (two exports) and runs the pass on both
            row["pass_over_capture_exports"] = row["pass_s"] / (2 * row["export_s"])
        rows.append(row)
        print(f"{b} blocks: {row['nodes']} nodes, {row['sites']} sites, pass {row['pass_s']:.3f} s "
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
