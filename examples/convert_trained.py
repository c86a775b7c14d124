"""Convert a *trained* Pre-Norm LM with geonorm-fx, then fine-tune it, against continuing Pre-Norm training.

    python examples/convert_trained.py --pretrain-steps 300 --finetune-steps 150 --out examples/results
    python examples/convert_trained.py --pretrain-steps 30 --finetune-steps 20 --data FILE --out /tmp/ct  # quick

1. Train the Pre-Norm GPT of ``train_lm.py`` for ``--pretrain-steps`` (warmup + cosine).
2. Convert the trained model with each decay schedule and measure the validation loss right after conversion
   (the geodesic update is a different function from ``x + s``, so the loss moves).
3. Fine-tune the harmonic conversion for ``--finetune-steps`` and, from the same trained weights, continue the
   Pre-Norm model for the same steps: fresh AdamW each, the same lr schedule, the same batches.
Writes ``OUT/convert_trained.md`` (and ``convert_trained.json``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_model as lm  # noqa: E402
import train_lm  # noqa: E402

import geonorm_fx as gf  # noqa: E402


def fit(model: nn.Module, data: lm.ByteData, val: list, opts, steps: int, lr: float, seed: int, desc: str) -> list:
    """Train ``model`` for ``steps`` (fresh AdamW, warmup + cosine from ``lr``, batches drawn with ``seed``);
    returns ``[(step, validation loss)]`` every ``opts.eval_every`` steps and at the end."""
    opt = lm.make_optimizer(model, lr)
    gen = torch.Generator().manual_seed(seed)
    curve = [(0, lm.evaluate(model, val))]
    model.train()
    for step in tqdm(range(steps), desc=desc, disable=opts.quiet, dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = lm.lr_at(step, steps, lr, max(1, steps // 10))
        x, y = lm.sample_batch(data.train, opts.batch_size, opts.seq_len, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % opts.eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, lm.evaluate(model, val)))
    return curve


def main(argv=None) -> None:
    """Pre-train, convert, fine-tune; write the markdown report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3, help="pre-training peak lr")
    ap.add_argument("--finetune-lr", type=float, default=3e-4)
    ap.add_argument("--d-model", type=int, default=96)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    start = time.perf_counter()
    data = lm.load_data(opts.data)
    val = lm.eval_batches(data.val, opts.eval_batches, opts.batch_size, opts.seq_len)
    cfg = lm.GPTConfig(d_model=opts.d_model, n_layers=opts.layers, n_heads=opts.heads, seq_len=opts.seq_len)
    torch.manual_seed(opts.seed)
    model = lm.GPT(cfg)
    pre_curve = fit(model, data, val, opts, opts.pretrain_steps, opts.lr, opts.seed + 10_000, "pre-train")
    trained_loss = pre_curve[-1][1]
    example = torch.zeros(2, cfg.seq_len, dtype=torch.long)
    after = {}
    converted = None
    for schedule in ("harmonic", "sqrt", "linear", "none"):
        module = gf.convert(model, (example,), schedule=schedule)
        assert module.geonorm_report.counts() == lm.expected_counts(cfg), module.geonorm_report
        after[schedule] = lm.evaluate(module, val)
        print(f"after conversion ({schedule}): val loss {after[schedule]:.4f} (trained Pre-Norm {trained_loss:.4f})")
        if schedule == "harmonic":
            converted = module
    ft_seed = opts.seed + 20_000
    geo_curve = fit(converted, data, val, opts, opts.finetune_steps, opts.finetune_lr, ft_seed, "geonorm fine-tune")
    cont_curve = fit(copy.deepcopy(model), data, val, opts, opts.finetune_steps, opts.finetune_lr, ft_seed,
                     "pre-norm continued")
    seconds = time.perf_counter() - start
    result = {"trained_prenorm": trained_loss, "after_conversion": after, "geonorm_finetuned": geo_curve[-1][1],
              "prenorm_continued": cont_curve[-1][1], "pretrain_curve": pre_curve, "geonorm_curve": geo_curve,
              "prenorm_curve": cont_curve, "model": cfg.to_dict(), "options": vars(opts), "seconds": seconds,
              "data": data.describe(), "versions": train_lm.versions()}
    out = pathlib.Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convert_trained.json").write_text(json.dumps(result, indent=2) + "\n")
    args = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Converting a trained Pre-Norm model", "",
        f"Command: `python examples/convert_trained.py {args}`", "",
        f"Model {json.dumps(cfg.to_dict())}; data {data.source} (byte-level); batch {opts.batch_size}x{opts.seq_len}; "
        f"pre-training {opts.pretrain_steps} steps at lr {opts.lr}, then {opts.finetune_steps} steps at lr "
        f"{opts.finetune_lr} (fresh AdamW, warmup + cosine, identical batches for both arms); validation on "
        f"{opts.eval_batches * opts.batch_size} fixed windows; torch {result['versions']['torch']}; "
        f"total {seconds:.0f} s on {torch.get_num_threads()} threads.", "",
        "| stage | validation loss (nats/byte) |", "|---|---|",
        f"| Pre-Norm after {opts.pretrain_steps} steps | {trained_loss:.4f} |"]
    lines += [f"| right after `gf.convert(..., schedule=\"{s}\")` | {v:.4f} |" for s, v in after.items()]
    lines += [f"| GeoNorm (harmonic) after {opts.finetune_steps} fine-tuning steps | {geo_curve[-1][1]:.4f} |",
              f"| Pre-Norm continued for {opts.finetune_steps} steps | {cont_curve[-1][1]:.4f} |", "",
              "Fine-tuning curves (step: GeoNorm / Pre-Norm continued): " +
              ", ".join(f"{g[0]}: {g[1]:.4f} / {c[1]:.4f}" for g, c in zip(geo_curve, cont_curve)), ""]
    (out / "convert_trained.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
