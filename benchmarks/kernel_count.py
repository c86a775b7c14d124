"""Count the CPU kernels Inductor generates for a Pre-Norm stack before and after conversion.

Usage: python benchmarks/kernel_count.py [--depth N] [--width D]
"""
from __future__ import annotations

import argparse
import re
import warnings

import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import geonorm_fx as gf


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.n1, self.f1 = nn.RMSNorm(d), nn.Linear(d, d)
        self.n2, self.f2 = nn.RMSNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.f1(self.n1(x))
        return x + self.f2(self.n2(x))


def kernels(module, x) -> int:
    torch._dynamo.reset()
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(module), x)
    return len(re.findall(r"cpp_fused_\w+ = ", "\n".join(code)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    opts = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(opts.width) for _ in range(opts.depth)], nn.RMSNorm(opts.width)).eval()
    x = torch.randn(2, 16, opts.width)
    converted = gf.convert(model, (x,)).eval()
    sites = len(converted.geonorm_report.sites)
    src, conv = kernels(model, x), kernels(converted, x)
    print(f"sites={sites} source_kernels={src} converted_kernels={conv} extra_per_site={(conv - src) / sites:.2f}")


if __name__ == "__main__":
    main()
