"""Peak memory of ``inspect`` / ``convert`` / ``convert(copy=False)`` / ``install`` as a multiple of the model's size.

    python benchmarks/memory.py [--layers 8 --hidden 512 --vocab 32000]

Each operation runs in a fresh process on a freshly built Llama (random weights, float32). The process's peak
resident set is reset just before the operation (``/proc/self/clear_refs``, Linux) and read after it
(``VmHWM``); the table shows ``(peak - resident before) / parameter bytes``: 1.0 means one extra copy of the
weights. Results go to ``benchmarks/results/memory.json``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OPERATIONS = ("inspect", "convert", "convert_copy_false", "install")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure(op: str, layers: int, hidden: int, vocab: int) -> dict:
    """Run ``op`` here and return the peak growth (in this process)."""
    sys.path.insert(0, os.path.dirname(HERE))
    import torch
    import transformers

    import geonorm_fx as gf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                   num_key_value_heads=hidden // 64, max_position_embeddings=512,
                                   use_cache=op == "install")
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, vocab, (2, 16))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    if op == "inspect":
        gf.inspect(model, (ids,))
    elif op == "convert":
        result = gf.convert(model, (ids,))
    elif op == "convert_copy_false":
        result = gf.convert(model, (ids,), copy=False)
    elif op == "install":
        gf.install(model, (ids,), backend="eager")
        with torch.no_grad():
            model(ids)
    peak = _status_kib("VmHWM")
    return {"op": op, "param_mib": param_bytes / 2**20, "peak_growth_mib": (peak - before) / 1024,
            "multiple": (peak - before) * 1024 / param_bytes}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--one", choices=OPERATIONS, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "memory.json"))
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.layers, args.hidden, args.vocab)))
        return []
    rows = []
    for op in OPERATIONS:
        run = subprocess.run([sys.executable, __file__, "--one", op, "--layers", str(args.layers), "--hidden",
                              str(args.hidden), "--vocab", str(args.vocab)], capture_output=True, text=True)
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{op} failed")
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"Llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: "
          f"{rows[0]['param_mib']:.0f} MiB of float32 parameters")
    print("| operation | peak memory growth (MiB) | x model size |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['op'].replace('_copy_false', '(copy=False)')} | {r['peak_growth_mib']:.0f} | {r['multiple']:.2f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
