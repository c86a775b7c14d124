"""Kernel launches Inductor generates for each site kind, source vs converted (issue 4: each update fuses).

For a stack of every site kind (tests/stacks.py spelling variants), compiles the source and the converted
model with torch.compile and counts generated-kernel launches in one no_grad call (matmuls are library calls
and not counted). The converted model must need no more launches than the source's residual add + norm did.

Usage: python benchmarks/kernel_count.py [--kinds pre,post,sandwich,respost,parallel,deepnorm] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import geonorm_fx as gf  # noqa: E402
from geonorm_fx.exporters import kernel_launches  # noqa: E402
from tests.stacks import MixedStack  # noqa: E402
from tests.tiny import tokens  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="pre,post,sandwich,respost,parallel,deepnorm")
    ap.add_argument("--spellings", default="nn.LayerNorm,hand_rms")
    ap.add_argument("--json", default="benchmarks/results/kernel_count.json")
    opts = ap.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    print("| kind | norm spelling | sites | source launches | converted launches | extra per site |")
    print("|---|---|---|---|---|---|")
    for kind in opts.kinds.split(","):
        for spelling in opts.spellings.split(","):
            torch.manual_seed(0)
            model = MixedStack([kind, kind], spelling=spelling).eval()
            converted = gf.convert(model, (tokens(),)).eval()
            sites = len(converted.geonorm_report.sites)
            src, conv = kernel_launches(model, (tokens(),)), kernel_launches(converted, (tokens(),))
            rows.append({"kind": kind, "spelling": spelling, "sites": sites, "source": src, "converted": conv})
            print(f"| {kind} | {spelling} | {sites} | {src} | {conv} | {(conv - src) / sites:+.2f} |", flush=True)
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
