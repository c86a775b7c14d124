"""The model families named in issue 13, with the site lists GEONORM.md prescribes (sections 3 and 4, the
"Decision (soundness)" bullets), not what the detector happens to do.

A. Real transformers classes from tiny configs (offline): Swin2SR, Zamba2, Wav2Vec2 (post-norm encoder),
   SigLIP vision. Each is captured once with ``torch.export`` (dynamic batch, and sequence where there is
   one) and converted from that ExportedProgram (one export instead of two).
B. Hand-written equivalents of x-transformers, vit-pytorch MaxViT / T2T-ViT and timm DaViT / TinyViT /
   SAM-ViT / EdgeNeXt / XCiT / CAFormer / SwinV2 (tests/named_models.py; each class names the file it
   mirrors). One ``gf.convert`` per model; its ``module.geonorm_report`` is the report checked.

For every model: the sites as ``(kind, stream, block, norm path)`` in report order (streams relabelled
0, 1, ... by first appearance: the spec numbers blocks within a stream but says nothing of the stream ids),
the decays ``1 / (block + 1)``, the norms that must be left alone (listed in ``report.skipped`` under their
module path, never a site's norm, their parameters still in the converted ``state_dict``, unchanged and not
in ``removed_parameters``), ``module.training`` equal to the source's, and the converted output at a second
input shape with the source's output shapes and finite. x-transformers and CAFormer are also compared with
a float64 hand-written GeoNorm model (tests/reference.py ``reference_geodesic``, harmonic decays).

Where the spec does not decide the block grouping (or the stream) unambiguously, the test says so in a
comment and asserts only the counts, kinds, site norms and what must be kept, or lists the alternatives.
All failures of one model are collected and reported together.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

import geonorm_fx as gf

from . import named_models as nm


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _leaves(out):
    return [x for x in pytree.tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


class Checks:
    """Collects every disagreement of one converted model with the spec, then fails once with all of them."""

    def __init__(self, name, model, convert):
        self.name, self.model, self.errors = name, model, []
        self.src_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.src_training = model.training
        try:
            self.module = convert()
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"[{name}] convert raised {_first_line(e)}")
        self.report = self.module.geonorm_report
        self.out_sd = self.module.state_dict()
        if self.module.training != self.src_training:
            self.errors.append(f"module.training is {self.module.training}, the source's is {self.src_training}")
        for s in self.report.sites:
            if not math.isclose(s.decay, 1.0 / (s.block + 1), rel_tol=1e-9):
                self.errors.append(f"site {s.node} ({s.norm_path}): decay {s.decay:.4g} != 1/(block+1), "
                                   f"block {s.block}")

    # -- sites
    def got(self):
        ids: dict[int, int] = {}
        return [(s.kind, ids.setdefault(s.stream, len(ids)), s.block, s.norm_path) for s in self.report.sites]

    def sites(self, *alternatives):
        """The sites, in report order, must be one of ``alternatives`` (lists of (kind, stream, block, norm))."""
        got = self.got()
        if got not in [list(a) for a in alternatives]:
            alt = " or ".join(str(list(a)) for a in alternatives)
            self.errors.append(f"sites (kind, stream, block, norm): expected {alt}; got {got}")

    def kinds(self, counts, norms):
        """Grouping not asserted: only the counts by kind and the set of site norms."""
        if self.report.counts() != counts:
            self.errors.append(f"counts: expected {counts}, got {self.report.counts()}")
        got = {s.norm_path for s in self.report.sites}
        if got != set(norms):
            self.errors.append(f"site norms: missing {sorted(set(norms) - got)}, unexpected {sorted(got - set(norms))}")

    def norm_kinds(self, kind):
        bad = [(s.norm_path, s.norm) for s in self.report.sites if s.norm != kind]
        if bad:
            self.errors.append(f"site norm kinds: expected {kind!r} for every site, got {bad}")

    # -- what must be left alone
    def listed(self, *paths):
        skipped = {s.path for s in self.report.skipped}
        for p in paths:
            if p not in skipped:
                self.errors.append(f"norm {p!r} not listed in report.skipped (skipped: {sorted(skipped)})")
            used = [s.node for s in self.report.sites if s.norm_path == p]
            if used:
                self.errors.append(f"norm {p!r} must not be a site's norm (sites {used})")

    def kept(self, *keys):
        removed = set(self.report.removed_parameters)
        for key in keys:
            assert key in self.src_sd, f"test bug: {key!r} is not a parameter of the source"
            if key in removed:
                self.errors.append(f"kept parameter {key!r} is in report.removed_parameters")
            if key not in self.out_sd:
                self.errors.append(f"kept parameter {key!r} missing from the converted state_dict")
            elif not torch.equal(self.out_sd[key].detach().cpu(), self.src_sd[key]):
                self.errors.append(f"kept parameter {key!r} changed")

    def kept_under(self, *prefixes):
        self.kept(*[k for k in self.src_sd if any(k.startswith(p + ".") for p in prefixes)])

    def removed(self, expected):
        got = sorted(self.report.removed_parameters)
        if got != sorted(expected):
            self.errors.append(f"removed_parameters: expected {sorted(expected)}, got {got}")

    # -- outputs
    def _run(self, fn, args, seed):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            return fn(*args)

    def outputs(self, args, seed=None, label=""):
        """At ``args`` (another shape than the conversion example) the converted module runs, and gives the
        source's output shapes, all finite."""
        ref = self._run(self.model, args, seed)
        try:
            out = self._run(self.module, args, seed)
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"{label}at {tuple(args[0].shape)} the converted module raised {_first_line(e)}")
            return None
        lo, lr = _leaves(out), _leaves(ref)
        shapes_o, shapes_r = [tuple(t.shape) for t in lo], [tuple(t.shape) for t in lr]
        if shapes_o != shapes_r:
            self.errors.append(f"{label}at {tuple(args[0].shape)}: output shapes {shapes_o} != source's {shapes_r}")
        elif not all(bool(t.float().isfinite().all()) for t in lo):
            self.errors.append(f"{label}at {tuple(args[0].shape)}: non-finite output")
        return out, ref

    def unchanged(self, inputs):
        """Nothing rewritten: the converted output is the source's."""
        for args in inputs:
            res = self.outputs(args)
            if res is not None:
                for o, r in zip(_leaves(res[0]), _leaves(res[1])):
                    if o.shape == r.shape and not torch.allclose(o, r, rtol=1e-5, atol=1e-5):
                        self.errors.append(f"at {tuple(args[0].shape)}: output differs from the source's although "
                                           f"nothing should be rewritten (max err {(o - r).abs().max():.3g})")

    def against(self, reference, inputs):
        """The converted output equals the float64 hand-written GeoNorm model at every input shape."""
        for args in inputs:
            try:
                with torch.no_grad():
                    out = self.module(*args)
            except Exception as e:  # noqa: BLE001
                self.errors.append(f"at {tuple(args[0].shape)} the converted module raised {_first_line(e)}")
                continue
            with torch.no_grad():
                ref = reference(*[a.double() if a.is_floating_point() else a for a in args])
            if out.shape != ref.shape:
                self.errors.append(f"at {tuple(args[0].shape)}: shape {tuple(out.shape)} != reference "
                                   f"{tuple(ref.shape)}")
                continue
            err = (out.double() - ref).abs().max().item()
            if not torch.allclose(out.double(), ref, rtol=1e-4, atol=1e-4):
                self.errors.append(f"at {tuple(args[0].shape)}: output differs from the float64 GeoNorm reference: "
                                   f"max abs err {err:.3g} (scale {ref.abs().max().item():.3g})")

    def done(self):
        assert not self.errors, f"[{self.name}]\n  " + "\n  ".join(self.errors)


def _pre(stream, block, *norms, kind="pre"):
    return [(kind, stream, block, n) for n in norms]


# =================================================================================================
# A. real transformers classes from tiny configs

def _transformers():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _tiny(config_cls, model_cls, **config):
    transformers = _transformers()
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**config)
    return nm.jitter(getattr(transformers, model_cls)._from_config(cfg, attn_implementation="eager")).eval()


def _export_convert(model, args, dims):
    """``gf.convert`` of one ``torch.export`` capture, ``dims`` the dynamic dims of each input."""
    ep = torch.export.export(model, args, dynamic_shapes=tuple({d: Dim.AUTO for d in ds} for ds in dims), strict=False)
    return gf.convert(ep, args)


def _ids(b, t, vocab=128):
    return torch.randint(4, vocab, (b, t), generator=torch.Generator().manual_seed(100 * b + t))


def test_swin2sr_final_layernorm_kept():
    """Swin2SRModel: per stage (RSTB) a stack of res-post-norm layers ``x + N(attn(x))``, ``x + N(mlp(x))``
    inside the stage's own residual ``x + conv(layers(x))``; after the stages, ``layernorm`` reads that
    residual sum: a norm outside the blocks, never a post site (GEONORM.md section 4: "the final norm after
    norm-free blocks (... Swin2SR's last residual)"). One stage of 2 layers: 4 respost sites, blocks 0, 0,
    1, 1 (the layer stack is the stream; the stage input is also the outer skip: a sum split by
    dataflow keeps every block's own site); the final norm and the patch-embedding norm skipped."""
    model = _tiny("Swin2SRConfig", "Swin2SRModel", image_size=16, patch_size=1, num_channels=3, embed_dim=16,
                  depths=[2], num_heads=[2], window_size=4, mlp_ratio=2.0)
    args = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
    ch = Checks("swin2sr", model, lambda: _export_convert(model, args, [(0,)]))
    layer = "encoder.stages.0.layers"
    ch.sites(_pre(0, 0, f"{layer}.0.layernorm_before", f"{layer}.0.layernorm_after", kind="respost")
             + _pre(0, 1, f"{layer}.1.layernorm_before", f"{layer}.1.layernorm_after", kind="respost"))
    ch.listed("layernorm", "embeddings.patch_embeddings.layernorm")
    ch.kept("layernorm.weight", "layernorm.bias")
    ch.kept(*[k for k in ch.src_sd if "norm" in k])  # respost keeps every norm
    ch.removed([])
    ch.outputs((torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)),))
    ch.done()


def test_zamba2_final_norm_and_branch_norm_kept():
    """Zamba2ForCausalLM with layers [mamba, hybrid]: the mamba layer is ``x + mamba(N(x))``: a pre site at
    block 0. The hybrid layer is ``x + mamba(N(x + linear(shared_transformer(cat(x, e)))))``: its
    ``mamba_decoder.input_layernorm`` reads a sum of the stream and a branch, inside the outer branch
    (GEONORM.md section 4: "a norm inside a branch f is part of f, whatever it reads"; the corpus case
    branch-norm-reads-inner-sum: no site): never removed, listed as skipped. ``final_layernorm`` after
    the last layer is a final norm (skipped). Nothing is a post site, so no parameter is removed."""
    model = _tiny("Zamba2Config", "Zamba2ForCausalLM", vocab_size=128, hidden_size=16, num_hidden_layers=2,
                  layers_block_type=["mamba", "hybrid"], mamba_d_state=8, n_mamba_heads=2, num_attention_heads=2,
                  intermediate_size=32, adapter_rank=4, use_cache=False, max_position_embeddings=64)
    # chunk_size stays at its default (256): with chunk_size == the example length the capture bounds the
    # length to one chunk (a guard outside this test's subject)
    args = (_ids(2, 8),)
    ch = Checks("zamba2", model, lambda: _export_convert(model, args, [(0, 1)]))
    ch.sites(_pre(0, 0, "model.layers.0.input_layernorm"))
    ch.listed("model.final_layernorm", "model.layers.1.mamba_decoder.input_layernorm")
    ch.kept("model.final_layernorm.weight", "model.layers.1.mamba_decoder.input_layernorm.weight")
    ch.kept(*[k for k in ch.src_sd if "norm" in k])
    ch.removed([])
    ch.outputs((_ids(3, 11),))
    ch.done()


def test_wav2vec2_post_norm_encoder():
    """Wav2Vec2Model with ``do_stable_layer_norm=False`` (post-norm encoder): ``encoder.layer_norm`` of
    ``LN(x + pos_conv(x))`` is a position norm outside the blocks (GEONORM.md section 4: "an embedding or
    position norm N(e + pos(e)) (wav2vec2's encoder norm)"): skipped, kept. The layers' ``LN(x + attn(x))``
    and ``LN(x + ff(x))`` are post sites, blocks 0, 0, 1, 1 (decays 1, 1/2), their norms removed; the
    feature projection's LayerNorm (embedding norm) and the extractor's GroupNorm kept."""
    model = _tiny("Wav2Vec2Config", "Wav2Vec2Model", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                  num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, do_stable_layer_norm=False,
                  feat_extract_norm="group", layerdrop=0.0, mask_time_prob=0.0)
    args = (torch.randn(2, 400, generator=torch.Generator().manual_seed(0)),)
    ch = Checks("wav2vec2", model, lambda: _export_convert(model, args, [(0, 1)]))
    layer = "encoder.layers"
    ch.sites(_pre(0, 0, f"{layer}.0.layer_norm", f"{layer}.0.final_layer_norm", kind="post")
             + _pre(0, 1, f"{layer}.1.layer_norm", f"{layer}.1.final_layer_norm", kind="post"))
    ch.listed("encoder.layer_norm", "feature_projection.layer_norm")
    ch.kept_under("encoder.layer_norm", "feature_projection.layer_norm", "feature_extractor.conv_layers.0.layer_norm")
    ch.removed([f"{layer}.{i}.{n}.{p}" for i in (0, 1) for n in ("layer_norm", "final_layer_norm")
                for p in ("weight", "bias")])
    ch.outputs((torch.randn(3, 560, generator=torch.Generator().manual_seed(1)),))
    ch.done()


def test_siglip_vision_pooling_head_norm_is_not_a_site():
    """SiglipVisionModel: encoder layers are Pre-Norm (4 pre sites, blocks 0, 0, 1, 1); ``post_layernorm``
    is the final norm; the MAP pooling head's ``probe-attention -> residual + mlp(layernorm(residual))``
    looks like a pre site but is inside a head (GEONORM.md section 4: "a norm inside a head or pooling head
    (SigLIP's MAP head)"): skipped, kept."""
    model = _tiny("SiglipVisionConfig", "SiglipVisionModel", hidden_size=16, intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4, num_channels=3)
    args = (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)
    ch = Checks("siglip", model, lambda: _export_convert(model, args, [(0,)]))
    layer = "encoder.layers"
    ch.sites(_pre(0, 0, f"{layer}.0.layer_norm1", f"{layer}.0.layer_norm2")
             + _pre(0, 1, f"{layer}.1.layer_norm1", f"{layer}.1.layer_norm2"))
    ch.listed("post_layernorm", "head.layernorm")
    ch.kept_under("post_layernorm", "head.layernorm")
    ch.removed([])
    ch.outputs((torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)),))
    ch.done()


# =================================================================================================
# B. hand-written equivalents (tests/named_models.py)

@pytest.mark.parametrize("norm", ["use_rmsnorm", "use_scalenorm", "use_simple_rmsnorm"])
def test_x_transformers_normalize_norms(norm):
    """x-transformers Decoder with ``use_rmsnorm`` / ``use_scalenorm`` / ``use_simple_rmsnorm``: the norms
    are ``F.normalize(x, dim=-1) * sqrt(d) (* g)``, RMSNorm up to a constant (GEONORM.md section 4: "every
    normalization over the feature dim in any spelling is either rewritten, or skipped"): 4 pre sites with
    ``norm == "rms_norm"``. Each sub-layer ('a', 'f', 'a', 'f') is its own element of ``attn_layers.layers``
    (a ModuleList of layers), hence its own block: blocks 0, 1, 2, 3 (section 4: "a block is ... an element
    of a ModuleList/Sequential of layers"). ``final_norm`` skipped and kept. Output = float64 reference."""
    model, inputs = nm.build_x_transformers(norm)
    m64 = copy.deepcopy(model).double()
    ch = Checks(f"x-transformers {norm}", model, lambda: gf.convert(model, inputs[0]))
    ch.sites(*[[("pre", 0, k, f"attn_layers.layers.{k}.0.0") for k in range(4)]])
    ch.norm_kinds("rms_norm")
    ch.listed("attn_layers.final_norm")
    ch.kept(*[k for k in ch.src_sd if k.endswith(".g")])
    ch.removed([])
    ch.outputs(inputs[1])
    ch.against(m64.geonorm, inputs)
    ch.done()


def test_maxvit_block_and_grid_attention():
    """vit-pytorch MaxViT: 3 blocks, each ``Sequential(MBConv, block windows, PreNormResidual(attn),
    PreNormResidual(ff), back, grid windows, PreNormResidual(attn), PreNormResidual(ff), back)`` on a
    channels-last view of an NCHW stream: all 12 PreNormResidual norms are pre sites (none missed).
    Grouping not asserted: the spec does not decide whether a block is the outer Sequential (4 sites) or
    each PreNormResidual (an element of that Sequential), nor whether MBConv's downsample (conv + BatchNorm,
    feature size change) starts a new stream. The MBConv BatchNorms and the head LayerNorm are kept."""
    model, inputs = nm.build_maxvit()
    ch = Checks("maxvit", model, lambda: gf.convert(model, inputs[0]))
    ch.kinds({"pre": 12}, [f"layers.{b}.{i}.norm" for b in range(3) for i in (2, 3, 6, 7)])
    ch.listed("mlp_head.1")
    ch.kept(*[k for k in ch.src_sd if ".running_" in k or k.startswith("mlp_head.1.")])
    ch.kept(*[k for k in ch.src_sd if k.endswith("norm.weight") or k.endswith("norm.bias")])
    ch.removed([])
    ch.outputs(inputs[1])
    ch.done()


def test_t2t_vit_stream_out_of_a_rearrange():
    """vit-pytorch T2T-ViT: the two token transformers inside ``to_patch_embedding`` read the stream straight
    out of ``Unfold -> Rearrange('b c n -> b n c')``: each has its 2 pre sites. Between the token
    transformers and the main one every path passes through the transformer's final norm and changes the
    feature size (18 -> 162 -> Linear -> 16): new streams, each restarting at block 0 (section 4, "a new
    stream starts at a norm-only boundary"). Main transformer: blocks 0, 0, 1, 1. The three transformers'
    final norms and the head norm skipped, kept."""
    model, inputs = nm.build_t2t()
    ch = Checks("t2t-vit", model, lambda: gf.convert(model, inputs[0]))
    tok = ["to_patch_embedding.3", "to_patch_embedding.7"]
    ch.sites(_pre(0, 0, f"{tok[0]}.layers.0.0.norm", f"{tok[0]}.layers.0.1.net.0")
             + _pre(1, 0, f"{tok[1]}.layers.0.0.norm", f"{tok[1]}.layers.0.1.net.0")
             + _pre(2, 0, "transformer.layers.0.0.norm", "transformer.layers.0.1.net.0")
             + _pre(2, 1, "transformer.layers.1.0.norm", "transformer.layers.1.1.net.0"))
    ch.listed(f"{tok[0]}.norm", f"{tok[1]}.norm", "transformer.norm", "mlp_head.0")
    ch.kept_under(f"{tok[0]}.norm", f"{tok[1]}.norm", "transformer.norm", "mlp_head.0")
    ch.removed([])
    ch.outputs(inputs[1])
    ch.done()


def test_davit_nchw_view_stream():
    """timm DaViT: the stream is NCHW; each Spatial/Channel block runs ``cpe`` (a norm-free conv residual),
    ``flatten(2).transpose(1, 2)``, a pre attention site, ``cpe``, a pre MLP site, and goes back with
    ``transpose(1, 2).view``: 4 pre sites per (Spatial, Channel) pair, none missed. Stage 1 sits behind a
    Downsample (LayerNorm2d + conv 16 -> 32): a norm-only boundary, so a new stream from block 0. Grouping
    inside a stage: the pair ``Sequential(SpatialBlock, ChannelBlock)`` is an element of ``blocks``, but each
    block is an element of the pair's Sequential too: both groupings accepted (the attention and MLP sites
    of one Spatial/Channel block share a block either way). Stem, downsample and head LayerNorm2d kept."""
    model, inputs = nm.build_davit()
    ch = Checks("davit", model, lambda: gf.convert(model, inputs[0]))

    def stage(s, pair_blocks):
        b = "stages.%d.blocks.0" % s
        return (_pre(s, 0, f"{b}.0.norm1", f"{b}.0.norm2")
                + _pre(s, 0 if pair_blocks else 1, f"{b}.1.norm1", f"{b}.1.norm2"))

    ch.sites(stage(0, True) + stage(1, True), stage(0, False) + stage(1, False))
    ch.listed("stem.norm", "stages.1.downsample.norm", "head.norm")
    ch.kept_under("stem.norm", "stages.1.downsample.norm", "head.norm")
    ch.removed([])
    ch.outputs(inputs[1])
    ch.done()


def test_tinyvit_nhwc_stream_with_local_conv():
    """timm TinyViT: NCHW -> NHWC permute, blocks ``x = shortcut + attn(x)`` (norm inside Attention),
    ``local_conv`` (depthwise conv + BatchNorm) on the NCHW permute, ``reshape(B, C, L).transpose(1, 2)``,
    ``x = x + mlp(x)`` (norm inside NormMlp): 4 pre sites, none missed. Grouping and streams not asserted:
    ``local_conv`` (a conv + BatchNorm on the stream between the two sites of one block) is a norm on every
    path between them, and the spec does not say whether a BatchNorm makes a norm-only boundary. The
    BatchNorms and the head LayerNorm2d kept."""
    model, inputs = nm.build_tinyvit()
    ch = Checks("tinyvit", model, lambda: gf.convert(model, inputs[0]))
    ch.kinds({"pre": 4}, [f"stages.0.blocks.{i}.{m}.norm" for i in (0, 1) for m in ("attn", "mlp")])
    ch.listed("head.norm")
    ch.kept(*[k for k in ch.src_sd if ".bn." in k or k.startswith("head.norm.")])
    ch.removed([])
    ch.outputs(inputs[1])
    ch.done()


def test_samvit_windowed_blocks_and_neck():
    """timm SAM ViT: blocks on ``(B, H, W, C)``, windowed (block 0) or global (block 1) attention,
    ``shortcut + attn``, ``reshape(B, H*W, C)`` for the MLP site, back to ``(B, H, W, C)``: 4 pre sites,
    blocks 0, 0, 1, 1. The neck (conv, LayerNorm2d, conv, LayerNorm2d after the blocks) is not a site:
    both LayerNorm2d skipped and kept; the converted module runs at another batch size with the source's
    output shape (it used to crash on the first forward)."""
    model, inputs = nm.build_samvit()
    ch = Checks("samvit", model, lambda: gf.convert(model, inputs[0]))
    ch.sites(_pre(0, 0, "blocks.0.norm1", "blocks.0.norm2") + _pre(0, 1, "blocks.1.norm1", "blocks.1.norm2"))
    ch.listed("neck.1", "neck.3")
    ch.kept_under("neck.1", "neck.3")
    ch.removed([])
    ch.outputs(inputs[1])
    ch.done()


def test_edgenext_conv_and_sdta_blocks():
    """timm EdgeNeXt: ConvBlocks ``x + gamma * mlp(LN(dwconv(x)))`` are not sites (the norm reads
    ``dwconv(x)``, not ``x``). The SDTA block's ``y + gamma_xca * xca(norm_xca(y))`` is NOT a site either,
    although it has the pre form: its ``y`` is ``convs(x) + pos``, and the whole XCA residual is inside
    the branch of the block's own residual ``shortcut + gamma * mlp(norm(...))`` (GEONORM.md section 4: "a
    residual nested inside ... a branch is not a site of the outer stream"; "a site is a step of the
    residual stream of a stack of blocks"; the corpus case pre-mlp-inner-pre). So nothing is rewritten:
    every norm is kept and listed, and the converted output is the source's (at both shapes)."""
    model, inputs = nm.build_edgenext()
    ch = Checks("edgenext", model, lambda: gf.convert(model, inputs[0]))
    ch.sites([])
    norms = ["stem.1", "stages.0.blocks.0.norm", "stages.1.downsample.0", "stages.1.blocks.0.norm",
             "stages.1.blocks.1.norm_xca", "stages.1.blocks.1.norm", "head.norm"]
    ch.listed(*norms)
    ch.kept_under(*norms)
    ch.kept("stages.1.blocks.1.gamma_xca", "stages.1.blocks.1.gamma", "stages.0.blocks.0.gamma")
    ch.removed([])
    ch.unchanged(inputs)
    ch.done()


def test_xcit_patch_blocks_class_attention_and_final_norm():
    """timm XCiT: each XCABlock has three pre sites in the order norm1 (XCA), norm3 (LPI), norm2 (MLP):
    blocks 0 and 1. The class-attention blocks follow on the same stream (a cls token is concatenated:
    no norm, no feature change). Their first residual ``x + gamma1 * cat(attn(N1(x)), N1(x)[:, 1:])`` is
    literally a pre site; the rest of the block (``norm2`` applied to the class token only, writing the
    stream) is in no row of the table. The spec leaves the class-attention part open: either no site there
    or the ``norm1`` pre site of each (blocks 2, 3). ``norm2`` of the class-attention blocks is never
    removed; the final ``norm`` is skipped and kept."""
    model, inputs = nm.build_xcit()
    ch = Checks("xcit", model, lambda: gf.convert(model, inputs[0]))
    patch = [s for b in (0, 1) for s in _pre(0, b, *(f"blocks.{b}.norm{i}" for i in (1, 3, 2)))]
    ch.sites(patch, patch + _pre(0, 2, "cls_attn_blocks.0.norm1") + _pre(0, 3, "cls_attn_blocks.1.norm1"))
    ch.listed("norm")
    ch.kept_under("norm", "cls_attn_blocks.0.norm2", "cls_attn_blocks.1.norm2")
    ch.kept(*[k for k in ch.src_sd if ".gamma" in k])
    ch.removed([])
    ch.outputs(inputs[1])
    ch.done()


def test_caformer_res_scale_is_kept():
    """timm CAFormer (MetaFormer): attention-stage blocks ``res_scale(x) + layer_scale(mixer(norm(x)))``
    with a learned per-channel ``res_scale``: pre sites whose update is ``Geo(res_scale(x), s)``, the
    ``res_scale*.scale`` parameters KEPT (GEONORM.md section 4: "a scale on the skip of a site that is not
    DeepNorm ... is kept: the update's x is a*x"). The attention stage sits behind a Downsampling
    (LayerNorm2d + conv 16 -> 32): a new stream, blocks 0, 0, 1, 1. The SepConv stage before it is a
    Pre-Norm stack on an NCHW stream whose norm (LayerNorm2d) is over C through permutes: either 2 pre
    sites over C (dim 1) or abstention: both accepted, the float64 reference follows the report.
    Stem, downsample, head and MlpHead norms kept."""
    model, inputs = nm.build_caformer()
    m64 = copy.deepcopy(model).double()
    ch = Checks("caformer", model, lambda: gf.convert(model, inputs[0]))
    att = [s for b in (0, 1) for s in _pre(1, b, f"stages.1.blocks.{b}.norm1", f"stages.1.blocks.{b}.norm2")]
    conv = _pre(0, 0, "stages.0.blocks.0.norm1", "stages.0.blocks.0.norm2")
    ch.sites(conv + att, [(k, 0, b, n) for k, _, b, n in att])
    ch.listed("stem.norm", "stages.1.downsample.norm", "head.norm", "head.fc.norm")
    ch.kept_under("stem.norm", "stages.1.downsample.norm", "head.norm", "head.fc.norm")
    scales = [f"stages.1.blocks.{b}.res_scale{i}.scale" for b in (0, 1) for i in (1, 2)]
    ch.kept(*scales)
    ch.removed([])
    ch.outputs(inputs[1])
    conv_rewritten = any(s.norm_path.startswith("stages.0.") for s in ch.report.sites)
    ch.against(lambda x: m64.geonorm(x, conv_rewritten), inputs)
    ch.done()


def test_swinv2_drop_path_converts_in_train_mode():
    """timm SwinV2 at ``drop_path_rate=0.1``, converted in TRAIN mode: DropPath (a random per-sample mask)
    between the res-post norm and the add is part of the branch, like dropout (issue 13 class 9), so the
    train and eval graphs have the same sites: ``x + drop_path(norm(attn(x)))`` and ``x +
    drop_path(norm(mlp(x)))`` are respost sites, 2 per block; stage 1 behind PatchMerging (Linear 64 ->
    32 then LayerNorm) is a new stream: (0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0), (1, 1), (1, 1).
    The converted module starts in train mode and runs in both modes; the patch-embedding, merging and
    final norms kept."""
    model, inputs = nm.build_swinv2_train()
    ch = Checks("swinv2-drop-path", model, lambda: gf.convert(model, inputs[0]))

    def stage(s):
        return [x for b in (0, 1) for x in _pre(s, b, f"layers.{s}.blocks.{b}.norm1", f"layers.{s}.blocks.{b}.norm2",
                                                kind="respost")]

    ch.sites(stage(0) + stage(1))
    ch.listed("patch_embed.norm", "layers.1.downsample.norm", "norm")
    ch.kept(*[k for k in ch.src_sd if "norm" in k])
    ch.removed([])
    ch.outputs(inputs[1], seed=7, label="train mode: ")
    ch.module.eval()
    model.eval()
    ch.outputs(inputs[1], label="after .eval(): ")
    ch.done()
