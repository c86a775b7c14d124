"""Run the training-study grid with ``train_lm.py`` and summarise it in ``results.md`` and ``loss.png``.

    python examples/compare.py --threads 1           # the default grid: 16 runs, 80 min on 2 busy shared cores
    python examples/compare.py --steps 200 --seeds 2 --out-dir /tmp/grid --results /tmp/grid

Grid: Pre-Norm and GeoNorm-Pre (harmonic) with ``--seeds`` seeds (the headline pair, paired by seed);
Post-Norm, GeoNorm-Post (harmonic) and GeoNorm-Pre with the sqrt / linear / none schedules with
``--extra-seeds`` seeds (default 2).
Runs are sequential subprocesses (2 torch threads each); a run whose ``summary.json`` exists is reused,
so an interrupted grid resumes where it stopped. ``results.md`` and ``loss.png`` are rewritten after
every run. ``--report-only`` rewrites them from whatever has finished.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
# the model and schedule the default grid trains (see README "Training study" for how it was sized)
SIZE = {"--d-model": "96", "--layers": "6", "--heads": "4", "--seq-len": "64", "--batch-size": "16"}
PAPER = ("Paper (GEONORM.md section 5), 125M Books3-512: Pre-Norm 3.4437, GeoNorm harmonic 3.4040, linear 3.4168, "
         "sqrt 3.4210; gains 0.018..0.040 nats over Pre-Norm across settings; Pre-Norm seed std about 0.008; "
         "Post-Norm worse than Pre-Norm.")


def grid(seeds: int, extra_seeds: int) -> list[tuple[str, str, str | None, int]]:
    """``(run name, variant, schedule, seed)`` in the order they run: every configuration's seed 0 first."""
    configs = [("prenorm", None, seeds), ("geonorm-pre", "harmonic", seeds), ("postnorm", None, extra_seeds),
               ("geonorm-post", "harmonic", extra_seeds), ("geonorm-pre", "sqrt", extra_seeds),
               ("geonorm-pre", "linear", extra_seeds), ("geonorm-pre", "none", extra_seeds)]
    runs = []
    for seed in range(max(seeds, extra_seeds)):
        for variant, schedule, n in configs:
            if seed < n:
                runs.append((f"{label(variant, schedule).replace(':', '-')}-s{seed}", variant, schedule, seed))
    return runs


def label(variant: str, schedule: str | None) -> str:
    """Display name of a configuration, e.g. ``geonorm-pre:harmonic``."""
    return variant if schedule is None else f"{variant}:{schedule}"


def run_one(opts, name: str, variant: str, schedule: str | None, seed: int) -> dict:
    """Train one grid point in a subprocess unless its ``summary.json`` exists; returns the summary."""
    out = pathlib.Path(opts.out_dir) / name
    summary = out / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / "train_lm.py"), "--variant", variant, "--steps", str(opts.steps),
           "--seed", str(seed), "--out", str(out), "--eval-every", str(opts.eval_every),
           "--eval-batches", str(opts.eval_batches), "--threads", str(opts.threads), "--quiet"]
    cmd += [a for kv in SIZE.items() for a in kv] + opts.train_args
    if schedule is not None:
        cmd += ["--schedule", schedule]
    if opts.data:
        cmd += ["--data", opts.data]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}", flush=True)
    with open(out / "log.txt", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    result = json.loads(summary.read_text())
    print(f"    final val loss {result['final_val_loss']:.4f} in {result['seconds']:.0f} s", flush=True)
    return result


def _fmt(values: list[float], sign: str = "") -> str:
    if len(values) == 1:
        return f"{values[0]:{sign}.4f}"
    return f"{statistics.mean(values):{sign}.4f} +- {statistics.stdev(values):.4f}"


def write_report(opts, runs) -> None:
    """Write ``results.md`` and ``loss.png`` from every finished run of the grid."""
    done = {}
    for name, variant, schedule, seed in runs:
        path = pathlib.Path(opts.out_dir) / name / "summary.json"
        if path.exists():
            done[name] = (variant, schedule, seed, json.loads(path.read_text()))
    if not done:
        return
    by_cfg: dict[str, dict[int, float]] = {}
    for variant, schedule, seed, s in done.values():
        by_cfg.setdefault(label(variant, schedule), {})[seed] = s["final_val_loss"]
    base = by_cfg.get("prenorm", {})
    any_summary = next(iter(done.values()))[3]
    lines = ["# Training study: final validation loss", "",
             f"Byte-level LM on {any_summary['data']['source']} ({any_summary['data']['train_bytes']:,} train / "
             f"{any_summary['data']['val_bytes']:,} validation bytes, sha256 {any_summary['data']['sha256']}); "
             f"model {json.dumps(any_summary['model'])}, {any_summary['n_params']:,} parameters before "
             f"conversion; {opts.steps} steps of {any_summary['config']['batch_size']}x"
             f"{any_summary['config']['seq_len']} tokens, AdamW lr {any_summary['config']['lr']}; "
             f"torch {any_summary['versions']['torch']}, Python {any_summary['versions']['python']}, "
             f"geonorm_fx {any_summary['versions']['geonorm_fx']}, {any_summary['device']}, "
             f"{any_summary['threads']} threads.", "",
             f"Command: `python examples/compare.py {' '.join(opts.argv)}`".replace("  ", " "), "",
             "Loss in nats per byte. Gap = configuration minus Pre-Norm (negative: better than Pre-Norm); "
             "where both have the same seeds, the gap is paired by seed (mean +- std of the per-seed differences).",
             "", "| configuration | seeds | final val loss (mean +- std) | gap to Pre-Norm | Pre-Norm seed std | "
             "per seed | train s/run |", "|---|---|---|---|---|---|---|"]
    base_std = f"{statistics.stdev(base.values()):.4f}" if len(base) > 1 else "-"
    for cfg, vals in by_cfg.items():
        seeds = sorted(vals)
        common = [s for s in seeds if s in base]
        if cfg == "prenorm" or not common:
            gap = "-"
        else:
            diffs = [vals[s] - base[s] for s in common]
            gap = _fmt(diffs, "+")
        secs = [d[3]["seconds"] for d in done.values() if label(d[0], d[1]) == cfg]
        lines.append(f"| {cfg} | {len(seeds)} | {_fmt(list(vals.values()))} | {gap} | {base_std} | "
                     f"{', '.join(f'{vals[s]:.4f}' for s in seeds)} | {statistics.mean(secs):.0f} |")
    missing = [n for n, *_ in runs if n not in done]
    lines += ["", PAPER, ""]
    if missing:
        lines += [f"Not finished yet: {', '.join(missing)}.", ""]
    results = pathlib.Path(opts.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.md").write_text("\n".join(lines))
    _plot(opts, done, results / "loss.png")


def _val_curve(path: pathlib.Path) -> tuple[list[int], list[float]]:
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def _plot(opts, done: dict, path: pathlib.Path) -> None:
    """Validation curves (mean over seeds, min-max band): the four variants, and the schedules."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list] = {}
    for name, (variant, schedule, _seed, _s) in done.items():
        metrics = pathlib.Path(opts.out_dir) / name / "metrics.csv"
        curves.setdefault(label(variant, schedule), []).append(_val_curve(metrics))
    panels = [("variants", ["prenorm", "postnorm", "geonorm-pre:harmonic", "geonorm-post:harmonic"]),
              ("geonorm-pre decay schedules", ["prenorm", "geonorm-pre:harmonic", "geonorm-pre:sqrt",
                                               "geonorm-pre:linear", "geonorm-pre:none"])]
    colors = {cfg: f"C{i}" for i, cfg in enumerate(dict.fromkeys(panels[0][1] + panels[1][1]))}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (title, cfgs) in zip(axes, panels):
        finals = []
        for cfg in cfgs:
            if cfg not in curves:
                continue
            steps = curves[cfg][0][0]
            n = min(len(c[1]) for c in curves[cfg])
            cols = list(zip(*[c[1][:n] for c in curves[cfg]]))
            mean = [statistics.mean(c) for c in cols]
            ax.plot(steps[:n], mean, label=f"{cfg} (n={len(curves[cfg])})", color=colors[cfg])
            if len(curves[cfg]) > 1:
                ax.fill_between(steps[:n], [min(c) for c in cols], [max(c) for c in cols], alpha=0.2,
                                color=colors[cfg])
            finals += mean[len(mean) // 3:]
        if finals:
            lo, hi = min(finals), max(finals)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    """Run (or resume) the grid and write the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3, help="seeds for Pre-Norm and GeoNorm-Pre harmonic")
    ap.add_argument("--extra-seeds", type=int, default=2, help="seeds for the other configurations")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out-dir", default=str(HERE / "results" / "runs"), help="one folder per run")
    ap.add_argument("--results", default=str(HERE / "results"), help="where results.md and loss.png go")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: more train_lm.py options")
    opts = ap.parse_args(argv)
    opts.argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    opts.train_args = [a for a in opts.train_args if a != "--"]
    runs = grid(opts.seeds, opts.extra_seeds)
    if opts.dry_run:
        print("\n".join(n for n, *_ in runs))
        return
    start = time.perf_counter()
    if not opts.report_only:
        for name, variant, schedule, seed in runs:
            run_one(opts, name, variant, schedule, seed)
            write_report(opts, runs)
    write_report(opts, runs)
    print(f"done in {time.perf_counter() - start:.0f} s; see {opts.results}/results.md", flush=True)


if __name__ == "__main__":
    main()
