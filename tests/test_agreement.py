"""Both front ends agree: on every model of the suite that symbolic_trace can capture, tracer="fx" and
tracer="export" find the same sites and skipped norms and give the same converted outputs."""
import pytest
import torch

import geonorm_fx as gf
from geonorm_fx import zoo

from .stacks import MixedStack
from .test_kinds import ResNetBlock
from .test_reliability import TwoInTwoOut
from .tiny import NORM_SPELLINGS, FlatPreNorm, OddNormsModel, PostNormBlock, PreNormBlock, Stack, tokens

CASES = {
    **{f"stack-pre-{s}": (lambda s=s: Stack(PreNormBlock, depth=2, spelling=s), lambda: (tokens(),))
       for s in NORM_SPELLINGS},
    **{f"stack-post-{s}": (lambda s=s: Stack(PostNormBlock, depth=2, spelling=s, final_norm=False),
                           lambda: (tokens(),)) for s in NORM_SPELLINGS},
    "mixed": (lambda: MixedStack(["post", "sandwich", "respost", "parallel", "deepnorm", "pre"]), lambda: (tokens(),)),
    "odd-norms": (OddNormsModel, lambda: (tokens(),)),
    "flat": (FlatPreNorm, lambda: (torch.randn(2, 3, 16),)),
    "resnet": (ResNetBlock, lambda: (torch.randn(2, 8, 6, 6),)),
    "two-in-two-out": (TwoInTwoOut, lambda: (torch.randn(2, 5, 8), torch.randn(2, 4))),
}


def _summary(report):
    return ([(s.kind, s.norm, s.stream, s.block, s.path, s.decay) for s in report.sites],
            [(s.reason, s.path) for s in report.skipped])


@pytest.mark.parametrize("name", sorted(CASES))
def test_fx_and_export_agree(name):
    build, inputs = CASES[name]
    torch.manual_seed(0)
    model, args = build().eval(), inputs()
    by_fx = gf.convert(model, args, tracer="fx").eval()
    by_export = gf.convert(model, args, tracer="export").eval()
    assert _summary(by_fx.geonorm_report) == _summary(by_export.geonorm_report)
    with torch.no_grad():
        a, b = by_fx(*args), by_export(*args)
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["torch:encoder-pre", "hf:gpt2", "hf:bert"])
def test_models_symbolic_trace_cannot_capture_get_a_capture_error(spec):
    built = zoo.load(spec)
    with pytest.raises(gf.CaptureError, match="symbolic_trace.*use tracer='export'"):
        gf.inspect(built.model, built.args, tracer="fx")
    assert gf.inspect(built.model, built.args).sites  # the default front end captures them
