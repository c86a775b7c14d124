"""Property-based: random stacks with known ground truth. The detected kinds and counts equal the
ground truth and the converted model equals the hand-written GeoNorm reference from the same weights.

Default runs a few examples (fast); ``pytest --hypothesis-profile=thorough tests/test_properties.py``
runs hundreds."""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

import geonorm_fx as gf

from .stacks import ASSOCIATIONS, PLACEMENTS, MixedStack
from .tiny import NORM_SPELLINGS, tokens


@st.composite
def stacks(draw):
    depth = draw(st.integers(1, 6))
    config = dict(
        placements=draw(st.lists(st.sampled_from(PLACEMENTS), min_size=depth, max_size=depth)),
        spellings=draw(st.lists(st.sampled_from(NORM_SPELLINGS), min_size=depth, max_size=depth)),
        d=draw(st.sampled_from([8, 16, 24])),
        final_norm=draw(st.booleans()),
        p=draw(st.sampled_from([0.0, 0.1])),
        assoc=draw(st.sampled_from(ASSOCIATIONS)),
        shared=draw(st.booleans()),
    )
    seed = draw(st.integers(0, 2**16))
    tracer = draw(st.sampled_from(["export", "fx"]))
    schedule = draw(st.sampled_from(["harmonic", "sqrt", "linear"]))
    return config, seed, tracer, schedule


@given(stacks())
def test_random_stacks_match_ground_truth_and_reference(case):
    config, seed, tracer, schedule = case
    torch.manual_seed(seed)
    model = MixedStack(**config).eval()
    toks = tokens(batch=2, seq=5, seed=seed)
    module = gf.convert(model, (toks,), tracer=tracer, schedule=schedule).eval()
    for graph in module._geonorm_graphs.values():
        graph.lint()
    report = module.geonorm_report
    assert report.counts() == model.expected_counts()
    depth = len(config["placements"])
    assert report.n_blocks == depth
    assert [s.block for s in report.sites] == [k for k, b in enumerate(model.blocks) for _ in range(b.n_sites)]
    assert [s.reason.split(":")[0] for s in report.skipped] == (["final norm"] if config["final_norm"] else [])
    decays = gf.decay_constants(schedule, depth)
    with torch.no_grad():
        torch.testing.assert_close(module(toks), model.geonorm_forward(toks, decays, math.pi / 4),
                                   atol=5e-5, rtol=5e-5)
