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
from geonorm_fx.oracles import affine_free_copy, geodesic_star, local_checks, post_identity, run_identities
from geonorm_fx.oracles.identities import detect_on_affine_free_copy
from geonorm_fx.oracles.local import _Rescale, rescale_stream_but_skip

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


def test_pre_identity_fails_without_a_final_norm_but_the_local_check_passes():
    """No final norm: the global identity's precondition fails, not the sites; every site passes the local
    check, so ``check_sites`` agrees and says why the global identity did not apply."""
    model = Stack(PreNormBlock, depth=2, final_norm=False).eval()
    assert gf.identity_gap(model, (tokens(),)) > 1e-2
    result = gf.check_sites(model, (tokens(),))
    assert result.pre_gap > 1e-2 and max(result.local_gaps) < 1e-5
    assert result.agree, str(result)
    assert any(n.startswith("global Pre-Norm identity not applicable") for n in result.notes), str(result)


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


# ------------------------------------------------------------------- the Post-Norm identity with an L2 norm
class L2Norm(nn.Module):
    """nGPT's normalization (transformers' DoryL2Norm): ``x / |x|``, RMSNorm up to the constant 1/sqrt(d)."""

    def __init__(self, d=None, eps=1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + self.eps)


class L2PostBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mix, self.norm1, self.mlp, self.norm2 = Mixer(d), L2Norm(), MLP(d), L2Norm()

    def forward(self, x):
        x = self.norm1(x + self.mix(x))
        return self.norm2(x + self.mlp(x))


def _loose_rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1.0)


class LooseRMSPostBlock(nn.Module):
    """An RMSNorm written out with a literal eps of 1 and no module of its own: neither the affine-free copy
    nor the graph's whole-op eps patch can make it scale-invariant, so its output magnitude varies with the
    token."""

    def __init__(self, d):
        super().__init__()
        self.mix, self.mlp = Mixer(d), MLP(d)

    def forward(self, x):
        x = _loose_rms(x + self.mix(x))
        return _loose_rms(x + self.mlp(x))


def test_post_identity_measures_the_magnitude_of_an_l2_norm():
    d = 16
    model = stack_of(L2PostBlock, depth=3, d=d, final=None)
    result = gf.check_sites(model, (tokens(),))
    assert [s.kind for s in result.report.sites] == ["post"] * 6
    assert result.post_gap < TOL, str(result)
    assert all(abs(g - 1 / math.sqrt(d)) < 1e-5 for g in result.norm_gains), result.norm_gains
    assert result.agree, str(result)
    assert any("0.25 x sqrt(d)" in n for n in result.notes), str(result)
    assert gf.identity_gap(model, (tokens(),)) < TOL
    rms = gf.check_sites(Stack(PostNormBlock, depth=2, spelling="nn.RMSNorm").eval(), (tokens(),))
    assert all(abs(g - 1) < 1e-5 for g in rms.norm_gains) and not any("sqrt(d)" in n for n in rms.notes)


def test_post_identity_on_dory_l2_norm():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DoryForCausalLM"):
        pytest.skip("this transformers has no Dory")
    torch.manual_seed(0)
    cfg = transformers.DoryConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                  use_cache=False)
    model = transformers.DoryForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    result = gf.check_sites(model, (tokens(vocab=64),))
    assert result.post_gap < TOL and result.agree, str(result)
    assert {round(g * math.sqrt(32), 4) for g in result.norm_gains if g is not None} == {1.0}


def test_post_identity_refuses_a_norm_that_is_not_scale_invariant():
    result = gf.check_sites(stack_of(LooseRMSPostBlock, depth=2, final=None), (tokens(),))
    assert [s.kind for s in result.report.sites] == ["post"] * 4
    assert not result.agree
    assert any("not a scale-invariant normalization of x + s" in d for d in result.disagreements), str(result)


# ----------------------------------------------------------------------- the local branch-invariance check
class Injected(nn.Module):
    """Pre-Norm blocks with the input re-injected after each block, ``h = block(h) + e`` (unscaled): the
    global identity's precondition fails, the sites are right."""

    def __init__(self, d=16, vocab=32, depth=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(PreNormBlock(d) for _ in range(depth))
        self.final, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids):
        e = self.embed(ids)
        h = e
        for block in self.blocks:
            h = block(h) + e
        return self.head(self.final(h))


class GainBlock(nn.Module):
    """``g * x + f(N(x))`` with a learned per-channel gain on the skip (Doge, MetaFormer's res_scale)."""

    def __init__(self, d):
        super().__init__()
        self.norm1, self.mix, self.g1 = nn.RMSNorm(d), Mixer(d), nn.Parameter(1 + 0.5 * torch.randn(d))
        self.norm2, self.mlp, self.g2 = nn.RMSNorm(d), MLP(d), nn.Parameter(1 + 0.5 * torch.randn(d))

    def forward(self, x):
        x = self.g1 * x + self.mix(self.norm1(x))
        return self.g2 * x + self.mlp(self.norm2(x))


def test_local_check_passes_where_an_unscaled_injection_breaks_the_global_identity():
    model = Injected().eval()
    assert [s.kind for s in gf.inspect(model, (tokens(),)).sites] == ["pre"] * 6
    result = gf.check_sites(model, (tokens(),))
    assert result.pre_gap > 1e-2
    assert len(result.local_gaps) == 6 and max(result.local_gaps) < 1e-5
    assert result.agree, str(result)
    note = next(n for n in result.notes if n.startswith("global Pre-Norm identity not applicable"))
    assert "every site passes the local branch-invariance check" in note


def test_local_check_rewires_every_read_but_the_skip():
    """The skip chain (here ``2 * x``, also read by the branch) stays unscaled for the sum only."""
    class Toy(nn.Module):
        def forward(self, x):
            a = x * 2.0
            return a + torch.sin(a)

    x = torch.randn(3, 4)
    gm = torch.fx.symbolic_trace(Toy())
    nodes = {n.name: n for n in gm.graph.nodes}
    rescale_stream_but_skip(gm, nodes["x"], nodes["mul"], {nodes["add"]}, nn.Identity())
    assert torch.allclose(gm(x), 2 * x + torch.sin(2 * x))
    gm = torch.fx.symbolic_trace(Toy())
    nodes = {n.name: n for n in gm.graph.nodes}
    rescale_stream_but_skip(gm, nodes["x"], nodes["mul"], {nodes["add"]}, _Rescale(3.0))
    assert torch.allclose(gm(x), 2 * x + torch.sin(6 * x))


def test_local_check_fails_on_a_value_the_branch_reads_directly():
    """A site whose x is the norm's output (what the branch reads directly) is not a pre-type site: rescaling
    it changes the branch sum. A site whose x and branch are swapped reads no x at all."""
    model = Stack(PreNormBlock, depth=2).eval()
    gm, sites = detect_on_affine_free_copy(model, (tokens(),))
    right = local_checks(gm, sites, (tokens(),))
    assert all(c.gap < 1e-5 and c.dependence > 1e-2 for c in right)
    normed = sites[2].norms[0].output
    wrong = _tampered(sites, 2, x=normed, stream_value=normed)
    checks = local_checks(gm, wrong, (tokens(),))
    assert checks[2].gap > 1e-2 and all(c.gap < 1e-5 for k, c in enumerate(checks) if k != 2)
    swapped = _tampered(sites, 2, x=sites[2].branches[0], stream_value=sites[2].branches[0],
                        branches=[sites[2].x])
    checks = local_checks(gm, swapped, (tokens(),))
    assert checks[2].gap < 1e-5 and checks[2].dependence < 1e-6


def test_check_sites_with_a_learned_skip_gain():
    """The skip scale is kept (site.x is ``g * x``): the global identity measures c on the update operand,
    and the local check rescales the stream under the gain."""
    torch.manual_seed(0)
    model = stack_of(GainBlock, depth=2)
    report = gf.inspect(model, (tokens(),))
    assert [s.kind for s in report.sites] == ["pre"] * 4
    result = gf.check_sites(model, (tokens(),))
    assert result.pre_gap < TOL and max(result.local_gaps) < 1e-5, str(result)
    assert [round(j, 3) for j in result.j] == [1, 2, 3, 4]
    assert result.agree, str(result)


def test_check_sites_on_doge_learnable_residual_gains():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.DogeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                  num_experts=4, num_experts_per_tok=2, use_cache=False)
    model = transformers.DogeForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_residual"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    result = gf.check_sites(model, (tokens(vocab=64),))
    assert result.pre_gap < TOL and max(result.local_gaps) < 1e-5, str(result)
    assert [round(j, 3) for j in result.j] == [1, 2, 3, 4]
    assert result.agree, str(result)
