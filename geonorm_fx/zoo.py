"""Model specs for the command line: built-in tiny models, local Hugging Face configs, factories.

- ``hf:<name>``: a tiny, randomly initialised Hugging Face model built offline from a config
  (``gpt2``, ``bert``, ``llama``, ``vit``, ``t5`` = the T5 encoder);
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


def _hf_gpt2():
    t = _hf()
    cfg = t.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                       bos_token_id=0, eos_token_id=0)
    return t.GPT2LMHeadModel(cfg), (_ids(128),)


def _hf_bert():
    t = _hf()
    cfg = t.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=64)
    return t.BertModel(cfg), (_ids(128),)


def _hf_llama():
    t = _hf()
    cfg = t.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    return t.LlamaForCausalLM(cfg), (_ids(128),)


def _hf_vit():
    t = _hf()
    cfg = t.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=128)
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return t.ViTModel(cfg, add_pooling_layer=False), (pixels,)


def _hf_t5():
    t = _hf()
    cfg = t.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, use_cache=False)
    return t.T5EncoderModel(cfg), (_ids(128),)


def _torch_encoder(norm_first: bool):
    def build():
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, batch_first=True, norm_first=norm_first)
        model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        return model, (torch.randn(BATCH, SEQ, 64, generator=torch.Generator().manual_seed(0)),)
    return build


BUILTIN = {
    "hf:gpt2": _hf_gpt2,
    "hf:bert": _hf_bert,
    "hf:llama": _hf_llama,
    "hf:vit": _hf_vit,
    "hf:t5": _hf_t5,
    "torch:encoder-pre": _torch_encoder(True),
    "torch:encoder-post": _torch_encoder(False),
}


def load(spec: str) -> ZooModel:
    """Resolve a spec into a model (in eval mode) and example inputs; :class:`SpecError` if it can't."""
    torch.manual_seed(0)
    if spec in BUILTIN:
        model, args = BUILTIN[spec]()
        return ZooModel(spec, model.eval(), args)
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
