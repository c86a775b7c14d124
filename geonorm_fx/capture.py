"""Capture a model as ``fx.GraphModule`` s, one per training mode.

- ``nn.Module`` (``tracer="auto"`` or ``"export"``): ``torch.export.export(strict=False)`` of a deep
  copy, with every tensor input's first two dims marked ``Dim.AUTO`` (batch and sequence); a static
  capture is the fallback, with a :class:`GeoNormWarning`. ``tracer="fx"`` uses ``fx.Tracer`` (only
  ``torch.nn`` leaf modules stay opaque) and fake-tensor shape propagation.
  The model is captured once in eval mode and once in train mode, so every mode-dependent behaviour
  (dropout, SDPA's ``dropout_p``, stochastic depth, BatchNorm statistics) is honoured by the result.
- ``fx.GraphModule`` / ``ExportedProgram``: used as given (deep-copied); the other mode is derived by
  switching the dropout ops' train flags.

The source model is never mutated: it is deep-copied before anything runs.
"""
from __future__ import annotations

import copy
import re
import warnings
from inspect import signature as inspect_signature
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram, ShapesCollection
from torch.utils import _pytree as pytree

from .errors import CaptureError, GeoNormWarning, InvalidInputError
from .geodesic import GeodesicUpdate

TRACERS = ("auto", "export", "fx")
MODES = ("eval", "train")

aten = torch.ops.aten
_DROPOUT_TRAIN_FLAG = {aten.dropout.default: 2, aten.feature_dropout.default: 2, aten.alpha_dropout.default: 2,
                       aten.feature_alpha_dropout.default: 2, aten.native_dropout.default: 2}


@dataclass
class Captured:
    """``graphs[mode]`` for each requested mode; all share parameter objects (by name)."""

    graphs: dict[str, fx.GraphModule]
    tracer: str
    dynamic: bool


def capture(model, args=(), kwargs=None, *, dynamic: bool = True, tracer: str = "auto",
            modes: tuple[str, ...] = MODES) -> Captured:
    """Capture ``model`` on example inputs ``args``/``kwargs``; see the module docstring."""
    args, kwargs = normalize_inputs(args, kwargs)
    if tracer not in TRACERS:
        raise InvalidInputError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    if isinstance(model, ExportedProgram):
        return _given(copy.deepcopy(model.module()), args, kwargs, modes, "export")
    if isinstance(model, fx.GraphModule) and tracer == "auto":
        return _given(_deepcopy(model), args, kwargs, modes, "given")
    if not isinstance(model, nn.Module):
        raise InvalidInputError(
            f"expected a torch.nn.Module, fx.GraphModule or ExportedProgram, got {type(model).__name__}")
    work = _deepcopy(model)
    graphs = {}
    is_dynamic = dynamic
    for mode in modes:
        work.train(mode == "train")
        if tracer == "fx":
            graphs[mode] = _fx_trace(work, args, kwargs)
            is_dynamic = False
        else:
            graphs[mode], is_dynamic = _export(work, args, kwargs, dynamic, warn=(mode == modes[0]))
            dynamic = is_dynamic
    for gm in graphs.values():
        _explicit_contiguous(gm)
    return Captured(graphs, "fx" if tracer == "fx" else "export", is_dynamic)


def _explicit_contiguous(gm: fx.GraphModule) -> None:
    """``aten.contiguous(x)`` -> ``aten.clone(x, memory_format=contiguous_format)``: the same value, but
    re-exporting the converted module with dynamic shapes otherwise lets torch.onnx's decomposition
    drop the copy and fail on the ``view`` that follows (seen with T5's attention output)."""
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.contiguous.default and len(node.args) == 1:
            node.target = aten.clone.default
            node.kwargs = {"memory_format": torch.contiguous_format}
            changed = True
    if changed:
        gm.recompile()


def normalize_inputs(args, kwargs) -> tuple[tuple, dict]:
    if isinstance(args, torch.Tensor):
        args = (args,)
    if isinstance(args, list):
        args = tuple(args)
    if not isinstance(args, tuple):
        raise InvalidInputError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise InvalidInputError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")
    return args, dict(kwargs)


def _deepcopy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - anything deepcopy raises means the same to the user
        raise CaptureError(
            f"could not deep-copy {type(model).__name__} ({type(e).__name__}: {_first_line(e)}); "
            "geonorm-fx copies the model so the source is never changed: make it deep-copyable") from e


def tensor_leaves(tree) -> list[torch.Tensor]:
    """The tensors of a pytree (inputs or outputs), in flattening order."""
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def dynamic_shapes_for(model: nn.Module, args: tuple, kwargs: dict):
    """``Dim.AUTO`` on the first two dims of every tensor input (batch, sequence); for a converted
    module, on the dims its own capture kept dynamic (``model.dynamic_dims()``)."""
    dims = model.dynamic_dims() if callable(getattr(model, "dynamic_dims", None)) else None
    shapes = ShapesCollection()
    small = []
    seen: set[int] = set()
    for i, leaf in enumerate(tensor_leaves((args, kwargs))):
        if leaf.dim() >= 1 and id(leaf) not in seen:
            seen.add(id(leaf))
            chosen = dims[i] if dims is not None and i < len(dims) else range(min(leaf.dim(), 2))
            shapes[leaf] = {d: Dim.AUTO for d in chosen}
            small += [leaf.shape[d] for d in chosen if leaf.shape[d] <= 1]
    if small:
        warnings.warn("an example input has a batch or sequence size of 0 or 1, which torch.export "
                      "specialises: give examples with sizes >= 2 so the result accepts other sizes",
                      GeoNormWarning, stacklevel=4)
    return shapes.dynamic_shapes(model, args, kwargs)


def _fresh(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Copies of the example tensors: export tags its input tensors (dynamic dims), and a failed
    dynamic attempt would otherwise leak into the static retry and into the caller's tensors."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs))


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool, warn: bool):
    dynamic_error = None
    if dynamic:
        a, k = _fresh(args, kwargs)
        try:
            ep = torch.export.export(model, a, k, dynamic_shapes=dynamic_shapes_for(model, a, k), strict=False)
            return ep.module(), True
        except Exception as e:  # noqa: BLE001 - retried statically below
            dynamic_error = e
    try:
        a, k = _fresh(args, kwargs)
        ep = torch.export.export(model, a, k, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with a reason and a fix
        raise CaptureError(_capture_message(model, "torch.export", e)) from e
    if dynamic_error is not None and warn:
        warnings.warn(f"dynamic capture failed ({type(dynamic_error).__name__}: {_first_line(dynamic_error)}); "
                      "captured with static shapes: the converted module accepts only the example shapes",
                      GeoNormWarning, stacklevel=3)
    return ep.module(), False


class _LeafTracer(fx.Tracer):
    """Traces through containers (``nn.TransformerEncoderLayer`` too); keeps ``torch.nn`` modules
    without children, ``nn.MultiheadAttention`` and existing geodesic updates opaque."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (GeodesicUpdate, nn.MultiheadAttention)):
            return True
        is_torch_nn = m.__module__.startswith(("torch.nn", "torch.ao.nn"))
        return is_torch_nn and next(m.children(), None) is None


def _fx_trace(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    try:
        graph = _LeafTracer().trace(model, concrete_args=_unset_defaults(model, args, kwargs))
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(_capture_message(model, "torch.fx.symbolic_trace", e)) from e
    propagate_shapes(gm, args, kwargs)
    return gm


def _unset_defaults(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Forward parameters the example does not give, fixed to their defaults (as symbolic_trace's
    ``concrete_args``), so ``mask=None`` style branches are resolved at trace time."""
    try:
        params = list(inspect_signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out = {}
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or i < len(args) or p.name in kwargs:
            continue
        if p.default is not p.empty:
            out[p.name] = p.default
    return out


def propagate_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Fill ``node.meta["val"]`` with fake tensors by running the graph on fake example inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(args)
    for p in placeholders[len(args):]:
        if p.target in kwargs:
            values.append(kwargs[p.target])
        elif p.args:
            values.append(p.args[0])
        else:
            raise CaptureError(f"no example value for input {p.target!r}: pass it in args or kwargs")
    try:
        FakeTensorProp(gm, mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*values)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"shape propagation over the traced graph failed ({type(e).__name__}: "
                           f"{_first_line(e)}); check the example inputs or use tracer='export'") from e


def _given(gm: fx.GraphModule, args, kwargs, modes, tracer: str) -> Captured:
    if _needs_shapes(gm) and (args or kwargs):
        propagate_shapes(gm, args, kwargs)
    graphs = {}
    for i, mode in enumerate(modes):
        g = gm if i == 0 else _copy_graph_module(gm)
        set_dropout_mode(g, mode == "train")
        graphs[mode] = g
    dynamic = any(isinstance(d, torch.SymInt) for n in gm.graph.nodes
                  for d in getattr(n.meta.get("val"), "shape", ()) or ())
    return Captured(graphs, tracer, dynamic)


def _needs_shapes(gm: fx.GraphModule) -> bool:
    """True when a value the analysis reads carries no shape metadata (a ``symbolic_trace`` graph).
    Nodes nobody reads are ignored: ``ExportedProgram.module()`` adds a ``_guards_fn`` call without
    metadata, and re-propagating on the example inputs would replace its symbolic (dynamic) shapes
    with the example's static ones."""
    return any("val" not in n.meta and "tensor_meta" not in n.meta for n in gm.graph.nodes
               if n.op not in ("output", "get_attr") and (n.users or n.op == "placeholder"))


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of the graph, sharing every parameter, buffer and submodule."""
    new_graph = copy.deepcopy(gm.graph)
    out = fx.GraphModule(gm, new_graph, class_name=type(gm).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    return out


def set_dropout_mode(gm: fx.GraphModule, training: bool) -> None:
    """Set the train flag of every dropout op of a captured graph (and SDPA's ``dropout_p`` to 0 in
    eval mode); used where the graph was given rather than captured here."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        pos = _DROPOUT_TRAIN_FLAG.get(node.target)
        if pos is not None and len(node.args) > pos:
            node.update_arg(pos, training)
        elif node.target is torch.nn.functional.dropout:
            node.update_kwarg("training", training)
        elif node.target is aten.scaled_dot_product_attention.default and not training:
            if len(node.args) > 4:
                node.update_arg(4, 0.0)
            elif "dropout_p" in node.kwargs:
                node.update_kwarg("dropout_p", 0.0)
    gm.recompile()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _capture_message(model: nn.Module, how: str, e: BaseException) -> str:
    cfg = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    hf_decoder = cfg is not None and getattr(cfg, "use_cache", False) and (
        "cache" in str(e).lower() or (callable(can_generate) and can_generate()))
    unknown_type = re.search(r"Found <class '([^']+)'> in (output|input)", str(e))
    if how == "torch.fx.symbolic_trace":
        fix = ("symbolic_trace cannot follow data-dependent Python control flow: use tracer='export' "
               "(the default)")
    elif hf_decoder:
        fix = ("this is a Hugging Face decoder with use_cache=True: build it with config.use_cache=False "
               "(or pass use_cache=False in kwargs) so no KV cache is returned")
    elif unknown_type:
        name = unknown_type.group(1).rsplit(".", 1)[-1]
        fix = (f"the model's {unknown_type.group(2)} holds a {name}, which torch.export cannot flatten: register it "
               f"with torch.export.register_dataclass({name}) (a dataclass) or "
               "torch.utils._pytree.register_pytree_node, then convert again")
    else:
        fix = ("check that args/kwargs are what forward() expects; for data-dependent control flow try "
               "tracer='fx', or dynamic=False")
    return f"{how} could not capture {type(model).__name__}: {type(e).__name__}: {_first_line(e)}. Fix: {fix}"
