"""Measurement helpers shared by the benchmarks: interleaved timing, peak memory, the models of the table."""
from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile


def interleaved(fns: dict, reps: int = 20, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of every function in ``fns``, called in turn (a, b, a, b, ...) ``reps`` times after
    ``warmup`` rounds, so that drift in a shared machine's load hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def no_grad_call(fn, *args):
    """A no-argument function that runs ``fn(*args)`` under ``torch.no_grad`` (and waits for the GPU when an
    argument is on CUDA), for :func:`interleaved` and :func:`peak_memory_bytes`."""
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)

    def call():
        with torch.no_grad():
            out = fn(*args)
        if cuda:
            torch.cuda.synchronize()
        return out
    return call


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linear interpolation."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ratio_summary(source: list[float], converted: list[float]) -> dict:
    """Median times, their ratio, and the spread of the per-round ratios (p10, p90): round ``i`` of the
    interleaved run timed both models back to back, so their ratio cancels most of the machine's drift."""
    pair = [c / s for s, c in zip(source, converted)]
    return {"source_ms": 1e3 * statistics.median(source), "converted_ms": 1e3 * statistics.median(converted),
            "ratio": statistics.median(converted) / statistics.median(source),
            "ratio_p10": quantile(pair, 0.1), "ratio_p90": quantile(pair, 0.9), "reps": len(pair),
            "round_ratios": pair}


def peak_memory_bytes(fn, device=torch.device("cpu")) -> int:
    """Peak bytes held by tensors allocated while ``fn()`` runs (CPU: allocator events of the profiler, in
    time order, summed; CUDA: the caching allocator's peak statistic); memory held before the call
    (weights, inputs) is not counted."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def machine() -> str:
    """One line naming the machine and library versions, for the tables."""
    import os
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads")


def per_token_decode(timed, names, tokens: int, reps: int) -> tuple[dict[str, float], dict]:
    """Per-token decode seconds of each model in ``names``: ``(timed(name, 1 + tokens) - timed(name, 1)) / tokens``
    (``timed(name, n)``: seconds to generate ``n`` tokens; the prompt cancels), ``reps`` rounds run in turn.
    Returns the medians and the JSON fields ``per_token_ms`` / ``per_token_ms_all``."""
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(reps):
        for name in names:
            rounds[name].append((timed(name, 1 + tokens) - timed(name, 1)) / tokens)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    return med, {"per_token_ms": {k: v * 1e3 for k, v in med.items()},
                 "per_token_ms_all": {k: [x * 1e3 for x in v] for k, v in rounds.items()}}


def write_json(path: str, result: dict) -> None:
    """``result`` as indented JSON at ``path`` (folders created)."""
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
