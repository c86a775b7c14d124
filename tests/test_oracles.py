"""The oracles judge a site list by other means than the detector: the Pre-Norm and Post-Norm identities
(numerics) and the module tree (structure). They pass on right detections and fail on wrong ones."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import geonorm_fx as gf
from geonorm_fx import zoo
from geonorm_fx.oracles import affine_free_copy, geodesic_star, post_identity, run_identities
from geonorm_fx.oracles.identities import detect_on_affine_free_copy

from .tiny import (MLP, NORM_SPELLINGS, Mixer, OddNormsModel, PostNormBlock, PreNormBlock, Stack, TokenStack,
                   make_norm, tokens)

TOL = 1e-3


# ------------------------------------------------------------------------------------- hand-written models
class SandwichBlock(nn.Module):
    def __init__(self, d, spelling="nn.RMSNorm"):
        super().__init__()
        self.n1, self.mix, self.n2 = make_norm(spelling, d), Mixer(d), make_norm(spelling, d)
        self.n3, self.mlp, self.n4 = make_norm(spelling, d), MLP(d), make_norm(spelling, d)

    def forward(self, x):
        x = x + self.n2(self.mix(self.n1(x)))
        return x + self.n4(self.mlp(self.n3(x)))


class ParallelBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.n1, self.mix, self.n2, self.mlp = nn.LayerNorm(d), Mixer(d), nn.LayerNorm(d), MLP(d)

    def forward(self, x):
        return x + self.mix(self.n1(x)) + self.mlp(self.n2(x))


class ResPostBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mix, self.n1, self.mlp, self.n2 = Mixer(d), nn.LayerNorm(d), MLP(d), nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.n1(self.mix(x))
        return x + self.n2(self.mlp(x))


def stack_of(block, depth=3, d=16, final="nn.LayerNorm"):
    return TokenStack(lambda: [block(d) for _ in range(depth)], d, 32, final).eval()


class PatchMerged(nn.Module):
    """Two stacks of Pre-Norm blocks joined by a norm-only boundary ``Linear(LN(x))`` that widens d -> 2d
    (Swin's PatchMerging): a new residual stream starts there, and with it the identity's count."""

    def __init__(self, d=16, vocab=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.stage1 = nn.ModuleList(PreNormBlock(d) for _ in range(2))
        self.merge_norm, self.merge = nn.LayerNorm(d), nn.Linear(d, 2 * d)
        self.stage2 = nn.ModuleList(PreNormBlock(2 * d) for _ in range(2))
        self.final, self.head = nn.LayerNorm(2 * d), nn.Linear(2 * d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.stage1:
            x = block(x)
        x = self.merge(self.merge_norm(x))
        for block in self.stage2:
            x = block(x)
        return self.head(self.final(x))


class NoSites(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.lin, self.norm = nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(self.lin(x))


# ------------------------------------------------------------------------------------------------ the math
def test_geodesic_star_is_the_rescaled_sum_and_post_identity_is_the_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    s = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    x[0, 0] = 0.0                 # a zero state: the formula must still give N(x + s)
    s[0, 1] = 2.5 * x[0, 1]       # an update parallel to the state (|v| = 0)
    total = x + s
    expected = x.norm(dim=-1, keepdim=True) * total / total.norm(dim=-1, keepdim=True)
    assert torch.allclose(geodesic_star(x, s)[1:], expected[1:], atol=1e-12)
    assert torch.allclose(post_identity(x, s, "rms_norm"), F.rms_norm(total, (8,), eps=0.0), atol=1e-10)
    assert torch.allclose(post_identity(x, s, "layer_norm"), F.layer_norm(total, (8,), eps=0.0), atol=1e-10)
    # another feature dimension (a channels-first stream)
    xt, st = x.transpose(1, 2), s.transpose(1, 2)
    assert torch.allclose(post_identity(xt, st, "rms_norm", dim=-2).transpose(1, 2),
                          F.rms_norm(total, (8,), eps=0.0), atol=1e-10)


# ------------------------------------------------------------------------------------------- affine-free copy
class GemmaNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight, self.eps = nn.Parameter(0.1 * torch.randn(d)), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class NoNorm(nn.Module):  # MobileBERT: an elementwise affine named like a norm
    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.weight + self.bias


def test_affine_free_copy_uses_the_module_tree_and_checks_each_norm_numerically():
    model = nn.ModuleDict({"ln": make_norm("nn.LayerNorm", 8), "rms": make_norm("nn.RMSNorm", 8),
                           "hand": make_norm("hand_rms", 8), "t5": make_norm("t5_rms", 8),
                           "func": make_norm("F.layer_norm", 8), "gemma": GemmaNorm(8), "nonorm": NoNorm(8),
                           "bn": nn.BatchNorm1d(8)})
    before = copy.deepcopy(model.state_dict())
    free = affine_free_copy(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # the source is untouched
    m = free.model
    assert sorted(free.changed) == ["func", "gemma", "hand", "ln", "rms", "t5"]
    assert [u.split(":")[0] for u in free.unrecognised] == ["nonorm"]
    assert torch.equal(m.nonorm.weight, model.nonorm.weight) and torch.equal(m.bn.weight, model.bn.weight)
    assert torch.all(m.gemma.weight == 0) and torch.all(m.hand.weight == 1) and torch.all(m.ln.bias == 0)
    assert m.ln.eps == m.rms.eps == m.hand.eps == m.gemma.eps == 1e-12
    x = 5 * torch.randn(4, 8) + 1
    for name in ("rms", "hand", "t5", "gemma"):
        assert torch.allclose(m[name](x), F.rms_norm(x, (8,)), atol=1e-5), name
    for name in ("ln", "func"):
        assert torch.allclose(m[name](x), F.layer_norm(x, (8,)), atol=1e-4), name


# -------------------------------------------------------------------------------------- the identities hold
@pytest.mark.parametrize("spelling", NORM_SPELLINGS)
def test_post_identity_holds_on_post_norm_stacks(spelling):
    model = Stack(PostNormBlock, depth=3, spelling=spelling).eval()
    assert gf.identity_gap(model, (tokens(),)) < TOL


@pytest.mark.parametrize("spelling", NORM_SPELLINGS)
def test_pre_identity_holds_with_measured_positions(spelling):
    result = gf.check_sites(Stack(PreNormBlock, depth=3, spelling=spelling).eval(), (tokens(),))
    assert result.agree, str(result)
    assert result.pre_gap < TOL and result.post_gap is None
    assert [round(j, 3) for j in result.j] == [1, 2, 3, 4, 5, 6]
    assert max(result.scale_residuals) < 1e-5


def test_identities_on_hugging_face_bert_and_llama():
    pytest.importorskip("transformers")
    bert = zoo.load("hf:bert")
    assert gf.identity_gap(bert.model, bert.args, bert.kwargs) < TOL
    llama = zoo.load("hf:llama")
    result = gf.check_sites(llama.model, llama.args, llama.kwargs)
    assert result.agree, str(result)
    assert result.post_gap is None and result.pre_gap < TOL
    assert [round(j, 3) for j in result.j] == [1, 2, 3, 4]


def test_pre_identity_holds_for_sandwich_and_parallel_sites():
    for block, kind in ((SandwichBlock, "sandwich"), (ParallelBlock, "parallel")):
        model = stack_of(block)
        assert {s.kind for s in gf.inspect(model, (tokens(),)).sites} == {kind}
        result = gf.check_sites(model, (tokens(),))
        assert result.agree, str(result)
        assert result.pre_gap < TOL


def test_pre_identity_restarts_at_a_patch_merging_boundary():
    """j is measured, so it restarts where the stream passes through a norm, whatever the detector's
    stream numbering says."""
    result = gf.check_sites(PatchMerged().eval(), (tokens(),))
    assert result.pre_gap < TOL, str(result)
    assert [round(j, 3) for j in result.j] == [1, 2, 3, 4, 1, 2, 3, 4]
    assert result.agree, str(result)


def test_prenorm_identity_gap_is_the_same_machinery():
    model = Stack(PreNormBlock, depth=2).eval()
    assert gf.prenorm_identity_gap(model, (tokens(),)) < TOL
    with pytest.raises(gf.GeoNormError, match="pure Pre-Norm"):
        gf.prenorm_identity_gap(stack_of(SandwichBlock), (tokens(),))


def test_sites_without_an_identity_and_models_without_sites_are_refused():
    with pytest.raises(gf.GeoNormError, match="no site to check"):
        gf.identity_gap(stack_of(ResPostBlock), (tokens(),))
    result = gf.check_sites(stack_of(ResPostBlock), (tokens(),))   # the sweep entry reports instead
    assert result.pre_gap is None and result.post_gap is None and result.agree
    assert any("respost" in n for n in result.notes)
    with pytest.raises(gf.NoSitesError):
        gf.identity_gap(NoSites().eval(), (torch.randn(2, 3, 16),))


# ----------------------------------------------------------------------------------- the identities can fail
def _tampered(sites, i, **changes):
    out = list(sites)
    out[i] = copy.copy(sites[i])
    for k, v in changes.items():
        setattr(out[i], k, v)
    return out


def test_pre_identity_fails_when_the_stream_and_the_branch_are_swapped():
    model = Stack(PreNormBlock, depth=2).eval()
    gm, sites = detect_on_affine_free_copy(model, (tokens(),))
    site = sites[2]
    wrong = _tampered(sites, 2, x=site.branches[0], branches=[site.x])
    outcome = run_identities(gm, wrong, (tokens(),))
    assert outcome.probe_gap < 1e-6          # x + s is still the sum: only the stream is wrong
    assert outcome.gap > 1e-2
    assert outcome.sites[3].scale_residual > 1e-2   # the next site sees a state that is not the stream


def test_pre_identity_fails_without_a_final_norm():
    model = Stack(PreNormBlock, depth=2, final_norm=False).eval()
    assert gf.identity_gap(model, (tokens(),)) > 1e-2
    assert not gf.check_sites(model, (tokens(),)).agree


def test_post_identity_fails_on_a_wrong_state():
    model = Stack(PostNormBlock, depth=2).eval()
    gm, sites = detect_on_affine_free_copy(model, (tokens(),))
    wrong = _tampered(sites, 2, x=sites[0].x)       # the embedding instead of the block's input
    assert run_identities(gm, wrong, (tokens(),)).gap > 1e-2


def test_post_identity_fails_on_a_wrong_norm_kind():
    model = Stack(PostNormBlock, depth=2, spelling="nn.LayerNorm").eval()
    gm, sites = detect_on_affine_free_copy(model, (tokens(),))
    norm = copy.copy(sites[0].norm)
    norm.kind = "rms_norm"
    assert run_identities(gm, _tampered(sites, 0, norm=norm), (tokens(),)).gap > 1e-2


# ------------------------------------------------------------------------------------- the structural check
def _report(model, args):
    return gf.inspect(model, args)


def test_structural_check_agrees_on_right_reports():
    for model in (Stack(PreNormBlock, depth=3).eval(), Stack(PostNormBlock, depth=3).eval(), PatchMerged().eval()):
        check = gf.structural_check(model, _report(model, (tokens(),)))
        assert check.ok, str(check)
    flat = OddNormsModel().eval()
    check = gf.structural_check(flat, _report(flat, (tokens(),)))
    assert check.ok and any("flat" in n for n in check.notes)


def test_structural_check_on_shared_and_encoder_decoder_blocks():
    pytest.importorskip("transformers")
    for spec in ("hf:albert", "hf:t5-full"):
        built = zoo.load(spec)
        check = gf.structural_check(built.model, gf.inspect(built.model, built.args, built.kwargs))
        assert check.ok, f"{spec}: {check}"


def test_structural_check_finds_a_site_moved_to_another_block():
    model = Stack(PreNormBlock, depth=3).eval()
    report = _report(model, (tokens(),))
    sites = list(report.sites)
    first_of_1 = sites[2]
    sites[2] = dataclasses.replace(first_of_1, block=0, path="blocks.0", decay=sites[0].decay)
    check = gf.structural_check(model, dataclasses.replace(report, sites=sites))
    text = "\n".join(check.disagreements)
    assert "lies outside its block 'blocks.0'" in text
    assert "PreNormBlock" in text and "blocks.1" in text and "blocks.0" in text   # the signatures differ


def test_structural_check_finds_a_final_norm_taken_for_a_post_norm():
    model = Stack(PostNormBlock, depth=2).eval()
    report = _report(model, (tokens(),))
    sites = list(report.sites)
    sites[-1] = dataclasses.replace(sites[-1], norm_path="final")
    check = gf.structural_check(model, dataclasses.replace(report, sites=sites))
    assert any("'final' lies outside its block" in d for d in check.disagreements), str(check)
    sites[-1] = dataclasses.replace(sites[-1], path="")     # and without a block path at all
    check = gf.structural_check(model, dataclasses.replace(report, sites=sites))
    assert any("never a post site" in d for d in check.disagreements), str(check)


def test_structural_check_finds_bad_block_order_and_decays():
    model = Stack(PreNormBlock, depth=3).eval()
    report = _report(model, (tokens(),))
    sites = list(report.sites)
    swapped = sites[:2] + [dataclasses.replace(s, block=2, decay=sites[4].decay) for s in sites[2:4]] \
        + [dataclasses.replace(s, block=1, decay=sites[2].decay) for s in sites[4:]]
    check = gf.structural_check(model, dataclasses.replace(report, sites=swapped))
    assert any("skipping" in d for d in check.disagreements) and any("after block 2" in d for d in check.disagreements)
    one_decay = sites[:3] + [dataclasses.replace(sites[3], decay=0.123)] + sites[4:]
    check = gf.structural_check(model, dataclasses.replace(report, sites=one_decay))
    assert any("different decays" in d for d in check.disagreements), str(check)
    assert math.isclose(sites[2].decay, sites[3].decay)


def test_check_sites_measures_each_identity_on_its_own_in_a_mixed_model():
    """Post-Norm blocks then Pre-Norm blocks: the post blocks end in a norm, so the pre stream's count
    starts at 1 after them; each identity gets its own capture and its own gap."""
    d = 16
    model = TokenStack(lambda: [PostNormBlock(d), PostNormBlock(d), PreNormBlock(d), PreNormBlock(d)], d, 32,
                       "nn.LayerNorm").eval()
    result = gf.check_sites(model, (tokens(),))
    assert [s.kind for s in result.report.sites] == ["post"] * 4 + ["pre"] * 4
    assert result.pre_gap < TOL and result.post_gap < TOL, str(result)
    assert [None if j is None else round(j, 3) for j in result.j] == [None] * 4 + [1, 2, 3, 4]
    assert gf.identity_gap(model, (tokens(),)) < TOL
    assert result.agree, str(result)
