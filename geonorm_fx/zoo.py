"""Model specs for the command line: built-in tiny models, local Hugging Face configs, factories.

- ``hf:<name>``: a tiny, randomly initialised Hugging Face model built offline from a config
  (``gpt2``, ``bert``, ``llama``, ``vit``, ``t5`` = the T5 encoder, ``t5-full``, ``gemma2``, ``olmo2``,
  ``gpt-neox`` (parallel residual), ``albert`` (one layer applied 4 times));
- ``torch:encoder-pre`` / ``torch:encoder-post``: ``nn.TransformerEncoder`` with ``norm_first`` on/off;
- a path to a local Hugging Face config directory or ``config.json`` (random weights, no download);
- ``package.module:factory`` where ``factory()`` returns ``(model, args)`` or ``(model, args, kwargs)``.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import GeoNormError


class SpecError(GeoNormError):
    """The model spec given on the command line cannot be resolved."""


@dataclass
class ZooModel:
    name: str
    model: nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)


BATCH, SEQ = 2, 8


def _hf():
    try:
        import transformers
    except ImportError:
        raise SpecError("hf: specs need Hugging Face transformers: pip install 'geonorm-fx[hf]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


_DECODER = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, use_cache=False)

# name: (config class, model class, config kwargs, inputs) -- tiny sizes, random weights, no download
_HF = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   use_cache=False, bos_token_id=0, eos_token_id=0), "ids"),
    "bert": ("BertConfig", "BertModel", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=128,
                                             max_position_embeddings=64), "ids"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER, "ids"),
    "vit": ("ViTConfig", "ViTModel", dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
            "pixels"),
    "t5": ("T5Config", "T5EncoderModel", dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                              num_heads=4, use_cache=False), "ids"),
    "t5-full": ("T5Config", "T5Model", dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                            num_heads=4, use_cache=False), "ids+decoder"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_DECODER, head_dim=16), "ids"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _DECODER, "ids"),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              max_position_embeddings=64, use_cache=False,
                                                              use_parallel_residual=True), "ids"),
    "albert": ("AlbertConfig", "AlbertModel", dict(vocab_size=128, embedding_size=32, hidden_size=64,
                                                   num_hidden_layers=4, num_hidden_groups=1, num_attention_heads=4,
                                                   intermediate_size=128, max_position_embeddings=64), "ids"),
}


def _hf_builder(name: str):
    def build():
        t = _hf()
        config_cls, model_cls, config, inputs = _HF[name]
        model = getattr(t, model_cls)(getattr(t, config_cls)(**config))
        if inputs == "pixels":
            return model, (torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0)),), {}
        ids = _ids(config.get("vocab_size", 128))
        return model, (ids,), ({"decoder_input_ids": _ids(128)[:, :SEQ - 2]} if inputs == "ids+decoder" else {})
    return build


def _torch_encoder(norm_first: bool):
    def build():
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, batch_first=True, norm_first=norm_first)
        model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        return model, (torch.randn(BATCH, SEQ, 64, generator=torch.Generator().manual_seed(0)),), {}
    return build


BUILTIN = {**{f"hf:{name}": _hf_builder(name) for name in _HF},
           "torch:encoder-pre": _torch_encoder(True),
           "torch:encoder-post": _torch_encoder(False)}


def load(spec: str) -> ZooModel:
    """Resolve a spec into a model (in eval mode) and example inputs; :class:`SpecError` if it can't."""
    torch.manual_seed(0)
    if spec in BUILTIN:
        model, args, kwargs = BUILTIN[spec]()
        return ZooModel(spec, model.eval(), args, kwargs)
    if spec.startswith(("hf:", "torch:")):
        raise SpecError(f"unknown built-in model {spec!r}: use one of {', '.join(BUILTIN)}")
    if os.path.isdir(spec) or spec.endswith(".json"):
        return _from_config(spec)
    if ":" in spec:
        return _from_factory(spec)
    raise SpecError(f"cannot read model spec {spec!r}: give hf:<name>, torch:<name>, a Hugging Face config "
                    "directory or config.json, or package.module:factory")


def _from_config(path: str) -> ZooModel:
    if not os.path.exists(path):
        raise SpecError(f"no such config file or directory: {path}")
    t = _hf()
    try:
        cfg = t.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the config is a bad spec
        raise SpecError(f"cannot read a Hugging Face config from {path}: {str(e).splitlines()[0]}") from None
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    try:
        model = t.AutoModel.from_config(cfg)
    except Exception as e:  # noqa: BLE001
        raise SpecError(f"cannot build a model from {path} ({cfg.model_type}): {str(e).splitlines()[0]}") from None
    if getattr(cfg, "image_size", None) and getattr(cfg, "num_channels", None):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        args = (torch.randn(BATCH, cfg.num_channels, size, size, generator=torch.Generator().manual_seed(0)),)
    elif getattr(cfg, "vocab_size", None):
        args = (_ids(cfg.vocab_size),)
    else:
        raise SpecError(f"cannot make example inputs for {cfg.model_type}: use a module:factory spec")
    return ZooModel(path, model.eval(), args)


def _from_factory(spec: str) -> ZooModel:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"cannot import {spec}: {e}") from None
    try:
        built = factory()
    except Exception as e:  # noqa: BLE001 - the factory is user code
        raise SpecError(f"{spec}() raised {type(e).__name__}: {e}") from None
    if not isinstance(built, tuple) or len(built) not in (2, 3) or not isinstance(built[0], nn.Module):
        raise SpecError(f"{spec}() must return (model, args) or (model, args, kwargs)")
    model, args, *rest = built
    args = args if isinstance(args, tuple) else (args,)
    return ZooModel(spec, model, args, dict(rest[0]) if rest else {})
