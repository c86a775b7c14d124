"""Cached decoding export: a Hugging Face causal LM as an Optimum-style decoder for ONNX Runtime.

One graph serves the prompt and every generated token: inputs ``input_ids``, ``attention_mask`` (past and new
tokens), ``position_ids`` (where the model takes them) and ``past_key_values.{i}.key|value`` per layer
(``(batch, kv_heads, past, head_dim)``, past length 0 for the prompt); outputs ``logits`` and
``present.{i}.key|value`` (the past with the new tokens appended). Batch, sequence and past length are dynamic.

The model is a ``gf.install``-ed model (its updates are used, rewritten by the same detector from the export's
own capture and checked against the install plan) or a plain source model (exported as it is: the baseline of
``benchmarks/onnx_decode.py``). A model trained with ``gf.convert`` is served by installing the source and loading
the converted module's updates: ``gf.install(source, ...); gf.load_updates(source, converted)``.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InvalidInputError
from ..install import _installable, installed_forward_of, rewrite_with_plan
from .onnx import DEFAULT_OPSET, VerificationError, _ort_failure, diff_and_bound, eval_mode, export_error, ort_session

WRAPPED = "lm"   # the attribute the wrapper holds the model under (stripped from module paths)


@dataclass
class DecoderExport:
    """What :func:`export_decoder` wrote and measured."""

    path: str
    opset: int
    size_bytes: int
    input_names: list[str]
    output_names: list[str]
    n_layers: int
    takes_position_ids: bool
    providers: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    checked: list[dict] = field(default_factory=list)   # per verification case: batch, new tokens, past length


class CachedDecoder(nn.Module):
    """``forward(input_ids, attention_mask, [position_ids], *past) -> (logits, *present)`` around a causal LM.

    ``past`` is ``k_0, v_0, k_1, v_1, ...``; the model's class ``forward`` is called (for an installed model that
    is the unrewritten source forward: the export rewrites its capture with the installed updates)."""

    def __init__(self, model: nn.Module, n_layers: int, takes_position_ids: bool):
        super().__init__()
        setattr(self, WRAPPED, model)
        self.n_layers = n_layers
        self.takes_position_ids = takes_position_ids

    def forward(self, input_ids, attention_mask, *rest):
        from transformers import DynamicCache

        position_ids, past = (rest[0], rest[1:]) if self.takes_position_ids else (None, rest)
        model = getattr(self, WRAPPED)
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)])
        extra = {"position_ids": position_ids} if self.takes_position_ids else {}
        extra[_cache_argument(model)] = cache
        out = type(model).forward(model, input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                                  return_dict=True, **extra)
        return (out.logits, *_flat_cache(out))


def decoder_names(n_layers: int, takes_position_ids: bool) -> tuple[list[str], list[str]]:
    """Optimum's input and output names."""
    inputs = ["input_ids", "attention_mask"] + (["position_ids"] if takes_position_ids else [])
    outputs = ["logits"]
    for i in range(n_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def decoder_inputs(model: nn.Module, batch: int, new: int, past: int, vocab_high: int | None = None,
                   seed: int = 0) -> tuple:
    """Example decoder inputs: a real cache of ``past`` tokens (from the model's own forward), ``new`` tokens."""
    target = _installable(model)
    g = torch.Generator().manual_seed(seed)
    high = vocab_high or int(target.config.vocab_size)
    prefix = torch.randint(1, high, (batch, past), generator=g)
    ids = torch.randint(1, high, (batch, new), generator=g)
    takes_position_ids = _takes_position_ids(target)
    with torch.no_grad():
        flat = _flat_cache(type(target).forward(target, input_ids=prefix, use_cache=True, return_dict=True))
    mask = torch.ones(batch, past + new, dtype=torch.long)
    positions = torch.arange(past, past + new).unsqueeze(0).expand(batch, new).contiguous()
    return (ids, mask, *([positions] if takes_position_ids else []), *flat)


def decoder_graph(model: nn.Module):
    """``(graph, example, dynamic_shapes, takes_position_ids, n_layers)``: the cached decoder of ``model`` captured
    with torch.export (dynamic batch, new tokens and past length) and, for an installed model, rewritten with its
    updates; ``graph`` takes the inputs flat, in :func:`decoder_names` order."""
    target = _installable(model)
    if not hasattr(target, "config") or not hasattr(target.config, "vocab_size"):
        raise InvalidInputError(f"a cached decoder needs a Hugging Face causal LM, got {type(target).__name__}")
    takes_position_ids = _takes_position_ids(target)
    example = decoder_inputs(target, 2, 3, 5)
    n_layers = (len(example) - (3 if takes_position_ids else 2)) // 2
    wrapper = CachedDecoder(target, n_layers, takes_position_ids).eval()
    shapes = _dynamic_shapes(len(example), takes_position_ids)
    try:
        program = torch.export.export(wrapper, example, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # noqa: BLE001
        raise export_error(f"torch.export could not capture {type(target).__name__} as a cached decoder", e) from e
    graph = program.module()
    if installed_forward_of(target) is not None:
        rewrite_with_plan(graph, target, prefix=WRAPPED)
    flat_shapes = (shapes[0], shapes[1], *shapes[2])   # the unlifted graph takes the inputs flat
    return graph, example, flat_shapes, takes_position_ids, n_layers


def export_decoder(model: nn.Module, path: str, *, opset: int | None = None, verify: bool = True,
                   providers: list[str] | None = None) -> DecoderExport:
    """Write ``model`` (a Hugging Face causal LM, installed with ``gf.install`` or not) as a cached decoder to
    ``path`` (see the module docstring) and, with ``verify``, check it in ONNX Runtime against the model's own
    cached forward at two past lengths (5 and 9, with 3 and 1 new tokens, batch 2 and 1)."""
    target = _installable(model)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    with eval_mode(target), warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        graph, example, shapes, takes_position_ids, n_layers = decoder_graph(target)
        input_names, output_names = decoder_names(n_layers, takes_position_ids)
        try:
            onnx_program = torch.onnx.export(graph, example, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                             input_names=input_names, output_names=output_names, verbose=False)
        except Exception as e:  # noqa: BLE001
            raise export_error(f"torch.onnx could not export {type(target).__name__} as a cached decoder", e) from e
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        onnx_program.save(path)
    size = os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)
    result = DecoderExport(path, opset, size, input_names, output_names, n_layers, takes_position_ids)
    if verify:
        with eval_mode(target):
            verify_decoder(model, result, providers)
    return result


def export_decoder_aot(model: nn.Module, path: str, *, verify: bool = True):
    """The same cached decoder as an AOTInductor package (``.pt2``): ``load_aot(path)(*inputs)`` returns
    ``[logits, present.0.key, ...]`` for inputs in :func:`decoder_names` order. With ``verify``, checked against
    the model's cached forward at past lengths 5 and 9. Returns the path. The package holds native code: load only
    packages you trust."""
    target = _installable(model)
    if not str(path).endswith(".pt2"):
        raise InvalidInputError(f"AOT packages end in .pt2, got {path}")
    with eval_mode(target), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, example, shapes, takes_position_ids, n_layers = decoder_graph(target)
        try:
            program = torch.export.export(graph, example, dynamic_shapes=shapes, strict=False)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            torch._inductor.aoti_compile_and_package(program, package_path=path)
        except Exception as e:  # noqa: BLE001
            raise export_error(f"AOTInductor could not package {type(target).__name__} as a cached decoder", e) from e
    if verify:
        names = decoder_names(n_layers, takes_position_ids)
        meta = DecoderExport(path, 0, os.path.getsize(path), names[0], names[1], n_layers, takes_position_ids)
        runner = torch._inductor.aoti_load_package(path)
        with eval_mode(target):
            for batch, new, past in ((2, 3, 5), (1, 1, 9)):
                inputs = decoder_inputs(target, batch, new, past, seed=past)
                expected = _reference(target, inputs, meta)
                got = runner(*inputs)
                for name, ref, out in zip(meta.output_names, expected, got):
                    diff, bound = diff_and_bound(ref, out, ref.dtype)
                    if not diff <= bound:
                        raise VerificationError(f"the AOT package disagrees with PyTorch on {name!r} at past length "
                                                f"{past}: max |diff| = {diff:.3g}")
    return path


def verify_decoder(model: nn.Module, result: DecoderExport, providers: list[str] | None = None) -> None:
    """Compare ONNX Runtime with the model's cached forward (for an installed model: its installed road) at
    past lengths 5 and 9; set ``result.max_abs_diff``, or raise :class:`VerificationError`."""
    target = _installable(model)
    try:
        session = ort_session(result.path, providers)
    except Exception as e:  # noqa: BLE001
        raise _ort_failure(result.path, e) from e
    result.providers = list(session.get_providers())
    worst = 0.0
    for batch, new, past in ((2, 3, 5), (1, 1, 9)):
        inputs = decoder_inputs(target, batch, new, past, seed=past)
        expected = _reference(target, inputs, result)
        feeds = {name: t.numpy() for name, t in zip(result.input_names, inputs)}
        try:
            got = session.run(result.output_names, feeds)
        except Exception as e:  # noqa: BLE001
            raise _ort_failure(result.path, e) from e
        result.checked.append({"batch": batch, "new": new, "past": past})
        for name, ref, out in zip(result.output_names, expected, got):
            if tuple(ref.shape) != tuple(out.shape):
                raise VerificationError(f"ONNX Runtime's {name!r} has shape {tuple(out.shape)}, PyTorch's "
                                        f"{tuple(ref.shape)} (past {past}, {new} new tokens)")
            diff, bound = diff_and_bound(ref, out, expected[0].dtype)
            worst = max(worst, diff)
            if not diff <= bound:
                raise VerificationError(
                    f"ONNX Runtime ({result.providers[0]}) disagrees with PyTorch on {name!r} at past length {past} "
                    f"({new} new tokens, batch {batch}): max |diff| = {diff:.3g} > {bound:.3g}; {result.path} is not "
                    "a faithful export")
    result.max_abs_diff = worst


def _reference(target: nn.Module, inputs: tuple, result: DecoderExport) -> list[torch.Tensor]:
    """The model's own cached forward on decoder inputs (an installed model runs its installed road)."""
    from transformers import DynamicCache

    ids, mask = inputs[0], inputs[1]
    position_ids = inputs[2] if result.takes_position_ids else None
    past = inputs[3:] if result.takes_position_ids else inputs[2:]
    cache = DynamicCache([(past[2 * i].clone(), past[2 * i + 1].clone()) for i in range(result.n_layers)])
    extra = {"position_ids": position_ids} if result.takes_position_ids else {}
    extra[_cache_argument(target)] = cache
    with torch.no_grad():
        out = target(input_ids=ids, attention_mask=mask, use_cache=True, return_dict=True, **extra)
    return [out.logits, *_flat_cache(out)]


def _cache_argument(model: nn.Module) -> str:
    """The forward's name for the cache: ``cache`` (transformers 5) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _flat_cache(out) -> list[torch.Tensor]:
    """``[k_0, v_0, k_1, v_1, ...]`` of a model output's cache."""
    cache = out.get("cache") if hasattr(out, "get") and out.get("cache") is not None else out.past_key_values
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _takes_position_ids(model: nn.Module) -> bool:
    import inspect

    return "position_ids" in inspect.signature(type(model).forward).parameters


def _dynamic_shapes(n_inputs: int, takes_position_ids: bool) -> tuple:
    from torch.export import Dim

    batch, new, past, total = Dim.DYNAMIC, Dim.DYNAMIC, Dim.DYNAMIC, Dim.DYNAMIC
    rest = [{0: batch, 1: new}] if takes_position_ids else []
    rest += [{0: batch, 2: past}] * (n_inputs - 2 - len(rest))
    return ({0: batch, 1: new}, {0: batch, 1: total}, tuple(rest))   # forward(input_ids, attention_mask, *rest)




def generate_onnx(session, input_ids, max_new_tokens: int, *, attention_mask=None) -> "torch.Tensor":
    """Greedy generation with an ONNX Runtime ``session`` of a decoder from :func:`export_decoder` (a path is
    opened with :func:`ort_session`): the prompt runs with an empty past, then one token per step with the
    ``present`` outputs fed back as ``past_key_values``. Returns ``input_ids`` with the new tokens appended,
    as ``model.generate(input_ids, max_new_tokens=..., do_sample=False)`` would."""
    import numpy as np

    if isinstance(session, (str, os.PathLike)):
        session = ort_session(os.fspath(session))
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
    batch, length = ids.shape
    mask = (np.ones((batch, length), np.int64) if attention_mask is None
            else np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask,
                            dtype=np.int64))
    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    present_names = [n.replace("past_key_values.", "present.") for n in past_names]
    numpy_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
    past = {}
    for name in past_names:
        _, heads, _, head_dim = inputs[name].shape
        past[name] = np.zeros((batch, heads, 0, head_dim), numpy_dtype.get(inputs[name].type, np.float32))
    out = [ids]
    step_ids = ids
    positions = np.cumsum(mask, axis=1) - 1
    positions = np.where(mask == 0, 1, positions)
    for _ in range(max_new_tokens):
        feeds = {"input_ids": step_ids, "attention_mask": mask, **past}
        if "position_ids" in inputs:
            feeds["position_ids"] = positions[:, -step_ids.shape[1]:]
        logits, *present = session.run(["logits", *present_names], feeds)
        token = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        out.append(token)
        past = dict(zip(past_names, present))
        step_ids = token
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        positions = np.concatenate([positions, positions[:, -1:] + 1], axis=1)
    return torch.from_numpy(np.concatenate(out, axis=1))
