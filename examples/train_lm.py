"""Train a small byte-level decoder-only LM from scratch: Pre-Norm, Post-Norm, or either converted by geonorm-fx.

    python examples/train_lm.py --variant geonorm-pre --schedule harmonic --steps 1000 --seed 0 --out runs/a
    torchrun --nproc-per-node 2 examples/train_lm.py --variant geonorm-pre --steps 100 --seed 0 --out runs/b --ddp

Variants: ``prenorm`` / ``postnorm`` are the plain models; ``geonorm-pre`` / ``geonorm-post`` are
``gf.convert`` of the same seeded model (the Pre-Norm one keeps its branch-input norms; converting the
Post-Norm one removes its post-norms, the paper's Eq. 5). Same ``--seed`` means same initialisation
(before conversion), same data order and same optimiser (AdamW 0.9/0.95, warmup + cosine).

Data: the running interpreter's standard-library sources (``--data`` for any text file or folder), bytes
as tokens, fixed train/validation split (``lm_model.load_data``). Writes ``OUT/metrics.csv`` (step,
split, loss, tokens, seconds) and ``OUT/summary.json``.

Resuming: ``--stop-after K --save-checkpoint`` writes ``OUT/checkpoint.pt`` (model ``state_dict``,
optimiser, step, data generator); ``--resume OUT/checkpoint.pt`` with the same arguments converts a fresh
model, loads the ``state_dict`` (strict) and continues exactly where the first run stopped.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import platform
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_model as lm  # noqa: E402

import geonorm_fx as gf  # noqa: E402

VARIANTS = ("prenorm", "postnorm", "geonorm-pre", "geonorm-post")
SCHEDULES = ("harmonic", "sqrt", "linear", "none")
# arguments that fix the model a checkpoint belongs to
MODEL_ARGS = ("variant", "schedule", "d_model", "layers", "heads", "seq_len", "tie_head", "embed_norm", "clamp")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--schedule", choices=SCHEDULES, default="harmonic", help="decay schedule (geonorm-* only)")
    ap.add_argument("--steps", type=int, default=1000, help="total optimiser steps (length of the lr schedule)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--data", default=None, help="text file or folder (default: the stdlib's *.py)")
    ap.add_argument("--ddp", action="store_true", help="DistributedDataParallel (launch with torchrun)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step per rank")
    ap.add_argument("--tie-head", action="store_true", help="tie the output head to the token embedding")
    ap.add_argument("--embed-norm", choices=("auto", "yes", "no"), default="auto",
                    help="LayerNorm on the embeddings (auto: yes for the Post-Norm variants, as BERT)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default: steps // 10)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--clamp", type=float, default=math.pi / 4, help="geodesic angle clamp (geonorm-* only)")
    ap.add_argument("--log-every", type=int, default=10, help="train loss rows (mean over the interval)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: 2, or 1 per rank with --ddp)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (for checkpoints)")
    ap.add_argument("--save-checkpoint", action="store_true", help="write OUT/checkpoint.pt at the end")
    ap.add_argument("--resume", default=None, help="checkpoint.pt of an earlier run with the same arguments")
    ap.add_argument("--save-params", default=None,
                    help="write every rank's final state_dict to PATH with a .rank<r> suffix")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def model_config(opts: argparse.Namespace) -> lm.GPTConfig:
    """The :class:`lm_model.GPTConfig` the options describe."""
    post = opts.variant in ("postnorm", "geonorm-post")
    embed_norm = post if opts.embed_norm == "auto" else opts.embed_norm == "yes"
    return lm.GPTConfig(d_model=opts.d_model, n_layers=opts.layers, n_heads=opts.heads, seq_len=opts.seq_len,
                        norm_position="post" if post else "pre", tie_head=opts.tie_head, embed_norm=embed_norm)


def build_model(opts: argparse.Namespace, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The seeded source model, converted by ``gf.convert`` for the geonorm variants.

    Returns ``(model, site_counts)``; the counts are checked against two sites per block.
    """
    cfg = model_config(opts)
    torch.manual_seed(opts.seed)
    model = lm.GPT(cfg).to(device)
    if not opts.variant.startswith("geonorm"):
        return model, {}
    example = torch.zeros(2, cfg.seq_len, dtype=torch.long, device=device)
    module = gf.convert(model, (example,), schedule=opts.schedule, clamp=opts.clamp)
    counts = dict(module.geonorm_report.counts())
    expected = lm.expected_counts(cfg)
    if counts != expected:
        raise RuntimeError(f"gf.convert found sites {counts}, expected {expected}:\n{module.geonorm_report}")
    return module, counts


def versions() -> dict:
    """Versions of torch, Python and geonorm_fx for ``summary.json``."""
    return {"torch": torch.__version__, "python": platform.python_version(), "geonorm_fx": gf.__version__}


def _setup(opts):
    """Process group, device and threads; returns ``(rank, world, device)``."""
    use_cuda = opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
    rank, world = 0, 1
    if opts.ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    torch.set_num_threads(opts.threads or (1 if world > 1 else 2))
    return rank, world, device


def train(opts: argparse.Namespace) -> tuple[dict, nn.Module]:
    """Run one training job as ``opts`` describes; returns ``(summary, trained model)`` (unwrapped)."""
    rank, world, device = _setup(opts)
    out = pathlib.Path(opts.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    data = lm.load_data(opts.data)
    start = time.perf_counter()
    raw, counts = build_model(opts, device)
    convert_seconds = time.perf_counter() - start
    if rank == 0 and counts:
        print(f"[{opts.variant}/{opts.schedule}] geonorm sites: {counts}", flush=True)
    n_params = sum(p.numel() for p in raw.parameters())
    model = raw
    if opts.ddp:  # broadcasts rank 0's parameters (all ranks converted the same seeded model anyway)
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    opt = lm.make_optimizer(raw, opts.lr, opts.weight_decay)
    gen = torch.Generator().manual_seed(opts.seed + 10_000)  # data order: independent of the init stream
    first = 0
    if opts.resume:
        first = _load_checkpoint(opts, raw, opt, gen)
    val = [(x.to(device), y.to(device)) for x, y in
           lm.eval_batches(data.val, opts.eval_batches, opts.batch_size, opts.seq_len)]
    warmup = opts.warmup if opts.warmup is not None else max(1, opts.steps // 10)
    last = min(opts.steps, opts.stop_after) if opts.stop_after is not None else opts.steps
    tokens_per_step = opts.batch_size * opts.seq_len * world
    rows, running, diverged, done = [], [], False, first
    log = open(out / "metrics.csv", "w", newline="") if rank == 0 else None  # noqa: SIM115 - written as we go
    writer = csv.writer(log) if log else None
    if writer:
        writer.writerow(["step", "split", "loss", "tokens", "seconds"])

    def record(*row):
        rows.append(row)
        if writer:
            writer.writerow((row[0], row[1], f"{row[2]:.6f}", row[3], f"{row[4]:.3f}"))
            log.flush()

    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(first, last), disable=rank != 0 or opts.quiet, desc=opts.variant, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lm.lr_at(step, opts.steps, opts.lr, warmup)
        x, y = lm.sample_batch(data.train, opts.batch_size * world, opts.seq_len, gen)
        x, y = (z[rank * opts.batch_size:(rank + 1) * opts.batch_size].to(device) for z in (x, y))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opts.grad_clip:
            nn.utils.clip_grad_norm_(raw.parameters(), opts.grad_clip)
        opt.step()
        running.append(loss.detach())
        done = step + 1
        if done % opts.log_every == 0 or done == last:
            mean = torch.stack(running).mean()
            if opts.ddp:
                dist.all_reduce(mean)
                mean /= world
            running = []
            record(done, "train", mean.item(), done * tokens_per_step, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{rows[-1][2]:.3f}")
            if not math.isfinite(rows[-1][2]):
                diverged = True
        if rank == 0 and (done % opts.eval_every == 0 or done == last or diverged):
            record(done, "val", lm.evaluate(raw, val), done * tokens_per_step, time.perf_counter() - t0)
        if diverged:
            break
    seconds = time.perf_counter() - t0
    if opts.save_params:
        p = pathlib.Path(opts.save_params)
        torch.save({k: v.detach().cpu() for k, v in raw.state_dict().items()},
                   p.with_name(f"{p.stem}.rank{rank}{p.suffix}"))
    summary = {}
    if rank == 0:
        if opts.save_checkpoint:
            torch.save({"model": raw.state_dict(), "optimizer": opt.state_dict(), "step": done,
                        "data_generator": gen.get_state(), "args": vars(opts)}, out / "checkpoint.pt")
        log.close()
        vals = [r for r in rows if r[1] == "val"]
        trains = [r for r in rows if r[1] == "train"]
        summary = {
            "variant": opts.variant, "schedule": opts.schedule if opts.variant.startswith("geonorm") else None,
            "seed": opts.seed, "final_val_loss": vals[-1][2] if vals else None,
            "final_train_loss": trains[-1][2] if trains else None, "steps_done": done, "diverged": diverged,
            "tokens": done * tokens_per_step, "seconds": seconds, "convert_seconds": convert_seconds,
            "site_counts": counts, "n_params": n_params, "world_size": world, "device": str(device),
            "threads": torch.get_num_threads(), "model": model_config(opts).to_dict(), "config": vars(opts),
            "data": data.describe(), "versions": versions(),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"[{opts.variant}] final val loss {summary['final_val_loss']:.4f} after {done} steps, "
              f"{seconds:.0f} s", flush=True)
    if opts.ddp:
        dist.barrier()
        dist.destroy_process_group()
    return summary, raw


def _load_checkpoint(opts, raw: nn.Module, opt, gen: torch.Generator) -> int:
    """Load ``opts.resume`` into the freshly built (and converted) ``raw``; returns the step to start at."""
    ckpt = torch.load(opts.resume, map_location="cpu", weights_only=False)
    mismatch = {k: (ckpt["args"][k], getattr(opts, k)) for k in MODEL_ARGS if ckpt["args"][k] != getattr(opts, k)}
    if mismatch:
        raise SystemExit(f"--resume: the checkpoint was written with other model arguments: {mismatch}")
    raw.load_state_dict(ckpt["model"], strict=True)
    opt.load_state_dict(ckpt["optimizer"])
    gen.set_state(ckpt["data_generator"])
    return int(ckpt["step"])


def main(argv=None) -> dict:
    """Parse ``argv`` and train; returns the summary (empty on ranks other than 0)."""
    return train(parse_args(argv))[0]


if __name__ == "__main__":
    main()
