"""Every residual placement (GEONORM.md section 4), mixed stacks, shared layers, two streams, non-sites."""
import math

import pytest
import torch
from torch import nn

import geonorm_fx as gf

from .stacks import ASSOCIATIONS, PLACEMENTS, MixedStack
from .tiny import tokens


def _check(model, tracer="export", kinds=None, schedule="harmonic", clamp=math.pi / 4):
    toks = tokens()
    module = gf.convert(model, (toks,), tracer=tracer, kinds=kinds, schedule=schedule, clamp=clamp).eval()
    assert module.geonorm_report.counts() == model.expected_counts(kinds)
    decays = gf.decay_constants(schedule, len(model.blocks))
    with torch.no_grad():
        torch.testing.assert_close(module(toks), model.geonorm_forward(toks, decays, clamp, kinds),
                                   atol=3e-5, rtol=3e-5)
    return module


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("spelling", ["nn.LayerNorm", "hand_rms"])
def test_each_placement_converts_to_the_reference(placement, spelling):
    model = MixedStack([placement] * 3, spelling=spelling, final_norm=placement != "post").eval()
    module = _check(model)
    sites = module.geonorm_report.sites
    per_block = 1 if placement == "parallel" else 2
    assert [s.block for s in sites] == [k for k in range(3) for _ in range(per_block)]


@pytest.mark.parametrize("assoc", ASSOCIATIONS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared-norm", "two-norms"])
def test_parallel_any_association(assoc, shared):
    _check(MixedStack(["parallel"] * 2, assoc=assoc, shared=shared).eval())


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_fx_and_export_agree(placement):
    model = MixedStack([placement] * 2, spelling="t5_rms").eval()
    toks = tokens()
    a = gf.convert(model, (toks,), tracer="fx").eval()
    b = gf.convert(model, (toks,), tracer="export").eval()
    assert [(s.kind, s.norm, s.block, s.path) for s in a.geonorm_report.sites] == \
        [(s.kind, s.norm, s.block, s.path) for s in b.geonorm_report.sites]
    assert [s.reason for s in a.geonorm_report.skipped] == [s.reason for s in b.geonorm_report.skipped]
    with torch.no_grad():
        torch.testing.assert_close(a(toks), b(toks), atol=1e-5, rtol=1e-5)


def test_mix_ln_stack_post_first_quarter_then_pre():
    placements = ["post"] * 2 + ["pre"] * 6
    module = _check(MixedStack(placements, spellings=["nn.LayerNorm"] * 4 + ["nn.RMSNorm"] * 4).eval())
    report = module.geonorm_report
    assert [s.kind for s in report.sites] == ["post"] * 4 + ["pre"] * 12
    assert report.n_blocks == 8 and report.blocks_per_stream == [8]
    assert [s.block for s in report.sites] == [k for k in range(8) for _ in range(2)]


def test_kinds_rewrites_only_the_named_kinds():
    model = MixedStack(["post", "sandwich", "pre", "respost"]).eval()
    module = _check(model, kinds=["pre", "respost"])
    assert sum("not in kinds" in s.reason for s in module.geonorm_report.skipped) == 4


def test_a_shared_layer_applied_n_times_is_n_blocks():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.layer = MixedStack(["pre"]).blocks[0]
            self.final = nn.LayerNorm(16)

        def forward(self, toks):
            x = self.embed(toks)
            for _ in range(4):
                x = self.layer(x)
            return self.final(x)

    model = Shared().eval()
    module = gf.convert(model, (tokens(),)).eval()
    report = module.geonorm_report
    assert [s.block for s in report.sites] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [s.decay for s in report.sites] == [1, 1, 0.5, 0.5, 1 / 3, 1 / 3, 0.25, 0.25]
    assert {s.path for s in report.sites} == {"layer"}
    assert set(module.state_dict()) - set(model.state_dict()) == {
        f"geonorm.{i}.{p}" for i in range(8) for p in ("scale", "bias", "decay_constant")}
    with torch.no_grad():
        x = model.embed(tokens())
        for k in range(4):
            x = model.layer.geonorm(x, 1 / (k + 1), math.pi / 4)
        torch.testing.assert_close(module(tokens()), model.final(x), atol=3e-5, rtol=3e-5)


class ResNetBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.gn = nn.GroupNorm(2, c)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(h)))
        return self.gn(x + torch.relu(x))


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_batchnorm_and_groupnorm_residual_blocks_are_not_sites(tracer):
    report = gf.inspect(ResNetBlock().eval(), (torch.randn(2, 8, 6, 6),), tracer=tracer)
    assert report.sites == []
    kinds = sorted(s.reason.split(" normalizes")[0] for s in report.skipped)
    assert kinds == ["batch norm", "batch norm", "group norm"]
    assert all("ResNet-style" in s.reason for s in report.skipped)


def test_norm_over_another_dimension_is_skipped():
    class OverSeq(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(8, 8)

        def forward(self, x):
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + 1e-6)  # RMS over the sequence
            return x + self.f(h)

    report = gf.inspect(OverSeq(), (torch.randn(2, 5, 8),))
    assert report.sites == []
    assert len(report.skipped) == 1 and "dimension(s) [1]" in report.skipped[0].reason
