"""Regressions found by the transformers zoo sweep (benchmarks/zoo_sweep.py), one tiny model of each
affected family: the general mechanism that was fixed, checked where it first failed."""
import pytest
import torch
from torch.export import Dim

import geonorm_fx as gf
from geonorm_fx import zoo

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _tiny(config_cls: str, model_cls: str, **config):
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**config)
    return getattr(transformers, model_cls)._from_config(cfg, attn_implementation="eager").eval()


def _ids(batch: int, seq: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))


def _convert(model, args):
    """``gf.convert`` of one dynamic ``torch.export`` capture (one export instead of two: fast)."""
    dims = tuple({0: Dim.AUTO, 1: Dim.AUTO} for _ in args)
    return gf.convert(torch.export.export(model, args, dynamic_shapes=dims, strict=False), args)


def _invariant(module, *args) -> tuple[object, list[float]]:
    gaps = []

    def hook(mod, inputs, out):
        x = inputs[0].float()
        r = x.norm(dim=mod.dim)
        gaps.append(float(((out.float().norm(dim=mod.dim) - r).abs() / r.clamp_min(1e-6)).max()))

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, gf.GeodesicUpdate)]
    try:
        module.eval()
        with torch.no_grad():
            out = module(*args)
    finally:
        for h in handles:
            h.remove()
    return out, gaps


def test_exported_program_keeps_its_dynamic_shapes():
    """An ExportedProgram captured with dynamic batch/sequence dims stays dynamic: its unlifted module
    carries a ``_guards_fn`` call without shape metadata, which used to trigger shape propagation on the
    example inputs and so replaced the symbolic shapes by static ones (report.dynamic was False)."""
    built = zoo.load("hf:llama")
    ids = built.args[0]
    ep = torch.export.export(built.model, (ids,), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},), strict=False)
    assert gf.inspect(ep, (ids,)).dynamic is True
    module = gf.convert(ep, (ids,))
    assert module.geonorm_report.dynamic is True and module.geonorm_report.counts() == {"pre": 4}
    out, gaps = _invariant(module, _ids(3, 11))
    assert out.logits.shape[:2] == (3, 11) and len(gaps) == 4 and max(gaps) <= 1e-5


def test_depth_scaled_residual_is_a_site():
    """Beam's ``a * x + c * N2(f(N1(x)))`` (depth-scaled residual add, both terms scaled): the constant
    on the stream used to hide every site (zero sites, 13 norms skipped); it is now a sandwich site whose
    update reads the scaled stream ``a * x`` (the scale is kept), the branch constant staying in ``s``."""
    model = _tiny("BeamConfig", "BeamForCausalLM", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, max_position_embeddings=64,
                  layer_types=["full_attention"] * 2, mlp_layer_types=["dense"] * 2, use_cache=False)
    module = _convert(model, (_ids(2, 8),))
    assert module.geonorm_report.counts() == {"sandwich": 4}
    out, gaps = _invariant(module, _ids(3, 11))
    assert bool(out.logits.isfinite().all()) and len(gaps) == 4 and max(gaps) <= 1e-5


def test_learnable_residual_gain_is_kept():
    """Doge's ``w * x + f(N(x))`` with a per-channel learnable gain ``w`` on the stream: a pre site whose update
    reads ``w * x`` (GEONORM.md section 4: a scale on the skip is kept), so the trained gain stays a parameter
    of the converted model and still acts: scaling it changes the output."""
    model = _tiny("DogeConfig", "DogeForCausalLM", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  num_experts=4, num_experts_per_tok=2, use_cache=False)
    module = _convert(model, (_ids(2, 8),))
    report = module.geonorm_report
    assert report.counts() == {"pre": 4}
    gains = [name for name, _ in model.named_parameters() if name.endswith("_residual")]
    assert len(gains) == 4 and all(name in module.state_dict() for name in gains)
    assert not report.removed_parameters
    ids = _ids(3, 11)
    out, gaps = _invariant(module, ids)
    assert bool(out.logits.isfinite().all()) and len(gaps) == 4 and max(gaps) <= 1e-5
    with torch.no_grad():
        module.state_dict()[gains[0]].mul_(3.0)
        changed = module(ids).logits
    assert not torch.allclose(changed, out.logits)


def test_bias_expanded_to_the_stream_shape_is_not_a_stream_read():
    """GPT-NeoX-Japanese adds ``attn_bias.expand_as(residual)`` to the attention output: ``expand_as``
    reads only the residual's shape, but counted as a data edge it let the stream bypass the norm, and
    the attention site of layer 1 was missed (pre=3, its norm reported as a side head)."""
    model = _tiny("GPTNeoXJapaneseConfig", "GPTNeoXJapaneseForCausalLM", vocab_size=128, hidden_size=64,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, use_cache=False)
    report = gf.inspect(model, (_ids(2, 8),))
    assert report.counts() == {"pre": 4}
    assert [s.reason.split(":")[0] for s in report.skipped] == ["final norm"]


def test_elementwise_affine_nonorm_is_reported_as_the_reason():
    """MobileBERT's NoNorm (``x * w + b``) after each residual sum: no site, and the report says why
    (it used to give no reason at all for these sums)."""
    model = _tiny("MobileBertConfig", "MobileBertModel", vocab_size=128, hidden_size=64, embedding_size=64,
                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    report = gf.inspect(model, (_ids(2, 8),))
    affine = [s for s in report.skipped if s.reason.startswith("elementwise affine")]
    assert report.sites == [] and len(affine) >= 2 * 2  # attention and FFN sums of both layers at least


def test_sum_of_squares_l2_norm_is_a_norm():
    """Dory (nGPT-style) normalizes with ``x * rsqrt(sum(x**2) + eps)``, an RMSNorm up to the constant
    ``1/sqrt(d)``; it was not recognised, so the model had no site and no reason. Its interpolation
    ``N(x + a * (N(f(x)) - x))`` is a post site."""
    model = _tiny("DoryConfig", "DoryForCausalLM", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=64, layer_types=["full_attention"] * 2, use_cache=False)
    report = gf.inspect(model, (_ids(2, 8),))
    assert report.counts().get("post", 0) >= 4 and {s.norm for s in report.sites} == {"rms_norm"}


def test_hyper_connection_norms_say_why_they_are_not_sites():
    """HY-V4 mixes ``hc_mult`` residual streams (hyper-connections) before each block's norm, so the
    residual add ``x + post * f(N(pre @ x))`` does not normalize its stream ``x``: no site. Its norms
    were reported with "no residual add reads or feeds it", which is wrong (they feed one)."""
    model = _tiny("HYV4Config", "HYV4ForCausalLM", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=8, intermediate_size=128,
                  n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64,
                  n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                  qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=64, use_cache=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, mlp_layer_types=["dense", "dense"],
                  layer_types=["indexed_attention"] * 2, indexer_types=["full", "shared"])
    report = gf.inspect(model, (_ids(2, 8),))
    feeding = [s for s in report.skipped if s.reason.startswith("feeds a residual add")]
    assert report.sites == [] and len(feeding) >= 2 * 2  # the attention and MLP input norms of both layers


def test_pow_minus_half_rmsnorm_is_a_norm():
    """Gemma 3n's RMSNorm computes ``x * torch.pow(mean(x**2) + eps, -0.5)`` (pow, not rsqrt): it was
    not recognised, so Gemma 3n had no site and no reason. Its own norm class in a pre-norm stack."""
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norms = torch.nn.ModuleList(Gemma3nRMSNorm(16) for _ in range(2))
            self.fs = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))

        def forward(self, x):
            for norm, f in zip(self.norms, self.fs):
                x = x + f(norm(x))
            return x

    report = gf.inspect(Stack(), (torch.randn(2, 5, 16),))
    assert report.counts() == {"pre": 2} and {s.norm for s in report.sites} == {"rms_norm"}


def test_parameter_only_term_of_a_residual_sum_is_part_of_the_branch():
    """``x + f(N(x)) + bias.expand_as(x)`` (GPT-NeoX-Japanese's bias_dropout_add, with the bias as its own
    term of the flattened sum): a term computed from parameters only need not depend on ``x``; it used to
    hide the site. It stays in the update's ``s``: the converted output equals the geodesic step of it."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)
            self.f = torch.nn.Linear(16, 16, bias=False)
            self.bias = torch.nn.Parameter(torch.randn(16))

        def forward(self, x):
            return x + self.f(self.norm(x)) + self.bias.expand_as(x)

    model, x = Block().eval(), torch.randn(2, 5, 16)
    module = gf.convert(model, (x,))
    assert module.geonorm_report.counts() == {"pre": 1}
    update = next(m for m in module.modules() if isinstance(m, gf.GeodesicUpdate))
    with torch.no_grad():
        expected = update(x, model.f(model.norm(x)) + model.bias.expand_as(x))
        assert torch.allclose(module.eval()(x), expected, atol=1e-6)


class _ChannelsFirst(torch.nn.Module):
    """A stream in ``(N, C, L)`` layout (SqueezeBERT's): 1x1 convolutions as branches, a LayerNorm over
    the channels applied through ``permute(0, 2, 1)``; ``placement`` is "post" (``N(x + f(x))``, the
    permute back after the norm) or "pre" (``x + f(N(x))``, the branch reads the norm in ``(N, L, C)``)."""

    def __init__(self, placement: str, c: int = 16, blocks: int = 2):
        super().__init__()
        self.placement = placement
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(c) for _ in range(blocks))
        self.convs = torch.nn.ModuleList(torch.nn.Conv1d(c, c, 1) for _ in range(blocks))
        self.linears = torch.nn.ModuleList(torch.nn.Linear(c, c) for _ in range(blocks))

    def forward(self, x):
        for norm, conv, linear in zip(self.norms, self.convs, self.linears):
            if self.placement == "post":
                x = norm((x + conv(x)).permute(0, 2, 1)).permute(0, 2, 1)
            else:
                x = x + linear(norm(x.permute(0, 2, 1))).transpose(1, 2)
        return x

    def geonorm(self, x, updates):
        """Hand-written GeoNorm of this stack: the update over the channel dimension."""
        for norm, conv, linear, geo in zip(self.norms, self.convs, self.linears, updates):
            s = conv(x) if self.placement == "post" else linear(norm(x.permute(0, 2, 1))).transpose(1, 2)
            x = gf.geodesic_step(x.transpose(1, 2), s.transpose(1, 2), scale=geo.scale, bias=geo.bias,
                                 decay=geo.decay, clamp=geo.clamp).transpose(1, 2)
        return x


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_channels_first_stream_norm_through_a_permute(placement):
    """SqueezeBERT keeps its stream as ``(N, C, L)`` and normalizes it over C through ``permute`` -> LayerNorm
    -> ``permute`` back: the norm is over one feature dimension of the stream, just not the last. It
    used to give zero sites ("normalizes over dimension(s)..." was not even said); now each site's
    update runs over that dimension and equals the hand-written GeoNorm."""
    torch.manual_seed(0)
    model, x = _ChannelsFirst(placement).eval(), torch.randn(2, 16, 7)
    # batch and length (dims 0 and 2) are dynamic; the channels (dim 1) are not
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim.AUTO, 2: Dim.AUTO},), strict=False)
    module = gf.convert(ep, (x,))
    assert module.geonorm_report.counts() == {placement: 2}
    updates = [m for m in module.modules() if isinstance(m, gf.GeodesicUpdate)]
    assert [u.dim for u in updates] == [-2, -2]
    if placement == "post":
        assert sorted(module.geonorm_report.removed_parameters) == [f"norms.{i}.{p}" for i in (0, 1)
                                                                     for p in ("bias", "weight")]
    x2 = torch.randn(3, 16, 9)
    with torch.no_grad():
        torch.testing.assert_close(module(x2), model.geonorm(x2, updates), rtol=1e-5, atol=1e-5)
    out, gaps = _invariant(module, x2)
    assert len(gaps) == 2 and max(gaps) <= 1e-5


def test_geodesic_step_over_another_dimension_is_the_transposed_step():
    x, s = torch.randn(2, 8, 5), torch.randn(2, 8, 5)
    expected = gf.geodesic_step(x.transpose(1, 2), s.transpose(1, 2), scale=1.3, decay=0.5).transpose(1, 2)
    torch.testing.assert_close(gf.geodesic_step(x, s, scale=1.3, decay=0.5, dim=-2), expected)


def test_squeezebert_post_norm_over_channels():
    """The SqueezeBERT model itself: two post sites per layer (attention and FFN), the channel norm's
    parameters removed, finite outputs at a new shape with the invariant holding over the channels."""
    model = _tiny("SqueezeBertConfig", "SqueezeBertModel", vocab_size=128, hidden_size=64, embedding_size=64,
                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=64, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2,
                  intermediate_groups=4, output_groups=4)
    module = _convert(model, (_ids(2, 8),))
    report = module.geonorm_report
    assert report.counts() == {"post": 4}
    assert len(report.removed_parameters) == 4 * 2
    out, gaps = _invariant(module, _ids(3, 11))
    assert out.last_hidden_state.shape == (3, 11, 64) and bool(out.last_hidden_state.isfinite().all())
    assert len(gaps) == 4 and max(gaps) <= 1e-5
