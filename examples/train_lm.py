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

Checkpoints: ``--stop-after K --save-checkpoint`` writes ``OUT/checkpoint.pt`` (model ``state_dict``,
optimiser, step, data generator, the loss rows not yet logged, the arguments: tensors and plain data only);
``--checkpoint-every N`` also writes it every N steps, and the first Ctrl-C (SIGINT; or SIGTERM) finishes the
current step, writes it and exits with code 130 (a second Ctrl-C aborts at once). Every write goes to a
temporary file in the same folder that replaces the old checkpoint only when complete, so a crash never
leaves a damaged checkpoint. ``--resume OUT/checkpoint.pt`` with the same arguments loads it with
``torch.load(weights_only=True)`` (a file that would run code is refused), converts a fresh model, loads the
``state_dict`` (strict) and continues exactly where the first run stopped; resumed into the same ``--out``,
``metrics.csv`` keeps its rows up to the checkpoint's step and the new rows are appended.

Exit codes: 0 done; 2 bad input (arguments, data, a checkpoint), one line on stderr; 130 (143 for SIGTERM)
interrupted, one line saying where the checkpoint is.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import pathlib
import pickle
import platform
import re
import signal
import sys
import threading
import time
import warnings
from collections import OrderedDict

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
# what a checkpoint holds, and the type of each entry
CHECKPOINT_KEYS = {"model": dict, "optimizer": dict, "step": int, "data_generator": torch.Tensor, "args": dict}
METRICS_HEADER = ["step", "split", "loss", "tokens", "seconds"]
PROG = "train_lm.py"


class ScriptError(SystemExit):
    """Bad input (arguments, data, a checkpoint): the command line prints the message as one line and exits
    with code 2. A :class:`SystemExit` so that in-process callers get a typed exception, never a traceback."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CheckpointError(ScriptError):
    """``--resume`` names a file that is missing, damaged, would run code when loaded, or belongs to another
    model."""


class TrainingInterrupted(ScriptError):
    """The run was stopped by SIGINT / SIGTERM after writing its checkpoint; exit code ``128 + signal``."""


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _angle(text: str) -> float:
    """argparse type: a finite angle in (0, pi] radians."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not 0.0 < value <= math.pi:
        raise argparse.ArgumentTypeError(f"{text} is not an angle in (0, pi] radians")
    return value


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (``train_lm.py: error: ...``), raised as :class:`ScriptError` (exit 2)."""

    def error(self, message: str):
        raise ScriptError(f"{message} (see {PROG} --help)")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--schedule", choices=SCHEDULES, default="harmonic", help="decay schedule (geonorm-* only)")
    ap.add_argument("--steps", type=_positive_int, default=1000, help="total optimiser steps (length of the lr schedule)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--data", default=None, help="text file or folder (default: the stdlib's *.py)")
    ap.add_argument("--ddp", action="store_true", help="DistributedDataParallel (launch with torchrun)")
    ap.add_argument("--d-model", type=_positive_int, default=128)
    ap.add_argument("--layers", type=_positive_int, default=4)
    ap.add_argument("--heads", type=_positive_int, default=4)
    ap.add_argument("--seq-len", type=_positive_int, default=128)
    ap.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per step per rank")
    ap.add_argument("--tie-head", action="store_true", help="tie the output head to the token embedding")
    ap.add_argument("--embed-norm", choices=("auto", "yes", "no"), default="auto",
                    help="LayerNorm on the embeddings (auto: yes for the Post-Norm variants, as BERT)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default: steps // 10)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--clamp", type=_angle, default=math.pi / 4, help="geodesic angle clamp (geonorm-* only)")
    ap.add_argument("--log-every", type=_positive_int, default=10, help="train loss rows (mean over the interval)")
    ap.add_argument("--eval-every", type=_positive_int, default=100)
    ap.add_argument("--eval-batches", type=_positive_int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: 2, or 1 per rank with --ddp)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--stop-after", type=_positive_int, default=None, help="stop after this many steps (for checkpoints)")
    ap.add_argument("--save-checkpoint", action="store_true", help="write OUT/checkpoint.pt at the end")
    ap.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="N",
                    help="also write OUT/checkpoint.pt every N steps (and at the end)")
    ap.add_argument("--resume", default=None, help="checkpoint.pt of an earlier run with the same arguments")
    ap.add_argument("--save-params", default=None,
                    help="write every rank's final state_dict to PATH with a .rank<r> suffix")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    opts = ap.parse_args(argv)
    if opts.d_model % opts.heads:
        ap.error(f"--d-model {opts.d_model} is not divisible by --heads {opts.heads}")
    if opts.data is not None and not os.path.exists(opts.data):
        ap.error(f"--data {opts.data}: no such file or folder")
    if opts.resume is not None and not os.path.isfile(opts.resume):
        ap.error(f"--resume {opts.resume}: no such checkpoint file")
    return opts


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


def _load_data(opts: argparse.Namespace):
    """``(data, validation batches)``; :class:`ScriptError` when the data is missing or too short."""
    try:
        data = lm.load_data(opts.data)
        val = lm.eval_batches(data.val, opts.eval_batches, opts.batch_size, opts.seq_len)
    except ValueError as e:
        raise ScriptError(f"--data {opts.data or '(standard library)'}: {e}: give more text or a smaller --seq-len")
    if data.train.numel() < opts.seq_len + 2:
        raise ScriptError(f"--data {opts.data}: the training split has {data.train.numel()} bytes, fewer than "
                          f"--seq-len + 2 = {opts.seq_len + 2}: give more text or a smaller --seq-len")
    return data, val


def _last_step(opts: argparse.Namespace) -> int:
    """The step this run stops after: ``--steps``, or ``--stop-after`` when that is earlier."""
    return min(opts.steps, opts.stop_after) if opts.stop_after is not None else opts.steps


def train(opts: argparse.Namespace) -> tuple[dict, nn.Module]:
    """Run one training job as ``opts`` describes; returns ``(summary, trained model)`` (unwrapped).

    Raises :class:`ScriptError` on bad input (before anything is built where it can be checked),
    :class:`CheckpointError` for a bad ``--resume`` file and :class:`TrainingInterrupted` after a
    SIGINT / SIGTERM once the checkpoint is written."""
    last = _last_step(opts)
    ckpt = None
    if opts.resume:  # read and check the checkpoint before building anything: fail fast
        ckpt = _read_checkpoint(opts.resume)
        _validate_checkpoint(ckpt, opts)
        if ckpt["step"] >= last:
            raise CheckpointError(f"--resume {opts.resume}: the checkpoint is at step {ckpt['step']} and this run "
                                  f"stops at step {last}: nothing to train; raise --steps / --stop-after")
    rank, world, device = _setup(opts)
    out = pathlib.Path(opts.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    data, val = _load_data(opts)
    val = [(x.to(device), y.to(device)) for x, y in val]
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
    first, running = 0, []
    if ckpt is not None:
        first = _load_checkpoint(opts, raw, opt, gen, ckpt)
        running = [torch.tensor(v, device=device) for v in ckpt.get("pending_losses", [])]
    warmup = opts.warmup if opts.warmup is not None else max(1, opts.steps // 10)
    tokens_per_step = opts.batch_size * opts.seq_len * world
    rows, diverged, done, stopped_by = [], False, first, 0
    log = _open_metrics(out / "metrics.csv", first if ckpt is not None else None) if rank == 0 else None
    writer = csv.writer(log) if log else None
    ckpt_path, saved_at = out / "checkpoint.pt", None

    def record(*row):
        rows.append(row)
        if writer:
            writer.writerow((row[0], row[1], f"{row[2]:.6f}", row[3], f"{row[4]:.3f}"))
            log.flush()

    def checkpoint():
        nonlocal saved_at
        save_checkpoint(ckpt_path, raw, opt, gen, done, running, opts)
        saved_at = done

    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(first, last), disable=rank != 0 or opts.quiet, desc=opts.variant, dynamic_ncols=True)
    with _StopOnSignal() as stop:
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
            if rank == 0 and opts.checkpoint_every and done % opts.checkpoint_every == 0:
                checkpoint()
            stopped_by = stop.on_any_rank(opts.ddp, device)
            if stopped_by:
                break
        bar.close()
        seconds = time.perf_counter() - t0
        if stopped_by:
            _stop(opts, rank, log, checkpoint if saved_at != done else None, ckpt_path, done, stopped_by)
    if opts.save_params:
        p = pathlib.Path(opts.save_params)
        atomic_save({k: v.detach().cpu() for k, v in raw.state_dict().items()},
                    p.with_name(f"{p.stem}.rank{rank}{p.suffix}"))
    summary = {}
    if rank == 0:
        if (opts.save_checkpoint or opts.checkpoint_every) and saved_at != done:
            checkpoint()
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
        atomic_write(out / "summary.json", lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))
        final = "n/a" if summary["final_val_loss"] is None else f"{summary['final_val_loss']:.4f}"
        print(f"[{opts.variant}] final val loss {final} after {done} steps, {seconds:.0f} s", flush=True)
    if opts.ddp:
        dist.barrier()
        dist.destroy_process_group()
    return summary, raw


def _stop(opts, rank: int, log, checkpoint, ckpt_path: pathlib.Path, done: int, signum: int):
    """After SIGINT / SIGTERM: write the checkpoint (rank 0, unless this step's is written), close the
    metrics, leave the process group, raise :class:`TrainingInterrupted` saying where the checkpoint is."""
    if rank == 0:
        if checkpoint is not None:
            checkpoint()
        log.close()
    if opts.ddp:
        dist.barrier()
        dist.destroy_process_group()
    name = signal.Signals(signum).name
    raise TrainingInterrupted(f"stopped by {name} after step {done} of {opts.steps}: checkpoint written to "
                              f"{ckpt_path}; continue with the same arguments plus --resume {ckpt_path}",
                              code=128 + signum)


class _StopOnSignal:
    """While active (main thread only), the first SIGINT or SIGTERM only records the signal: the training
    loop finishes its step, writes a checkpoint and stops. A second one raises :class:`KeyboardInterrupt`
    at once. The previous handlers are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        return False

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def on_any_rank(self, ddp: bool, device) -> int:
        """The signal received by this rank or, with DDP, by any rank (so all ranks stop at the same step);
        0 when none."""
        if not ddp:
            return self.signum
        flag = torch.tensor([self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


# ----------------------------------------------------------------------------------------- files on disk

def atomic_write(path, write) -> None:
    """Call ``write(f)`` on a temporary file next to ``path`` (binary), flush and fsync it, then
    ``os.replace`` it over ``path``: readers see the old file or the new one, never a partial one. On any
    failure the temporary file is removed and ``path`` is left as it was."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj, path) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def plain_data(obj):
    """``obj`` as data that ``torch.load(weights_only=True)`` accepts: tensors, numbers, strings, ``None``
    and dicts / lists / tuples of them (an ``OrderedDict`` keeps its state-dict ``_metadata``). An
    ``argparse.Namespace`` becomes a dict, paths and devices become strings; anything else is a
    :class:`TypeError` rather than a pickled object that would need code to load."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype)):
        return obj
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, (os.PathLike, torch.device)):
        return str(obj)
    if isinstance(obj, dict):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            out[plain_data(key)] = plain_data(value)
        if isinstance(getattr(obj, "_metadata", None), dict):
            out._metadata = plain_data(obj._metadata)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_data(v) for v in obj)
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint: only tensors and plain data, "
                    "so that it loads with torch.load(weights_only=True)")


def save_checkpoint(path, raw: nn.Module, opt, gen: torch.Generator, step: int, pending: list, opts) -> None:
    """Write ``path`` atomically: model and optimiser state, ``step``, the data generator, the train losses
    not yet logged and the arguments, as plain data (loadable with ``weights_only=True``)."""
    atomic_save(plain_data({"model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "data_generator": gen.get_state(), "pending_losses": [float(v) for v in pending],
                            "args": vars(opts)}), path)


def _open_metrics(path: pathlib.Path, resume_step: int | None):
    """``metrics.csv`` opened for appending rows. A fresh run starts a new file with its header. A run
    resumed from step ``resume_step`` into a folder that has the file keeps its rows up to that step (rows
    written after the checkpoint are dropped, so no step appears twice) and appends to it."""
    if resume_step is None or not path.exists():
        log = open(path, "w", newline="")  # noqa: SIM115 - written as training goes
        csv.writer(log).writerow(METRICS_HEADER)
        log.flush()
        return log
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != METRICS_HEADER:
        raise ScriptError(f"{path} is not a metrics file of {PROG} (header {rows[0] if rows else 'missing'}): "
                          "move it away or resume into another --out")
    try:
        keep = [r for r in rows[1:] if r and int(r[0]) <= resume_step]
    except ValueError:
        raise ScriptError(f"{path} has a row whose step is not a number: fix or move it away") from None
    if len(keep) != len(rows) - 1:
        text = io.StringIO(newline="")
        csv.writer(text).writerows([METRICS_HEADER, *keep])
        atomic_write(path, lambda f: f.write(text.getvalue().encode()))
    return open(path, "a", newline="")  # noqa: SIM115


def _read_checkpoint(path) -> dict:
    """``torch.load(path, weights_only=True)``: a file that holds anything but tensors and plain data
    (e.g. a pickle that would run code) is refused with :class:`CheckpointError`, as is a damaged one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"--resume {path}: cannot read it: {e.strerror or e}") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(f"--resume {path}: refused: it references {found.group(1)}, code that would run "
                                  "when loaded; a checkpoint holds only tensors and plain data (do not load this "
                                  "file with weights_only=False unless you wrote it)") from None
        raise CheckpointError(f"--resume {path}: not a checkpoint of {PROG} (it holds data torch.load(weights_only="
                              "True) does not accept); use a checkpoint this script wrote") from None
    except (RuntimeError, EOFError, ValueError) as e:
        lines = str(e).strip().splitlines()
        raise CheckpointError(f"--resume {path}: damaged or not a torch checkpoint ({lines[0] if lines else e!r}); "
                              "use an earlier checkpoint or start without --resume") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("args"), dict):
        raise CheckpointError(f"--resume {path}: not a checkpoint of {PROG} (no 'args' entry): use a checkpoint "
                              "written with --save-checkpoint / --checkpoint-every")
    return ckpt


def _validate_checkpoint(ckpt: dict, opts: argparse.Namespace) -> None:
    """:class:`CheckpointError` unless ``ckpt`` was written for the model ``opts`` describe and holds every
    entry of :data:`CHECKPOINT_KEYS`."""
    missing = object()
    saved = ckpt["args"]
    mismatch = {k: (saved.get(k, "<missing>"), getattr(opts, k)) for k in MODEL_ARGS
                if saved.get(k, missing) != getattr(opts, k)}
    if mismatch:
        raise CheckpointError(f"--resume: the checkpoint was written with other model arguments (checkpoint, now): "
                              f"{mismatch}; rerun with the checkpoint's arguments")
    wrong = [k for k, kind in CHECKPOINT_KEYS.items() if not isinstance(ckpt.get(k), kind)]
    if wrong:
        raise CheckpointError(f"--resume {opts.resume}: not a complete {PROG} checkpoint: {', '.join(wrong)} "
                              "missing or of the wrong type")


def _load_checkpoint(opts, raw: nn.Module, opt, gen: torch.Generator, ckpt: dict | None = None) -> int:
    """Load ``opts.resume`` (or the already read ``ckpt``) into the freshly built (and converted) ``raw``, the
    optimiser and the data generator; returns the step to start at. :class:`CheckpointError` if it does
    not fit."""
    if ckpt is None:
        ckpt = _read_checkpoint(opts.resume)
    _validate_checkpoint(ckpt, opts)
    try:
        raw.load_state_dict(ckpt["model"], strict=True)
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["data_generator"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        lines = str(e).strip().splitlines()
        raise CheckpointError(f"--resume {opts.resume}: does not fit the model these arguments build: "
                              f"{lines[0] if lines else type(e).__name__}") from None
    return int(ckpt["step"])


def main(argv=None) -> dict:
    """Parse ``argv`` and train; returns the summary (empty on ranks other than 0)."""
    return train(parse_args(argv))[0]


def cli(argv=None) -> int:
    """The command line: :func:`main` with exit codes and one-line messages instead of tracebacks: 0 done,
    2 bad input, 130 (143 for SIGTERM) interrupted."""
    try:
        main(argv)
        return 0
    except TrainingInterrupted as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.code
    except ScriptError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (Ctrl-C) without writing a checkpoint; one written earlier, if any, is intact",
              file=sys.stderr)
        return 130
    except gf.GeoNormError as e:
        lines = str(e).strip().splitlines()
        print(f"{PROG}: error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}: check the path "
              "and its permissions", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
