"""Print a markdown table: what the pass does to each built-in model (sites, blocks, skips, the
norm-preservation check, conversion time). Usage: python benchmarks/zoo_table.py [--json OUT]"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from collections import Counter

from geonorm_fx import convert, zoo
from geonorm_fx.cli import _check_invariant


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write the rows as JSON here")
    opts = ap.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for spec in zoo.BUILTIN:
        try:
            built = zoo.load(spec)
        except zoo.SpecError as e:
            print(f"skipping {spec}: {e}")
            continue
        start = time.perf_counter()
        module = convert(built.model, built.args, built.kwargs)
        seconds = time.perf_counter() - start
        report = module.geonorm_report
        check = _check_invariant(module, built.args, built.kwargs)
        rows.append({"spec": spec, "model": type(built.model).__name__, "counts": report.counts(),
                     "blocks": "+".join(map(str, report.blocks_per_stream)), "skipped": [s.reason.split(":")[0] for s in report.skipped],
                     "removed_parameters": len(report.removed_parameters),
                     "max_relative_norm_change": check["max_relative_norm_change"], "convert_seconds": seconds})
    print("| spec | model | sites | blocks | skipped | removed params | max \\|\\|out\\|-\\|x\\||/\\|x\\| | convert (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sites = ", ".join(f"{k}={v}" for k, v in r["counts"].items())
        skipped = ", ".join(f"{n}x {reason}" if n > 1 else reason for reason, n in Counter(r["skipped"]).items())
        print(f"| `{r['spec']}` | {r['model']} | {sites} | {r['blocks']} | {skipped or '-'} | "
              f"{r['removed_parameters']} | {r['max_relative_norm_change']:.1e} | {r['convert_seconds']:.2f} |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
