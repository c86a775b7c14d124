"""Model specs for the command line: built-in tiny models, local Hugging Face configs, factories.

- ``hf:<name>``: a tiny, randomly initialised Hugging Face model built offline from a config
  (``gpt2``, ``bert``, ``llama``, ``vit``, ``t5`` = the T5 encoder, ``t5-full``, ``gemma2``, ``olmo2``,
  ``gpt-neox`` (parallel residual), ``albert`` (one layer applied 4 times));
- ``torch:encoder-pre`` / ``torch:encoder-post``: ``nn.TransformerEncoder`` with ``norm_first`` on/off;
- a path to a local Hugging Face config directory or ``config.json`` (random weights, no download);
- ``package.module:factory`` where ``factory()`` returns ``(model, args)`` or ``(model, args, kwargs)``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Mapping
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
    """A randomly initialised model from a local Hugging Face config, built as the class its
    ``architectures`` names (e.g. ``Qwen2ForCausalLM``) when transformers has it, else the base model.
    No download and no remote code: ``auto_map`` / ``trust_remote_code`` configs are refused."""
    if not os.path.exists(path):
        raise SpecError(f"no such config file or directory: {path}")
    t = _hf()
    try:
        cfg = t.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure to read the config is a bad spec
        raise SpecError(f"cannot read a Hugging Face config from {path}: {_first_line(e)}") from None
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    cls = _architecture_class(t, cfg)
    try:
        model = (cls._from_config(cfg) if hasattr(cls, "_from_config") else cls(cfg)) if cls is not None \
            else t.AutoModel.from_config(cfg, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        what = cls.__name__ if cls is not None else cfg.model_type
        raise SpecError(f"cannot build a model from {path} ({what}): {_first_line(e)}") from None
    kwargs = {}
    if getattr(cfg, "image_size", None) and getattr(cfg, "num_channels", None):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        args = (torch.randn(BATCH, cfg.num_channels, size, size, generator=torch.Generator().manual_seed(0)),)
    elif getattr(cfg, "vocab_size", None):
        args = (_ids(cfg.vocab_size),)
        if getattr(cfg, "is_encoder_decoder", False):
            kwargs = {"decoder_input_ids": _ids(cfg.vocab_size)[:, :SEQ - 2]}
    else:
        raise SpecError(f"cannot make example inputs for {cfg.model_type}: use a module:factory spec")
    return ZooModel(f"{path} ({type(model).__name__})", model.eval(), args, kwargs)


def _architecture_class(t, cfg):
    """The first class named in ``cfg.architectures`` that transformers has and that takes this config;
    ``None`` when there is none (then the base model of ``cfg.model_type`` is built)."""
    for name in getattr(cfg, "architectures", None) or ():
        if not isinstance(name, str) or not name.isidentifier():
            continue
        try:
            cls = getattr(t, name, None)
        except Exception:  # noqa: BLE001 - a lazy import failing means: transformers cannot build it
            continue
        if not (isinstance(cls, type) and issubclass(cls, t.PreTrainedModel)):
            continue
        config_class = getattr(cls, "config_class", None)
        if isinstance(config_class, type) and not isinstance(cfg, config_class):
            continue
        return cls
    return None


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


_FACTORY_RESULT = ("(model, args) or (model, args, kwargs): model a torch.nn.Module, args a tuple of "
                   "example inputs, kwargs a dict of keyword inputs")


def _parse_factory_spec(spec: str) -> tuple[str, str]:
    """Split ``package.module:factory`` into its two dotted names; :class:`SpecError` unless both are
    dotted Python identifiers (no file paths, no relative ``.module`` names)."""
    module_name, _, attr = spec.partition(":")
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise SpecError(f"model spec {spec!r}: {module_name!r} is not a Python module name: give "
                        "package.module:factory with dotted names such as mypkg.models:build (no file paths, "
                        "no leading dots); run from the folder that holds the module or put it on PYTHONPATH")
    if not all(part.isidentifier() for part in attr.split(".")):
        raise SpecError(f"model spec {spec!r}: {attr!r} is not a Python name: give package.module:factory, "
                        "where factory is a function in that module")
    return module_name, attr


@contextlib.contextmanager
def _cwd_on_path():
    """Put the current directory first on ``sys.path`` for the duration (so ``module:factory`` specs in
    the working directory import without ``PYTHONPATH=.``), and take it off again afterwards."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        yield cwd
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _from_factory(spec: str) -> ZooModel:
    """Import ``package.module:factory``, call ``factory()`` and check what it returned."""
    module_name, attr = _parse_factory_spec(spec)
    with _cwd_on_path() as cwd:
        factory = _import_factory(spec, module_name, attr, cwd)
        try:
            built = factory()
        except SystemExit as e:
            raise SpecError(f"{spec}() exited (SystemExit({e.code!r})) instead of returning {_FACTORY_RESULT}: "
                            "make the factory return the model instead of calling exit()") from None
        except Exception as e:  # noqa: BLE001 - the factory is user code
            raise SpecError(f"{spec}() raised {type(e).__name__}: {_first_line(e)}") from None
    return _check_factory_result(spec, built)


def _import_factory(spec: str, module_name: str, attr: str, cwd: str):
    """The callable ``attr`` of module ``module_name``; :class:`SpecError` naming what went wrong."""
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"cannot import {spec}: {_first_line(e)} (searched the current folder {cwd} and "
                        "sys.path; check the name or set PYTHONPATH)") from None
    except SystemExit as e:
        raise SpecError(f"cannot import {spec}: importing {module_name} exited (SystemExit({e.code!r})): "
                        "guard the module's script code with if __name__ == '__main__'") from None
    except Exception as e:  # noqa: BLE001 - importing runs user code
        raise SpecError(f"cannot import {spec}: importing {module_name} raised {type(e).__name__}: "
                        f"{_first_line(e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"cannot import {spec}: {type(obj).__name__} {getattr(obj, '__name__', module_name)!r} "
                            f"has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"{spec} is a {type(obj).__name__}, not a factory: give a function that returns "
                        f"{_FACTORY_RESULT}")
    return obj


def _check_factory_result(spec: str, built) -> ZooModel:
    """Check a factory's result has the documented shape; normalise ``args`` to a tuple."""
    if not isinstance(built, tuple):
        raise SpecError(f"{spec}() returned {type(built).__name__}, but a factory must return {_FACTORY_RESULT}")
    if len(built) not in (2, 3):
        raise SpecError(f"{spec}() returned a tuple of {len(built)} item(s), but a factory must return "
                        f"{_FACTORY_RESULT}")
    model, args, *rest = built
    if not isinstance(model, nn.Module):
        raise SpecError(f"{spec}() returned {type(model).__name__} as the model, but a factory must return "
                        f"{_FACTORY_RESULT}")
    args = () if args is None else args if isinstance(args, tuple) else (args,)
    kwargs = rest[0] if rest else None
    if kwargs is None:
        kwargs = {}
    elif not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise SpecError(f"{spec}() returned {type(kwargs).__name__} as kwargs (the third item), but a factory "
                        f"must return {_FACTORY_RESULT}")
    return ZooModel(spec, model, args, dict(kwargs))
