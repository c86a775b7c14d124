"""Sweep the transformers model zoo: does the pass convert every architecture it can capture?

Architectures come from transformers' auto mappings: causal LMs (``MODEL_FOR_CAUSAL_LM``), masked LMs /
encoders (``MODEL_FOR_MASKED_LM``, the types not already covered) and the base vision models
(``MODEL_FOR_IMAGE``, the types not already covered). Each one is built from a tiny config with random
weights (no download): the model type's default config with its size attributes shrunk (``SIZES``),
per-family fixes only where a default cannot be shrunk generically (``FAMILY_FIXES``, data). Then, in a
worker process with a timeout: the source model is run once (eager), ``gf.inspect`` and ``gf.convert``
are called, and the converted module is run in eval mode at a new batch size and sequence length, with
forward hooks on every ``GeodesicUpdate`` measuring the norm-preservation invariant
``max | |out| - |x| | / |x|`` (must be <= 1e-5).

Usage: python benchmarks/zoo_sweep.py [--only NAME[,NAME]] [--limit N] [--timeout S] [--jobs J]
                                      [--json PATH] [--md PATH] [--task causal-lm|masked-lm|vision]
``NAME`` is a model type (``llama``) or a class name (``LlamaForCausalLM``).

Outcomes (``status``): ``ok`` (sites found, finite outputs at the new shape, invariant holds),
``zero-site`` (no site; ``skip_reasons`` says why, from the report), and the failures ``build``
(the sweep could not build the tiny model or the source model fails on the example inputs: not
counted), ``capture`` (torch.export cannot capture it: upstream, not counted), ``static`` (captured
only with static shapes; when the capture's guards reject the new shape, ``new_batch_only`` records the
same checks at the new batch size and the captured sequence length), ``convert``, ``run``, ``not-finite``,
``invariant``, ``mismatch`` (inspect and convert disagree), ``no-reason`` (zero sites and no reason),
``timeout``, ``crash``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import sys
import time
import traceback
import warnings
from collections import Counter

SEED = 0
BATCH, SEQ = 2, 10          # example shape for the capture
NEW_BATCH, NEW_SEQ = 3, 13  # the converted module is run at this shape
IMAGE = 32
TOL = 1e-5
VOCAB = 1024
DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "zoo_sweep.json")

# Generic shrinking: every attribute of the default config named here is set to this value (when the
# default config has the attribute). Lists of per-stage depths are set to ones of the same length. Widths
# that configs derive from these (Zamba's attention width 2 * hidden_size) are left to the config.
SIZES = {
    # width / depth / heads
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64, "dim": 64, "model_dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "encoder_layers": 2,
    "decoder_layers": 2, "num_decoder_layers": 2, "num_encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2,
    "multi_query_group_num": 2, "kv_n_heads": 2, "head_dim": 16, "d_kv": 16, "kv_channels": 16,
    "intermediate_size": 128, "n_inner": 128, "d_ff": 128, "ffn_dim": 128, "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128, "ffn_hidden_size": 128, "hidden_dim": 128, "mlp_dim": 128,
    "embedding_size": 64, "projection_dim": 64, "hidden_size_global": 64,
    # mixtures of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "n_shared_experts": 1, "num_shared_experts": 1,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 64,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    # multi-head latent attention
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "rotary_dim": 8,
    # state-space / recurrent
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "time_step_rank": 8, "mamba_n_heads": 4,
    "mamba_d_head": 32, "mamba_head_dim": 32, "mamba_expand": 2, "expand": 2, "n_groups": 1,
    "mamba_n_groups": 1, "chunk_size": 16, "mamba_chunk_size": 16,
    # positions, vocabulary, windows
    "vocab_size": VOCAB, "encoder_hash_byte_group_vocab": VOCAB, "max_position_embeddings": 128,
    "n_positions": 128, "n_ctx": 128, "max_seq_len": 128, "seq_length": 128, "sliding_window": 16,
    "max_window_layers": 2,
    # vision
    "image_size": IMAGE, "patch_size": 8, "num_channels": 3, "num_frames": 2, "tubelet_size": 1,
}
# Consistency rules: when the default config has the first key, these sizes replace the generic ones.
DERIVED = [
    # multi-head latent attention: K/V have as many heads as Q, and head_dim is the rotary part
    ("kv_lora_rank", {"num_key_value_heads": 4, "head_dim": 8}),
]
# Per-stage lists (hierarchical vision models): lengths kept, depths set to 1.
STAGE_DEPTH_KEYS = ("depths", "depth", "num_layers_per_stage")
STAGE_HEAD_KEYS = ("num_heads", "num_attention_heads")
# Sizes whose smaller defaults are kept: a 2-pixel patch must still fit the last feature map, a top-1 router
# may be validated as such.
SHRINK_ONLY = ("patch_size", "num_experts_per_tok")
# Run-time settings for every config that has them.
SETTINGS = {"use_cache": False, "output_hidden_states": False, "output_attentions": False,
            "use_pretrained_backbone": False, "tie_word_embeddings": False, "return_dict": True}

# Per-family fixes, applied after the generic shrink: config overrides (``config``; ``None`` keeps the
# class default for that key; they also build the default config when the class default fails its own
# validation), ``inputs`` kwargs style (``"draft"``: embeddings and KV states, see ``_draft``), ``attn``
# implementation, ``seq`` / ``new_seq`` lengths, ``image`` size. Only where the generic shrink cannot work
# (documented with each entry).
_QSA = {"indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
        "indexer_compress_ratio": 4}
FAMILY_FIXES: dict[str, dict] = {
    # a projection from a fixed-size adapter input, validated against hidden_size
    "dots3_note": {"config": {"adapter_in_dim": 64}},
    "dots3_note_text": {"config": {"adapter_in_dim": 64}},
    # the Mamba mixer's width is its own attribute, validated against heads * head size
    "falcon_h1": {"config": {"mamba_d_ssm": 128, "mamba_n_heads": 4, "mamba_d_head": 32}},
    # the default shares the KV cache of layers the tiny stack does not have
    "gemma3n_text": {"config": {"num_kv_shared_layers": 0}},
    "gemma3n": {"config": {"text_config": {"num_kv_shared_layers": 0}}},
    # the assistant must not have per-layer inputs and must share every layer's KV (validated: the class
    # default fails it); output_hidden_states skips the length slicing after the KV-shared layers, which
    # subscripts those absent per-layer inputs (upstream bug). A draft model: it runs on the main model's
    # embeddings and KV states
    "gemma4_assistant": {"config": {"text_config": {
        "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0, "num_kv_shared_layers": 0,
        "output_hidden_states": True}},
        "inputs": "draft"},
    # decoder ids come per codebook: (batch * num_codebooks, seq)
    "musicgen": {"ids_shape": "codebooks"},
    "musicgen_melody": {"ids_shape": "codebooks"},
    # SSD heads must tile expand * hidden_size = 128 exactly
    "mamba2": {"config": {"num_heads": 4, "head_dim": 32}},
    # the default leaves layer_types unset (None), which the model indexes
    "lfm2_moe": {"config": {"layer_types": ["conv", "full_attention"]}},
    # the LM head needs a decoder config; the axial position factors must sum to hidden_size
    "reformer": {"config": {"is_decoder": True, "axial_pos_embds_dim": [16, 48]}},
    # ESM needs pad/mask ids (the defaults are None); ESMC validates that it has no grouped-query attention
    "esm": {"config": {"pad_token_id": 1, "mask_token_id": 2}},
    "esmc": {"config": {"num_key_value_heads": 4}},
    # the adapters need a language and the default config names none
    "xmod": {"config": {"default_language": "en_XX"}},
    # the attention reads attn_config.rope_theta, which the attention config class no longer defines, and
    # clamps q/k/v to clip_qkv, whose default None makes torch.clamp raise
    "dbrx": {"config": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}}},
    # the default's indexed-attention layers always build the QSA indexer, whose sizes default to None
    "qwen4_exp_text": {"config": _QSA},
    "qwen4_exp": {"config": _QSA},  # its causal-LM class takes the text config
    # every stage's map must hold a whole window (the relative-position table is sized for it): the last
    # stage sees image / patch / 8, 2 tokens on a 64-pixel image
    "swin": {"config": {"image_size": 2 * IMAGE, "window_size": 2}},
    "swinv2": {"config": {"image_size": 2 * IMAGE, "window_size": 2}},
    # the stem always downsamples 16x (four stride-2 convs): patch_size must keep saying so
    "levit": {"config": {"patch_size": None}},
    # the last MobileViTV2 block unfolds 2x2 patches of the stride-32 map and does not pad (v1 does)
    "mobilevitv2": {"config": {"image_size": 2 * IMAGE}},
    # hidden_dim repeats the head's width round_filters(1280), which width_coefficient scales (B0: 1)
    "efficientnet": {"config": {"width_coefficient": 1.0, "depth_coefficient": 1.0, "hidden_dim": 1280}},
    # patch_size is the ViT encoders' image size (validated); the hooks index encoder layers; the
    # smallest scale (1/4) must still hold one patch
    "depth_pro": {"config": {"patch_size": IMAGE, "intermediate_hook_ids": [1, 0]}, "image": 4 * IMAGE},
    # the default config has no RoPE parameters at all
    "cohere_compass_text": {"config": {"rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}},
}

# Causes of failures the sweep cannot fix, found by triage (data, printed with the results).
_MAMBA_SCAN = ("upstream", "the reference Mamba scan (no CUDA kernels) loops over the sequence in Python: "
                           "torch.export specialises the sequence length")
_QSA_CAPTURE = ("upstream", "torch.export cannot capture the QSA indexer: it selects the visible tokens with "
                            "nonzero and branches on their count")
KNOWN: dict[str, tuple[str, str]] = {
    "cpmant": ("upstream", "torch.export specialises the sequence length: the model builds a Python list from "
                           "range(seq_len) for its positions"),
    "mamba": _MAMBA_SCAN, "falcon_mamba": _MAMBA_SCAN, "jamba": _MAMBA_SCAN, "zamba": _MAMBA_SCAN,
    "deepseek_v4": ("upstream", "torch.export bounds the sequence length (<= 11) in the compressed attention; "
                                "no site either way: manifold-constrained hyper-connections mix the streams, "
                                "there is no x + f(x) add"),
    "dbrx": ("upstream", "torch.export cannot capture the MoE's loop over the experts hit (nonzero); the default "
                         "config needs two fixes to build (see FAMILY_FIXES)"),
    "qwen4_exp": _QSA_CAPTURE, "qwen4_exp_text": _QSA_CAPTURE,
    "blt": ("upstream", "torch.export cannot capture the entropy patcher: the patch lengths, and the sizes built "
                        "from them, depend on the data"),
    "reformer": ("upstream", "torch.export specialises the batch size: the axial position encodings are gathered "
                             "in a Python loop over the batch. The pass finds no site and gives no reason "
                             "(reversible residuals: the norm of one stream feeds the other stream's update)"),
    "depth_pro": ("upstream", "torch.export specialises the batch size: the patch counts per scale are Python "
                              "lengths of the split batch (len() of the patches)"),
    "longcat_flash": ("upstream", "torch.export cannot capture the MoE's data-dependent expert loop (nonzero)"),
    "longformer": ("upstream", "torch.export cannot capture the sliding-chunk attention (data-dependent guard)"),
    "recurrent_gemma": ("upstream", "torch.export specialises the sequence length (the recurrent scan)"),
    "rwkv": ("upstream", "the reference WKV recurrence loops over the sequence in Python: torch.export "
                         "specialises the sequence length"),
    "xlstm": ("upstream", "the reference mLSTM recurrence loops over the sequence: torch.export specialises "
                          "the sequence length"),
    "funnel": ("upstream", "torch.export specialises the sequence length (the pooling's attention structure)"),
    "gemma3n": ("sweep", "its vision tower needs timm, which is not installed (the text model gemma3n_text runs)"),
    **dict.fromkeys(("detr", "conditional_detr", "dab-detr", "deformable_detr", "table-transformer"),
                    ("sweep", "its default backbone is a timm model, and timm is not installed")),
    **dict.fromkeys(("timm_backbone", "timm_wrapper"), ("sweep", "a timm wrapper: timm is not installed")),
    "dinat": ("sweep", "its neighbourhood attention needs natten, which is not installed"),
    "gemma4_unified_assistant": ("sweep", "a draft model that runs on the main model's embeddings and KV states, "
                                          "not on ids"),
}


# ------------------------------------------------------------------------------------------------ enumerate
def architectures(task: str | None = None) -> list[dict]:
    """``[{"name": model_type, "task": ..., "cls": class name}]`` from the auto mappings, one per model
    type (causal LM first, then masked LM, then base vision model)."""
    from transformers.models.auto import modeling_auto as m

    out, seen = [], set()
    groups = [("causal-lm", m.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
              ("masked-lm", m.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
              ("vision", m.MODEL_FOR_IMAGE_MAPPING_NAMES)]
    for name, mapping in groups:
        for model_type, cls in mapping.items():
            if model_type in seen:
                continue
            seen.add(model_type)
            if isinstance(cls, (list, tuple)):
                cls = cls[0]
            if task is None or task == name:
                out.append({"name": model_type, "task": name, "cls": cls})
    return out


# ------------------------------------------------------------------------------------------------ build
def _token_attrs(cfg) -> list[str]:
    return [k for k, v in vars(cfg).items()
            if (k.endswith("_token_id") or k.endswith("_token_index") or k.endswith("_token_ids"))
            and (isinstance(v, int) and not isinstance(v, bool) or isinstance(v, (list, tuple)))]


def shrink_kwargs(cfg, overrides: dict | None = None) -> dict:
    """Constructor kwargs that shrink the default config ``cfg`` (recursing into sub-configs)."""
    from transformers import PretrainedConfig

    spec = vars(cfg).get("_heterogeneity_spec")
    per_layer = set(getattr(spec, "per_layer_attributes", ()) or ())  # vary by layer: class default kept
    attrs = (set(vars(cfg)) | set(getattr(cfg, "attribute_map", {}) or {})) - per_layer
    fields = {f.name for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else None
    aliases = getattr(cfg, "attribute_map", {}) or {}
    kw = {}
    for key, value in SIZES.items():
        if key in attrs:
            name = aliases.get(key, key)
            if fields is not None and name in vars(cfg) and not {key, name} & fields:
                continue  # not a constructor field: __post_init__ derives it from the others (Swin's hidden_size)
            current = _get(cfg, key)
            if isinstance(current, bool) or (current is not None and not isinstance(current, (int, float, list, tuple))):
                continue
            if isinstance(current, (list, tuple)):
                if key in ("image_size", "patch_size"):
                    kw[key] = [value] * len(current)
                continue
            if key == "time_step_rank" and not isinstance(current, int):
                continue
            if key in SHRINK_ONLY and isinstance(current, int) and current < value:
                continue
            kw[key] = value
    for trigger, sizes in DERIVED:
        if trigger in attrs:
            kw.update({k: v for k, v in sizes.items() if k in attrs})
    for key in STAGE_DEPTH_KEYS:
        current = _get(cfg, key)
        if isinstance(current, (list, tuple)) and all(isinstance(d, int) for d in current):
            kw[key] = [1] * len(current)
    if "embed_dim" in kw:  # per-stage head counts must divide the shrunk stage widths (embed_dim * 2 ** stage)
        for key in STAGE_HEAD_KEYS:
            current = vars(cfg).get(key)
            if isinstance(current, (list, tuple)) and all(isinstance(h, int) for h in current):
                kw[key] = [SIZES[key]] * len(current)
    for key, value in SETTINGS.items():
        if key in attrs:
            kw[key] = value
    if "vocab_size" in kw:  # special token ids must stay inside the shrunk vocabulary
        nxt = VOCAB - 1
        for key in _token_attrs(cfg):
            v = _get(cfg, key)
            if isinstance(v, int) and v >= VOCAB:
                kw[key], nxt = nxt, nxt - 1
            elif isinstance(v, (list, tuple)) and any(isinstance(i, int) and i >= VOCAB for i in v):
                new = []
                for i in v:
                    if isinstance(i, int) and i >= VOCAB:
                        i, nxt = nxt, nxt - 1
                    new.append(i)
                kw[key] = type(v)(new)
    for key, sub in vars(cfg).items():
        if isinstance(sub, PretrainedConfig):
            kw[key] = type(sub)(**shrink_kwargs(sub, (overrides or {}).get(key)))
    # layer-pattern lists that follow the number of layers: keep their first entries
    n = kw.get("num_hidden_layers")
    if n is not None:
        for key, v in vars(cfg).items():
            if isinstance(v, (list, tuple)) and len(v) == getattr(cfg, "num_hidden_layers", -1) and len(v) > n \
                    and key not in kw and all(isinstance(i, (str, int, bool)) for i in v):
                kw[key] = list(v[:n]) if len(set(v)) == 1 else _pattern(list(v), n)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(getattr(cfg, key, None), PretrainedConfig):
            continue
        if value is None:
            kw.pop(key, None)
        else:
            kw[key] = value
    return kw


def _get(cfg, key):
    try:
        return vars(cfg)[key] if key in vars(cfg) else getattr(cfg, key, None)
    except Exception:  # noqa: BLE001 - e.g. a per-layer attribute read globally
        return None


def _pattern(v: list, n: int) -> list:
    """The first ``n`` entries of a per-layer list, making sure every distinct kind appears once when
    ``n`` allows (a hybrid model's attention and mixer layers both get exercised)."""
    kinds = list(dict.fromkeys(v))
    if len(kinds) <= n:
        return (kinds + v[:n])[:n] if len(kinds) < n else kinds
    return v[:n]


def build(entry: dict):
    """Build the tiny model and its example, new-shape and new-batch inputs for one architecture."""
    import torch
    import transformers
    from transformers import CONFIG_MAPPING

    fix = FAMILY_FIXES.get(entry["name"], {})
    model_cls = getattr(transformers, entry["cls"])
    # the model class's own config class (a text-only class of a multimodal type takes its text config)
    config_cls = getattr(model_cls, "config_class", None) or CONFIG_MAPPING[entry["name"]]
    try:
        default = config_cls()
    except Exception:  # noqa: BLE001 - a class default that fails its own validation: the fix's overrides build it
        default = config_cls(**fix.get("config", {}))
    kw = shrink_kwargs(default, fix.get("config"))
    cfg = config_cls(**kw)
    torch.manual_seed(SEED)
    attn = fix.get("attn", "eager")
    try:
        model = model_cls._from_config(cfg, attn_implementation=attn)
    except (ValueError, TypeError):
        model = model_cls._from_config(cfg)
    model.eval()
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input.startswith("pixel_values"):  # ImageGPT and Cohere2Vision are image-mapped but take ids
        make = _pixels(cfg, fix)
        seq = new_seq = None
    else:
        make = _draft(model, cfg) if fix.get("inputs") == "draft" else _ids(cfg, fix)
        seq, new_seq = fix.get("seq", SEQ), fix.get("new_seq", NEW_SEQ)
    # the last: the new batch size at the captured sequence length (for captures that specialise the length)
    return model, cfg, make(BATCH, seq), make(NEW_BATCH, new_seq), make(NEW_BATCH, seq)


def _all_token_ids(cfg) -> set:
    from transformers import PretrainedConfig

    ids = set()
    for key in _token_attrs(cfg):
        v = _get(cfg, key)
        ids |= {v} if isinstance(v, int) else {i for i in v if isinstance(i, int)}
    for sub in vars(cfg).values():
        if isinstance(sub, PretrainedConfig):
            ids |= _all_token_ids(sub)
    return ids


def _vocab(cfg) -> int:
    from transformers import PretrainedConfig

    v = getattr(cfg, "vocab_size", None)
    if isinstance(v, int):
        return v
    for sub in vars(cfg).values():
        if isinstance(sub, PretrainedConfig) and isinstance(getattr(sub, "vocab_size", None), int):
            return sub.vocab_size
    return VOCAB


def _ids(cfg, fix):
    import torch

    special = _all_token_ids(cfg)
    pool = torch.tensor([i for i in range(4, min(_vocab(cfg), 200)) if i not in special])
    extra = fix.get("inputs", {})

    def make(batch, seq):
        g = torch.Generator().manual_seed(SEED + batch * 100 + seq)
        ids = pool[torch.randint(0, len(pool), (batch, seq), generator=g)]
        shape = fix.get("ids_shape")
        if shape == "codebooks":  # (batch * num_codebooks, seq)
            ids = ids.repeat(getattr(cfg, "num_codebooks", 1), 1)
        kwargs = {}
        for name, kind in extra.items():
            if kind == "ids":
                kwargs[name] = ids.clone()
            elif kind == "mask":
                kwargs[name] = torch.ones_like(ids)
        return (ids,), kwargs
    return make


def _draft(model, cfg):
    """Inputs of a draft model that runs on the main model's embeddings and per-layer-type KV states
    (``inputs_embeds``, ``shared_kv_states``), shaped from its own attention layers."""
    import torch

    heads = cfg.get_text_config().num_attention_heads
    kv = {m.layer_type: (heads // m.num_key_value_groups, m.head_dim) for m in model.modules()
          if hasattr(m, "num_key_value_groups") and getattr(m, "layer_type", None)}

    def make(batch, seq):
        g = torch.Generator().manual_seed(SEED + batch * 100 + seq)
        embeds = torch.randn(batch, seq, 2 * cfg.backbone_hidden_size, generator=g)  # pre_projection's input
        states = {t: tuple(torch.randn(batch, h, 2 * SEQ, d, generator=g) for _ in range(2))  # a fixed context
                  for t, (h, d) in kv.items()}
        return (), {"inputs_embeds": embeds, "shared_kv_states": states}
    return make


def _pixels(cfg, fix):
    import torch

    size = getattr(cfg, "image_size", IMAGE)
    size = size if isinstance(size, int) else size[0]
    size = fix.get("image", size)
    channels = getattr(cfg, "num_channels", 3)
    frames = getattr(cfg, "num_frames", None)

    def make(batch, _seq):
        g = torch.Generator().manual_seed(SEED + batch)
        shape = (batch, frames, channels, size, size) if frames else (batch, channels, size, size)
        return (torch.randn(*shape, generator=g),), {}
    return make


# ------------------------------------------------------------------------------------------------ measure
def _leaves(out):
    from geonorm_fx.capture import tensor_leaves

    return tensor_leaves(out.to_tuple() if hasattr(out, "to_tuple") else out)


def _finite(out) -> bool:
    return all(bool(t.isfinite().all()) for t in _leaves(out) if t.is_floating_point())


def _short(e: BaseException) -> str:
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    return f"{type(e).__name__}: {lines[0][:400] if lines else ''}"


def run_one(entry: dict) -> dict:
    """Everything for one architecture, in the current process; never raises."""
    import torch
    import geonorm_fx as gf
    from geonorm_fx.errors import CaptureError

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers
    transformers.logging.set_verbosity_error()
    rec = {**entry, "status": None, "stage": None, "captured": False, "dynamic": None, "counts": {},
           "n_sites": 0, "skipped": {}, "finite": None, "source_finite": None, "max_gap": None,
           "n_updates_called": 0, "error": None, "params": None, "seconds": {}}
    t0 = time.perf_counter()

    def done(status, stage=None, error=None):
        rec["status"], rec["stage"], rec["error"] = status, stage, error
        rec["seconds"]["total"] = round(time.perf_counter() - t0, 2)
        return rec

    try:
        model, cfg, (args, kwargs), (new_args, new_kwargs), batch_inputs = build(entry)
        rec["params"] = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            rec["source_finite"] = _finite(model(*args, **kwargs))
    except Exception as e:  # noqa: BLE001
        return done("build", "build", _short(e))
    rec["seconds"]["build"] = round(time.perf_counter() - t0, 2)
    source = model
    if not FULL_CAPTURE:  # one torch.export, shared by inspect and convert (see --full-capture)
        try:
            t = time.perf_counter()
            source = export(model, args, kwargs)
            rec["seconds"]["export"] = round(time.perf_counter() - t, 2)
            rec["specialised"] = specialised_dims(source)
        except Exception as e:  # noqa: BLE001
            return done("capture", "export", _short(e))
    results = {}
    for stage, run in (("inspect", gf.inspect), ("convert", gf.convert)):
        try:
            t = time.perf_counter()
            results[stage] = run(source, args, kwargs)
            rec["seconds"][stage] = round(time.perf_counter() - t, 2)
        except CaptureError as e:
            return done("capture", stage, _short(e))
        except Exception as e:  # noqa: BLE001
            return done("convert", stage, _short(e) + " | " + _where(e))
        if stage == "inspect":
            rec["captured"] = True
            rec["dynamic"] = results["inspect"].dynamic
    report, module = results["inspect"], results["convert"]
    rep = module.geonorm_report
    rec["counts"] = rep.counts()
    rec["n_sites"] = len(rep.sites)
    rec["skipped"] = dict(Counter(s.reason.split(":")[0] for s in rep.skipped))
    rec["blocks"] = list(rep.blocks_per_stream)
    if rep.counts() != report.counts():
        return done("mismatch", "convert", f"inspect found {report.counts()}, convert {rep.counts()}")
    static = not rep.dynamic or bool(rec.get("specialised"))
    if static:
        new_args, new_kwargs = args, kwargs  # a static capture only accepts the example shape
    t = time.perf_counter()
    res = run_checked(module.eval(), new_args, new_kwargs)
    if res["error"] is not None:
        if "Guard failed" in res["error"] or "InputShapeError" in res["error"]:  # the capture fixed that shape
            rec["new_batch_only"] = run_checked(module, *batch_inputs)
            return done("static", "run", "torch.export guarded the input shape: " + res["error"])
        return done("run", "run", res["error"] + " | " + res["where"])
    rec["seconds"]["run"] = round(time.perf_counter() - t, 2)
    rec.update(finite=res["finite"], n_updates_called=res["n_updates_called"], max_gap=res["max_gap"])
    if static:
        dims = ", ".join(rec.get("specialised") or []) or "the batch/sequence dims"
        return done("static", "capture", f"torch.export specialised {dims}: the capture accepts only the "
                                         "example size there")
    if not rec["finite"]:
        return done("not-finite", "run", "non-finite output at the new shape"
                    + ("" if rec["source_finite"] else " (the source model's output is non-finite too)"))
    if not res["ok"]:  # finite, so an update broke the invariant
        return done("invariant", "run", f"max relative norm change {res['max_gap']:.2e} > {TOL}")
    if rec["n_sites"] == 0:
        if rep.skipped:
            return done("zero-site")
        return done("no-reason", "report", "no site found and the report gives no reason")
    if res["n_updates_called"] < rec["n_sites"]:
        return done("run", "run", f"only {res['n_updates_called']} of {rec['n_sites']} updates ran")
    if ORACLES:
        t = time.perf_counter()
        rec["oracle"] = oracle_verdict(model, args, kwargs, rep)
        rec["seconds"]["oracles"] = round(time.perf_counter() - t, 2)
    return done("ok")


def oracle_verdict(model, args: tuple, kwargs: dict, report) -> dict:
    """``gf.check_sites`` on the source model (its own capture of an affine-free, tiny-eps copy): the Pre-Norm
    and Post-Norm identities and the module-tree cross-check judge the sites; ``agree`` also needs the oracle's
    site list to be the converted module's (kind, stream, block per site)."""
    import geonorm_fx as gf
    try:
        res = gf.check_sites(model, args, kwargs)
    except Exception as e:  # noqa: BLE001 - recorded as a disagreement with its cause
        return {"agree": False, "error": _short(e), "disagreements": [f"the oracle failed: {_short(e)}"]}
    disagreements = list(res.disagreements)
    ours = [(s.kind, s.stream, s.block) for s in report.sites]
    theirs = [(s.kind, s.stream, s.block) for s in res.report.sites]
    if ours != theirs:
        disagreements.append(f"the oracle's capture found other sites ({len(theirs)} vs {len(ours)})")
    return {"agree": not disagreements, "pre_gap": res.pre_gap, "post_gap": res.post_gap,
            "disagreements": disagreements[:6], "notes": list(res.notes)[:6], "error": None}


def run_checked(module, args: tuple, kwargs: dict) -> dict:
    """Run the converted module with the invariant hooks: finite outputs, the largest relative norm
    change, ``ok`` when both hold (used at the new batch size for captures that specialise the length)."""
    import torch
    from geonorm_fx.geodesic import record_norm_changes

    res = {"finite": None, "max_gap": None, "n_updates_called": 0, "ok": False, "error": None}
    try:
        with record_norm_changes(module) as gaps, torch.no_grad():
            out = module(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        res["error"], res["where"] = _short(e), _where(e)
        return res
    res.update(finite=_finite(out), max_gap=max(gaps) if gaps else None, n_updates_called=len(gaps))
    res["ok"] = res["finite"] and all(math.isfinite(g) and g <= TOL for g in gaps)
    return res


FULL_CAPTURE = False
ORACLES = True


def export(model, args: tuple, kwargs: dict):
    """``torch.export`` (non-strict) with the first two dims of every tensor input ``Dim.AUTO`` (as
    ``gf.convert`` captures an ``nn.Module``); with static shapes when that fails."""
    import torch
    from torch.export import Dim, ShapesCollection
    from torch.utils import _pytree as pytree

    shapes = ShapesCollection()
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
            shapes[leaf] = {d: Dim.AUTO for d in range(min(leaf.dim(), 2))}
    try:
        return torch.export.export(model, args, kwargs, dynamic_shapes=shapes.dynamic_shapes(model, args, kwargs),
                                   strict=False)
    except Exception:  # noqa: BLE001 - retried with static shapes; the report then says dynamic=False
        return torch.export.export(model, args, kwargs, strict=False)


def specialised_dims(ep) -> list[str]:
    """The batch/sequence dims of the user inputs that the export made static (``name[dim]=size``)."""
    import torch

    user = set(ep.graph_signature.user_inputs)
    out = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                out += [f"{node.name}[{d}]={val.shape[d]}" for d in range(min(val.dim(), 2))
                        if not isinstance(val.shape[d], torch.SymInt) and val.shape[d] == (BATCH, SEQ)[d]]
    return out


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    ours = [f for f in tb if "geonorm_fx" in f.filename]
    f = (ours or tb)[-1] if tb else None
    return f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" if f else ""


# ------------------------------------------------------------------------------------------------ workers
def _child(entry, conn):
    try:
        conn.send(run_one(entry))
    except BaseException as e:  # noqa: BLE001
        conn.send({**entry, "status": "crash", "stage": "worker", "error": _short(e)})
    finally:
        conn.close()


def warm_up() -> None:
    """Import what every worker needs and run one tiny export and conversion in the parent, so each
    forked worker starts warm (single-threaded: no thread pool exists when the workers fork)."""
    import torch

    torch.set_num_threads(1)
    import transformers
    import geonorm_fx as gf
    from transformers import modeling_utils, masking_utils  # noqa: F401 - shared by every model
    from transformers.models.llama import modeling_llama  # noqa: F401 - the common building blocks
    from transformers.models.bert import modeling_bert  # noqa: F401
    from transformers.models.vit import modeling_vit  # noqa: F401
    transformers.logging.set_verbosity_error()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    x = torch.randn(BATCH, SEQ, 8)
    ep = export(model, (x,), {})
    gf.convert(ep, (x,))


_RUNNING: list = []


def _terminate(signum, frame):
    for proc in list(_RUNNING):
        if proc.is_alive():
            proc.kill()
    os._exit(128 + signum)


def sweep(entries: list[dict], jobs: int, timeout: float, on_result) -> list[dict]:
    """Each architecture in a fresh forked worker process, ``jobs`` at a time, ``timeout`` seconds each."""
    ctx = mp.get_context("fork")
    pending = list(entries)
    running: list[tuple] = []
    results = []
    while pending or running:
        while pending and len(running) < jobs:
            entry = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(entry, child), daemon=True)
            proc.start()
            _RUNNING.append(proc)
            child.close()
            running.append((entry, proc, parent, time.perf_counter()))
        time.sleep(0.05)
        still = []
        for entry, proc, conn, start in running:
            rec = None
            if conn.poll():
                try:
                    rec = conn.recv()
                except EOFError:
                    rec = {**entry, "status": "crash", "stage": "worker",
                           "error": f"worker died (exit code {proc.exitcode})"}
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
            elif not proc.is_alive():
                proc.join()
                rec = {**entry, "status": "crash", "stage": "worker",
                       "error": f"worker died (exit code {proc.exitcode})"}
            elif time.perf_counter() - start > timeout:
                proc.kill()
                proc.join()
                rec = {**entry, "status": "timeout", "stage": "worker", "error": f"no result after {timeout:.0f} s",
                       "seconds": {"total": round(time.perf_counter() - start, 1)}}
            if rec is not None and proc in _RUNNING:
                _RUNNING.remove(proc)
            if rec is None:
                still.append((entry, proc, conn, start))
            else:
                conn.close()
                results.append(rec)
                on_result(rec)
        running = still
    return results


# ------------------------------------------------------------------------------------------------ report
FAIL_OURS = ("convert", "run", "not-finite", "invariant", "mismatch", "no-reason")


def owner(rec: dict) -> str:
    if rec["name"] in KNOWN:
        return KNOWN[rec["name"]][0]
    return {"ok": "-", "zero-site": "-", "build": "sweep", "capture": "upstream", "static": "upstream",
            "timeout": "?", "crash": "?"}.get(rec["status"], "ours")


def summary(results: list[dict]) -> dict:
    by = Counter(r["status"] for r in results)
    captured = [r for r in results if r.get("captured")]
    dynamic = [r for r in captured if r["status"] != "static"]
    good = [r for r in captured if r["status"] in ("ok", "zero-site") and owner(r) != "ours"]
    admitted = [r for r in captured if r["status"] == "static" and (r.get("new_batch_only") or {}).get("ok")
                and (r.get("n_sites") or r.get("skipped"))]
    checked = [r for r in dynamic if r["status"] == "ok" and r.get("oracle") is not None]
    verified = [r for r in checked if r["oracle"].get("agree")]
    zero = [r for r in good if r["status"] == "zero-site"]
    return {"architectures": len(results), "built": len(results) - by["build"] - by["timeout"] - by["crash"],
            # converted, and every oracle (identities, module tree) agrees with the sites rewritten
            "verified": len(verified), "oracle_checked": len(checked),
            "oracle_disagree": [r["name"] for r in checked if not r["oracle"].get("agree")],
            # of the dynamic captures: verified conversions plus zero-site models that say why
            "verified_coverage": round((len(verified) + len(zero)) / len(dynamic), 4) if dynamic and checked else None,
            "captured": len(captured), "captured_dynamic": len(dynamic), "ok": by["ok"],
            "zero_site_with_reason": sum(1 for r in good if r["status"] == "zero-site"),
            # of the architectures torch.export captures with dynamic batch/sequence dims
            "coverage": round(len(good) / len(dynamic), 4) if dynamic else None,
            # the same, counting the captures that torch.export specialised to the example shape as failures
            "coverage_strict": round(len(good) / len(captured), 4) if captured else None,
            "by_status": dict(by),
            "failures_ours": sum(1 for r in captured if r not in good and owner(r) == "ours"),
            "timeouts": by["timeout"],
            "failures_upstream": sum(1 for r in results if r["status"] not in ("ok", "zero-site", "build")
                                     and owner(r) == "upstream"),
            "not_built": by["build"],
            # captures specialised to the example sequence length that run fine at the new batch size
            "static_new_batch_ok": len(admitted),
            # of all captures: converted OK at a new shape the capture accepts (dynamic ones at the new batch
            # and sequence length, sequence-specialised ones at the new batch size)
            "coverage_admitted_shapes": round((len(good) + len(admitted)) / len(captured), 4) if captured else None}


def row(r: dict) -> str:
    sites = ", ".join(f"{k}={v}" for k, v in sorted((r.get("counts") or {}).items())) or "-"
    skipped = ", ".join(f"{n}x {k}" if n > 1 else k for k, n in (r.get("skipped") or {}).items()) or "-"
    gap = f"{r['max_gap']:.1e}" if r.get("max_gap") is not None else "-"
    secs = (r.get("seconds") or {}).get("total")
    err = (r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:160]
    if r["name"] in KNOWN:
        err = f"{KNOWN[r['name']][1]} ({err[:80]})" if err else KNOWN[r["name"]][1]
    fin = {True: "yes", False: "no", None: "-"}[r.get("finite")]
    return (f"| {r['name']} | {r['cls']} | {r['status']} | {sites} | {skipped} | {fin} | {gap} | "
            f"{oracle_cell(r)} | {secs if secs is not None else '-'} | {owner(r)} | {err or '-'} |")


def oracle_cell(r: dict) -> str:
    o = r.get("oracle")
    if o is None:
        return "-"
    gaps = ", ".join(f"{k} {o[k + '_gap']:.0e}" for k in ("pre", "post") if o.get(k + "_gap") is not None)
    if o.get("agree"):
        return f"agree ({gaps})" if gaps else "agree (module tree)"
    why = "; ".join(o.get("disagreements") or [o.get("error") or "?"])
    return ("DISAGREE: " + why).replace("|", "\\|").replace("\n", " ")[:200]


HEADER = ("| model type | class | status | sites | skipped norms | finite | max \\|\\|out\\|-\\|x\\||/\\|x\\| | "
          "oracles | time (s) | owner | error / reason |\n|---|---|---|---|---|---|---|---|---|---|---|")


def environment() -> dict:
    import torch
    import transformers
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def write_outputs(results: list[dict], env: dict, json_path: str, md_path: str | None = None) -> dict:
    """Write the JSON (environment, summary, one record per architecture) and the markdown table."""
    for r in results:
        r["owner"] = owner(r)
        if r["name"] in KNOWN:
            r["cause"] = KNOWN[r["name"]][1]
    summ = summary(results)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({"environment": env, "summary": summ, "results": results}, f, indent=1)
    with open(md_path or os.path.splitext(json_path)[0] + ".md", "w") as f:
        f.write(f"# transformers zoo sweep\n\n`{env['command']}` on {env['date']}: torch {env['torch']}, "
                f"transformers {env['transformers']}, Python {env['python']}.\n\n")
        if summ["coverage"] is not None:
            f.write(f"{summ['architectures']} architectures enumerated, {summ['built']} built and run, "
                    f"{summ['captured']} captured by torch.export, {summ['captured_dynamic']} of them with dynamic "
                    f"batch/sequence dims. Of those, {summ['ok']} convert with sites, finite outputs at a new "
                    f"shape and the invariant <= {TOL}, and {summ['zero_site_with_reason']} have no residual "
                    f"norm and the report says why: coverage {summ['coverage']:.1%} "
                    f"({summ['coverage_strict']:.1%} counting the shape-specialised captures as failures). "
                    f"{summ['static_new_batch_ok']} of the {summ['by_status'].get('static', 0)} shape-specialised "
                    f"captures run fine at a new batch size with the captured sequence length (sites or a "
                    f"stated reason): {summ['coverage_admitted_shapes']:.1%} of all captures convert and run at a "
                    f"new shape their capture accepts.\n\n")
        if summ.get("verified_coverage") is not None:
            f.write(f"**Verified coverage {summ['verified_coverage']:.1%}**: {summ['verified']} of the "
                    f"{summ['oracle_checked']} converted architectures pass every oracle (Pre-Norm / Post-Norm "
                    f"identity, module-tree cross-check), plus {summ['zero_site_with_reason']} zero-site "
                    f"architectures that say why, of {summ['captured_dynamic']} dynamic captures. Disagreements: "
                    f"{', '.join(summ['oracle_disagree']) or 'none'}.\n\n")
        f.write(HEADER + "\n")
        for r in results:
            f.write(row(r) + "\n")
    return summ


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated model types or class names")
    ap.add_argument("--limit", type=int, help="only the first N architectures")
    ap.add_argument("--task", choices=("causal-lm", "masked-lm", "vision"))
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per architecture (default 240)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes at a time (default 1)")
    ap.add_argument("--json", default=DEFAULT_JSON, help=f"write the results here (default {DEFAULT_JSON})")
    ap.add_argument("--md", help="also write the markdown table here (default: next to --json)")
    ap.add_argument("--full-capture", action="store_true",
                    help="call gf.inspect/gf.convert on the nn.Module (three captures: inspect, eval, train) "
                         "instead of on one shared torch.export capture")
    ap.add_argument("--no-oracles", action="store_true",
                    help="skip gf.check_sites (the identities and the module-tree cross-check) on converted models")
    ap.add_argument("--resume", action="store_true",
                    help="skip the architectures already recorded in the --json file's .partial.jsonl log "
                         "(every result is appended there as it completes) and report them with the new ones")
    ap.add_argument("--rewrite", action="store_true",
                    help="run nothing: rewrite the --json file's summary and markdown table from its records")
    ap.add_argument("--merge", action="store_true",
                    help="update the architectures run in an existing --json file instead of replacing it")
    opts = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if opts.rewrite:
        with open(opts.json) as f:
            data = json.load(f)
        print(json.dumps(write_outputs(data["results"], data["environment"], opts.json, opts.md)))
        return 0
    global FULL_CAPTURE, ORACLES
    FULL_CAPTURE = opts.full_capture
    ORACLES = not opts.no_oracles
    signal.signal(signal.SIGTERM, _terminate)
    warm_up()

    entries = architectures(opts.task)
    if opts.only:
        wanted = {w.strip() for w in opts.only.split(",") if w.strip()}
        entries = [e for e in entries if e["name"] in wanted or e["cls"] in wanted]
        missing = wanted - {e["name"] for e in entries} - {e["cls"] for e in entries}
        if missing:
            print(f"not in the auto mappings: {', '.join(sorted(missing))}", file=sys.stderr)
    if opts.limit:
        entries = entries[:opts.limit]
    partial = os.path.splitext(opts.json)[0] + ".partial.jsonl"
    done_before = []
    if opts.resume and os.path.exists(partial):
        with open(partial) as f:
            done_before = [json.loads(line) for line in f if line.strip()]
        names = {r["name"] for r in done_before}
        done_before = [r for r in done_before if r["name"] in {e["name"] for e in entries}]
        entries_left = [e for e in entries if e["name"] not in names]
    else:
        entries_left = entries
        os.makedirs(os.path.dirname(os.path.abspath(partial)), exist_ok=True)
        open(partial, "w").close()
    print(f"{len(entries_left)} architectures to run ({len(done_before)} already recorded), jobs={opts.jobs}, "
          f"timeout={opts.timeout:.0f}s", flush=True)
    print(HEADER, flush=True)
    start = time.perf_counter()

    def record(r):
        print(row(r), flush=True)
        with open(partial, "a") as f:
            f.write(json.dumps(r) + "\n")

    results = done_before + sweep(entries_left, max(1, opts.jobs), opts.timeout, record)
    order = {e["name"]: i for i, e in enumerate(entries)}
    results.sort(key=lambda r: order[r["name"]])
    if opts.merge and os.path.exists(opts.json):
        with open(opts.json) as f:
            old = json.load(f)
        fresh = {r["name"] for r in results}
        results = [r for r in old["results"] if r["name"] not in fresh] + results
        everything = {e["name"]: i for i, e in enumerate(architectures())}
        results.sort(key=lambda r: everything.get(r["name"], 10 ** 6))
    env = environment()
    env["wall_seconds"] = round(time.perf_counter() - start, 1)
    summ = write_outputs(results, env, opts.json, opts.md)
    print()
    print(json.dumps(summ))
    md = opts.md or os.path.splitext(opts.json)[0] + ".md"
    print(f"wrote {opts.json} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
