"""Detection: norm spellings, site kinds by dataflow, skipped norms with reasons, block indices."""
import pytest
import torch
from torch import nn

import geonorm_fx as gf

from .tiny import (NORM_SPELLINGS, FlatPreNorm, OddNormsModel, PostNormBlock, PreNormBlock, Stack, norm_kind,
                   tokens)


@pytest.mark.parametrize("tracer", ["export", "fx"])
@pytest.mark.parametrize("spelling", NORM_SPELLINGS)
@pytest.mark.parametrize("block,kind", [(PreNormBlock, "pre"), (PostNormBlock, "post")])
def test_every_norm_spelling_in_both_placements(tracer, spelling, block, kind):
    model = Stack(block, depth=3, spelling=spelling, final_norm=kind == "pre").eval()
    report = gf.inspect(model, (tokens(),), tracer=tracer)
    assert report.counts() == {kind: 6}
    assert {s.norm for s in report.sites} == {norm_kind(spelling)}
    assert [s.block for s in report.sites] == [0, 0, 1, 1, 2, 2]
    assert [s.path for s in report.sites] == [f"blocks.{k}" for k in (0, 0, 1, 1, 2, 2)]
    assert [s.reason.split(":")[0] for s in report.skipped] == (["final norm"] if kind == "pre" else [])


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_norms_that_are_not_sites_are_skipped_with_reasons(tracer):
    report = gf.inspect(OddNormsModel().eval(), (tokens(),), tracer=tracer)
    assert report.counts() == {"pre": 2}
    assert [(s.norm, s.block) for s in report.sites] == [("layer_norm", 0), ("rms_norm", 0)]
    reasons = {s.path: s.reason for s in report.skipped}
    assert reasons["emb_norm"].startswith("embedding norm")
    assert reasons["final"].startswith("final norm")
    assert reasons["mix.q_norm"].startswith("off the residual stream")
    assert "last 2 dimensions" in [r for p, r in reasons.items() if p not in ("emb_norm", "final", "mix.q_norm")][0]
    assert len(report.skipped) == 4


def test_norm_first_transformer_encoder():
    for norm_first, kind in ((True, "pre"), (False, "post")):
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        enc = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(16), enable_nested_tensor=False).eval()
        report = gf.inspect(enc, (torch.randn(2, 5, 16),))
        assert report.counts() == {kind: 6}
        assert [s.path for s in report.sites] == [f"layers.{k}" for k in (0, 0, 1, 1, 2, 2)]
        assert [s.reason.split(":")[0] for s in report.skipped] == ["final norm"]


def test_sites_without_block_modules_are_grouped_two_per_block():
    report = gf.inspect(FlatPreNorm().eval(), (torch.randn(2, 3, 16),))
    assert report.counts() == {"pre": 4}
    assert [s.block for s in report.sites] == [0, 0, 1, 1]
    assert [s.decay for s in report.sites] == [1.0, 1.0, 0.5, 0.5]
    assert all(s.path == "" for s in report.sites)


def test_plain_residual_adds_without_norms_are_not_sites():
    class ResMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            for f in self.f:
                x = x + torch.relu(f(x))
            return x

    report = gf.inspect(ResMLP(), (torch.randn(2, 4, 8),))
    assert report.sites == [] and report.skipped == []


def test_report_table_and_json():
    report = gf.inspect(OddNormsModel().eval(), (tokens(),))
    text = str(report)
    assert "pre" in text and "embedding norm" in text and "mix.q_norm" in text
    data = report.to_dict()
    assert data["counts"] == {"pre": 2} and len(data["skipped"]) == 4
    assert data["sites"][0].keys() >= {"kind", "norm", "block", "decay", "path"}
