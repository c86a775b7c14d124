"""The cost of one geodesic update against the residual add it replaces, per execution mode (issue 5).

On one (batch, tokens, d) pair ``x``, ``s`` (default 4 x 256 x 512, float32, the table models' stream) times, interleaved
in one process (medians of --reps calls after warm-up):
  eager      ``x + s``; ``geodesic_step`` without autograd (the inference path: one full-size buffer); the same
             step with autograd on (the functional path training uses: tangent and output separate tensors)
  compile    torch.compile of ``x + s`` and of the step (one fused kernel)
  ort        ONNX Runtime CPU, ORT_ENABLE_ALL, of a one-op model ``x + s`` and of a one-update model
and prints milliseconds per call and the extra cost of an update over an add. ``sites x extra`` over the
forward time bounds the whole-model overhead from above: alone, each call's fresh output buffer is new memory,
inside a forward the allocator reuses it (``benchmarks/overhead.py`` measures the models side by side).

Usage: python benchmarks/update_cost.py [--shape 4,256,512] [--reps 50] [--json benchmarks/results/update_cost.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import geonorm_fx as gf  # noqa: E402
from timing import interleaved, machine, no_grad_call, quantile  # noqa: E402


class Add(nn.Module):
    def forward(self, x, s):
        return x + s


class Update(nn.Module):
    def __init__(self):
        super().__init__()
        self.geo = gf.GeodesicUpdate(decay=0.5)

    def forward(self, x, s):
        return self.geo(x, s)


def _eager(x, s, reps):
    add, update = Add(), Update()

    def taped():
        update(x, s).sum()  # autograd on: the step records a graph through scale and bias

    return interleaved({"add": no_grad_call(add, x, s), "update (no autograd)": no_grad_call(update, x, s),
                        "update (autograd on)": taped}, reps, warmup=5)


def _compiled(x, s, reps):
    torch._dynamo.reset()
    add, update = torch.compile(Add()), torch.compile(Update())
    return interleaved({"add": no_grad_call(add, x, s), "update": no_grad_call(update, x, s)}, reps, warmup=5)


def _ort(x, s, reps):
    from geonorm_fx.exporters import export_onnx, ort_session

    with tempfile.TemporaryDirectory() as tmp:
        sessions, feeds = {}, {}
        for name, module in (("add", Add()), ("update", Update())):
            path = os.path.join(tmp, f"{name}.onnx")
            export_onnx(module.eval(), (x, s), path, verify=(name == "update"))
            sessions[name] = ort_session(path, level="all", threads=torch.get_num_threads())
            inputs = sessions[name].get_inputs()
            feeds[name] = {inputs[0].name: x.numpy(), inputs[1].name: s.numpy()}
        return interleaved({k: (lambda k=k: sessions[k].run(None, feeds[k])) for k in sessions}, reps, warmup=5)


MODES = {"eager": _eager, "compile": _compiled, "ort": _ort}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4,256,512")
    ap.add_argument("--modes", default="eager,compile,ort")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default="benchmarks/results/update_cost.json")
    opts = ap.parse_args()
    warnings.filterwarnings("ignore")
    shape = tuple(int(n) for n in opts.shape.split(","))
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(*shape, generator=g), 0.3 * torch.randn(*shape, generator=g)
    rows = []
    for mode in opts.modes.split(","):
        times = MODES[mode](x, s, opts.reps)
        add = statistics.median(times["add"])
        for name, values in times.items():
            med = statistics.median(values)
            rows.append({"mode": mode, "op": name, "ms": 1e3 * med, "p10_ms": 1e3 * quantile(values, 0.1),
                         "p90_ms": 1e3 * quantile(values, 0.9), "extra_over_add_ms": 1e3 * (med - add)})
    print(f"machine: {machine()}; shape {shape}, float32, {opts.reps} interleaved calls per op")
    print("| mode | op | ms per call, median (p10..p90) | extra over the add (ms) |")
    print("|---|---|---|---|")
    for r in rows:
        extra = "-" if r["op"] == "add" else f"{r['extra_over_add_ms']:.3f}"
        print(f"| {r['mode']} | {r['op']} | {r['ms']:.3f} ({r['p10_ms']:.3f}..{r['p90_ms']:.3f}) | {extra} |")
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump({"machine": machine(), "shape": list(shape), "reps": opts.reps, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
