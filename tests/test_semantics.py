"""The converted model equals a hand-written GeoNorm model with the same weights."""
import math

import pytest
import torch

import geonorm_fx as gf

from .reference import reference_geodesic
from .tiny import NORM_SPELLINGS, PostNormBlock, PreNormBlock, Stack, tokens


def geonorm_forward(model: Stack, toks, pre: bool, decays, clamp=math.pi / 4):
    """GeoNorm written by hand over the Stack's own modules (GEONORM.md section 4 rewrite rules)."""
    x = model.embed(toks)
    for k, block in enumerate(model.blocks):
        if pre:
            x = reference_geodesic(x, block.mix(block.norm1(x)), decays[k], clamp)
            x = reference_geodesic(x, block.mlp(block.norm2(x)), decays[k], clamp)
        else:
            x = reference_geodesic(x, block.mix(x), decays[k], clamp)
            x = reference_geodesic(x, block.mlp(x), decays[k], clamp)
    if model.final is not None:
        x = model.final(x)
    return model.head(x)


@pytest.mark.parametrize("spelling", NORM_SPELLINGS)
@pytest.mark.parametrize("pre", [True, False], ids=["pre", "post"])
def test_converted_equals_hand_written_geonorm(spelling, pre):
    model = Stack(PreNormBlock if pre else PostNormBlock, depth=3, spelling=spelling, final_norm=pre).eval()
    toks = tokens()
    converted = gf.convert(model, (toks,)).eval()
    assert converted.geonorm_report.counts() == {"pre" if pre else "post": 6}
    with torch.no_grad():
        expected = geonorm_forward(model, toks, pre, [1.0, 0.5, 1 / 3])
        torch.testing.assert_close(converted(toks), expected, atol=2e-5, rtol=2e-5)
        other = tokens(batch=3, seq=9, seed=1)  # another batch size and sequence length
        torch.testing.assert_close(converted(other), geonorm_forward(model, other, pre, [1.0, 0.5, 1 / 3]),
                                   atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("schedule,decays", [("sqrt", [1.0, 2 ** -0.5, 3 ** -0.5]), ("linear", [1.0, 2 / 3, 1 / 3]),
                                             ([0.3, 0.2, 0.1], [0.3, 0.2, 0.1])])
def test_schedule_and_clamp_reach_the_graph(schedule, decays):
    model = Stack(PreNormBlock, depth=3).eval()
    toks = tokens()
    converted = gf.convert(model, (toks,), schedule=schedule, clamp=math.pi / 8).eval()
    assert [s.decay for s in converted.geonorm_report.sites] == pytest.approx([d for d in decays for _ in (0, 1)])
    with torch.no_grad():
        torch.testing.assert_close(converted(toks), geonorm_forward(model, toks, True, decays, math.pi / 8),
                                   atol=2e-5, rtol=2e-5)


def test_fx_and_export_front_ends_agree():
    model = Stack(PostNormBlock, depth=2, spelling="hand_rms", final_norm=False).eval()
    toks = tokens()
    a = gf.convert(model, (toks,), tracer="fx").eval()
    b = gf.convert(model, (toks,), tracer="export").eval()
    assert [(s.kind, s.block) for s in a.geonorm_report.sites] == [(s.kind, s.block) for s in b.geonorm_report.sites]
    with torch.no_grad():
        torch.testing.assert_close(a(toks), b(toks))
