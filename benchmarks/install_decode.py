"""Cached decoding with ``gf.install`` against the source model, both through the same torch.compile backend.

    python benchmarks/install_decode.py [--backend inductor] [--tokens 128] [--reps 5] [--layers 4 --hidden 256]

A Llama causal LM (random weights, stock config: KV cache on) generates greedily from an 8-token prompt. The
source model's forward is compiled with ``torch.compile(model.forward, backend=B, fullgraph=True)``; the
installed copy gets ``gf.install(model, (prompt,), backend=B)``. Per-token decode time is
``(t(generate 1 + N tokens) - t(generate 1 token)) / N`` (the prefill cancels), medians over ``--reps`` rounds
run in turn (source, installed, source, ...). Compile time is the first ``generate`` call of each (every
graph Dynamo makes: prefill, first decode step, the dynamic decode step), for install plus ``install``
itself, with Inductor's on-disk caches off (``--warm-cache`` keeps them). Results go to
``benchmarks/results/install_decode.json``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import geonorm_fx as gf  # noqa: E402
from benchmarks.timing import per_token_decode, write_json  # noqa: E402


def build(layers: int, hidden: int, vocab: int = 1024):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4 // 1,
                                   num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                                   num_key_value_heads=max(hidden // 128, 1), max_position_embeddings=1024,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def timed_generate(model, prompt, n):
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + n
    return elapsed


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--warm-cache", action="store_true",
                    help="let Inductor reuse its on-disk caches (compile times then depend on earlier runs)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "install_decode.json"))
    args = ap.parse_args(argv)
    if not args.warm_cache:  # compile times of a first run, not of a cache hit from an earlier run
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True

    source = build(args.layers, args.hidden)
    installed = copy.deepcopy(source)
    prompt = torch.randint(1, 1000, (1, 8), generator=torch.Generator().manual_seed(1))

    source.forward = torch.compile(source.forward, backend=args.backend, fullgraph=True)
    start = time.perf_counter()
    gf.install(installed, (prompt,), backend=args.backend)
    install_s = time.perf_counter() - start
    compile_s = {"source": timed_generate(source, prompt, args.tokens),
                 "installed": install_s + timed_generate(installed, prompt, args.tokens)}

    models = {"source": source, "installed": installed}
    med, rounds = per_token_decode(lambda name, n: timed_generate(models[name], prompt, n), models, args.tokens,
                                   args.reps)
    result = {
        "command": "python benchmarks/install_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "backend": args.backend, "layers": args.layers, "hidden": args.hidden, "tokens": args.tokens,
        "reps": args.reps, "torch": torch.__version__, "threads": torch.get_num_threads(),
        **rounds,
        "ratio": med["installed"] / med["source"],
        "compile_s": compile_s, "install_s": install_s,
        "sites": len(installed.geonorm_report.sites),
    }
    print(f"backend={args.backend} layers={args.layers} hidden={args.hidden} prompt=8 new={args.tokens} "
          f"reps={args.reps} threads={torch.get_num_threads()}")
    print("| model | per-token decode (ms, median) | first generate incl. compile (s) |")
    print("|---|---|---|")
    print(f"| source, torch.compile | {med['source'] * 1e3:.3f} | {compile_s['source']:.1f} |")
    print(f"| gf.install ({result['sites']} sites) | {med['installed'] * 1e3:.3f} | {compile_s['installed']:.1f} "
          f"(install {install_s:.1f}) |")
    print(f"ratio installed / source: {result['ratio']:.3f}")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
