"""Capture a model as ``fx.GraphModule`` s, one per training mode.

- ``nn.Module`` (``tracer="auto"`` or ``"export"``): ``torch.export.export(strict=False)`` of a deep
  copy, with every tensor input's first two dims marked ``Dim.AUTO`` (batch and sequence); a static
  capture is the fallback, with a :class:`GeoNormWarning`. ``tracer="fx"`` uses ``fx.Tracer`` (only
  ``torch.nn`` leaf modules stay opaque) and fake-tensor shape propagation.
  The model is captured once in eval mode and once in train mode, so every mode-dependent behaviour
  (dropout, SDPA's ``dropout_p``, stochastic depth, BatchNorm statistics) is honoured by the result.
  In-place tensor ops of an ``fx`` trace are made out-of-place (:func:`functionalize_inplace`).
- ``fx.GraphModule`` / ``ExportedProgram``: used as given (deep-copied); the other mode is derived by
  switching the dropout ops' train flags.

Which input dims the capture really kept dynamic is read back from the captured graph
(:class:`InputShape`, ``Captured.inputs``): torch.export may fix a dim it was asked to keep dynamic
(``Dim.AUTO``) without failing, e.g. for ``assert x.shape[1] == 8``, a fixed-size position table added
whole, or an example of size 1. Such dims are reported with a :class:`GeoNormWarning`, and the converted
module checks its inputs against them (:class:`InputShapeError`).

The source model is never mutated: it is deep-copied before anything runs.
"""
from __future__ import annotations

import copy
import inspect
import operator
import re
import threading
import warnings
from inspect import signature as inspect_signature
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram, ShapesCollection
from torch.fx._pytree import tree_flatten_spec
from torch.fx.experimental.symbolic_shapes import free_symbols
from torch.utils import _pytree as pytree

from .errors import CaptureError, GeoNormWarning, InvalidInputError
from .geodesic import GeodesicUpdate
from .passes.ops import ALIAS_OP_NAMES

TRACERS = ("auto", "export", "fx")
MODES = ("eval", "train")

aten = torch.ops.aten
_DROPOUT_TRAIN_FLAG = {aten.dropout.default: 2, aten.feature_dropout.default: 2, aten.alpha_dropout.default: 2,
                       aten.feature_alpha_dropout.default: 2, aten.native_dropout.default: 2}


@dataclass(frozen=True)
class InputShape:
    """One tensor input of a captured graph, as the capture left it.

    ``name``: the forward argument it comes from, with the path inside it for nested inputs
    (``"x"``, ``"pair[0]"``, ``"batch['ids']"``); ``index``: its position among the graph's placeholders;
    ``shape``: per dim, the size the capture fixed (``int``) or ``None`` where the dim is dynamic;
    ``bounds``: ``{dim: (low, high)}`` for dynamic dims torch.export bounded (``high`` ``None`` when
    unbounded; only dims with a real bound are listed); ``requested``: the batch/sequence dims the
    capture asked to keep dynamic and counts (feature dims left out, see :func:`_requested_by_id`);
    ``example``: the example's shape.
    """

    name: str
    index: int
    shape: tuple
    requested: tuple = ()
    bounds: dict = field(default_factory=dict)
    example: tuple = ()

    @property
    def dynamic_dims(self) -> list[int]:
        return [d for d, size in enumerate(self.shape) if size is None]

    @property
    def fixed(self) -> dict[int, int]:
        """The requested dims that the capture fixed anyway, with the size it fixed them to."""
        return {d: self.shape[d] for d in self.requested if d < len(self.shape) and self.shape[d] is not None}


@dataclass
class Captured:
    """``graphs[mode]`` for each requested mode; all share parameter objects (by name).

    ``dynamic``: a dynamic capture was asked for and every requested (counted) dim stayed dynamic (for
    a given graph: some input dim is dynamic). ``inputs``: the tensor inputs' shapes as captured (see
    :class:`InputShape`), ``None`` where the graph carries no trustworthy shapes (``tracer="fx"``, a
    ``symbolic_trace`` GraphModule: those graphs are not specialised to the example's shapes).
    ``training``: the mode the source was in, which the converted module starts in.
    """

    graphs: dict[str, fx.GraphModule]
    tracer: str
    dynamic: bool
    inputs: list[InputShape] | None = None
    training: bool = True
    shared: bool = False   # the graphs hold the source's own modules/tensors (``copy_weights=False``)

    def dynamic_dims(self) -> dict[str, list[int]]:
        """``{input name: dims that stayed dynamic}`` for every tensor input ({} when not tracked)."""
        return {i.name: i.dynamic_dims for i in self.inputs or ()}

    def fixed_dims(self) -> dict[str, dict[int, int]]:
        """``{input name: {dim: size}}``: dims asked to be dynamic that the capture fixed."""
        return {i.name: i.fixed for i in self.inputs or () if i.fixed}


#: torch.export and make_fx keep global state (the dispatch mode stacks): two captures at once in two threads
#: corrupt each other ("Trying to pop empty mode stack"). Every capture of the package holds this lock, so
#: concurrent ``convert`` / ``inspect`` / ``install`` calls run one after the other.
capture_lock = threading.RLock()


def capture(model, args=(), kwargs=None, *, dynamic: bool = True, tracer: str = "auto",
            modes: tuple[str, ...] = MODES, copy_weights: bool = True) -> Captured:
    """Capture ``model`` on example inputs ``args``/``kwargs``; see the module docstring.

    ``copy_weights=False``: the graphs hold the source's own parameter and buffer objects instead of copies
    (``inspect``, ``convert(copy=False)``); the source's mode is switched for each capture and restored.
    Captures are serialised (:data:`capture_lock`)."""
    with capture_lock:
        return _capture(model, args, kwargs, dynamic, tracer, modes, copy_weights)


def _capture(model, args, kwargs, dynamic: bool, tracer: str, modes: tuple[str, ...], copy_weights: bool) -> Captured:
    args, kwargs = normalize_inputs(args, kwargs)
    if tracer not in TRACERS:
        raise InvalidInputError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    if isinstance(model, ExportedProgram):  # an ExportedProgram is an inference artifact: eval
        unlifted = _functional(model).module()
        return _given(copy.deepcopy(unlifted) if copy_weights else unlifted, args, kwargs, modes, "export",
                      training=False)
    if isinstance(model, fx.GraphModule) and tracer == "auto":
        given = _deepcopy(model) if copy_weights else _copy_graph_module(model)
        cap = _given(given, args, kwargs, modes, "given", training=model.training)
        cap.shared = not copy_weights
        return cap
    if not isinstance(model, nn.Module):
        raise InvalidInputError(
            f"expected a torch.nn.Module, fx.GraphModule or ExportedProgram, got {type(model).__name__}")
    training = bool(model.training)
    warn_about_hooks(model)
    work = _deepcopy(model) if copy_weights else model
    modes_before = {m: m.training for m in work.modules()} if not copy_weights else {}
    graphs = {}
    is_dynamic = dynamic
    try:
        for mode in modes:
            work.train(mode == "train")
            try:
                if tracer == "fx":
                    graphs[mode] = _fx_trace(work, args, kwargs)
                    is_dynamic = False
                else:
                    graphs[mode], is_dynamic = _export(work, args, kwargs, dynamic, warn=(mode == modes[0]))
                    dynamic = is_dynamic
            except CaptureError as e:
                if mode != "train" or "eval" not in graphs:
                    raise
                graphs[mode] = _train_from_eval(graphs["eval"], e)
    finally:
        for m, was_training in modes_before.items():
            m.training = was_training
    for gm in graphs.values():
        _explicit_contiguous(gm)
    inputs = None
    if tracer != "fx":
        requested = _requested_by_id(work, args, kwargs, counted=True) if is_dynamic else {}
        inputs = _merge_inputs([input_shapes(gm, args, kwargs, requested) for gm in graphs.values()])
        if any(i.fixed for i in inputs):
            is_dynamic = False
            _warn_fixed(inputs)
    return Captured(graphs, "fx" if tracer == "fx" else "export", is_dynamic, inputs, training,
                    shared=not copy_weights)


def _train_from_eval(eval_graph: fx.GraphModule, error: CaptureError) -> fx.GraphModule:
    """The train-mode graph when only the eval-mode forward could be captured: the eval graph with its dropout
    switched on, and a warning saying what training then lacks."""
    warnings.warn(
        f"the model's train-mode forward could not be captured ({str(error)[:300]}), its eval-mode forward was: "
        "the converted module trains with the eval-mode graph with dropout switched on. What else the model does "
        "only in training is missing from it (LayerDrop / stochastic depth skips, batch statistics of BatchNorm, "
        "quantisation-aware steps). Convert a model whose training forward torch.export can capture (e.g. "
        "LayerDrop set to 0) if training needs those", GeoNormWarning, stacklevel=5)
    graph = _copy_graph_module(eval_graph)
    set_dropout_mode(graph, True)
    return graph


def warn_about_hooks(model: nn.Module) -> None:
    """Module hooks cannot follow the model into a captured graph: torch.export runs a forward hook or pre-hook
    once, on the example, so what it computes is frozen into the graph and its side effects never happen again;
    backward hooks are not part of the graph; hooks added to the converted module's submodules never fire (the
    graph calls none). Warn, naming each hook, so that nothing disappears silently."""
    found = []
    kinds = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
             ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))
    for path, module in model.named_modules():
        for attr, kind in kinds:
            for hook in getattr(module, attr, {}).values():
                name = getattr(hook, "__qualname__", None) or type(hook).__name__
                found.append(f"{kind} {name} on {path or type(model).__name__}")
    from torch.nn.modules import module as module_mod

    for attr, kind in (("_global_forward_pre_hooks", "global forward pre-hook"),
                       ("_global_forward_hooks", "global forward hook"),
                       ("_global_backward_hooks", "global backward hook")):
        for hook in getattr(module_mod, attr, {}).values():
            found.append(f"{kind} {getattr(hook, '__qualname__', type(hook).__name__)}")
    if found:
        warnings.warn(
            f"the model has hooks that the converted module will not run: {'; '.join(found[:8])}"
            f"{' ...' if len(found) > 8 else ''}. torch.export ran each forward hook once on the example: what it "
            "computes is frozen into the graph and its side effects (logging, caching, counters) will not happen "
            "again; backward hooks are not captured; hooks added to the converted module's submodules never fire. "
            "gf.install keeps the model object and traces its hooks with it (Dynamo)", GeoNormWarning, stacklevel=5)


def _warn_fixed(inputs: list[InputShape]) -> None:
    parts, small = [], False
    for i in inputs:
        if i.fixed:
            parts.append(f"{i.name!r} dim{'s' if len(i.fixed) > 1 else ''} "
                         + ", ".join(f"{d} (size {n})" for d, n in i.fixed.items()))
            small |= any(n <= 1 for n in i.fixed.values())
    hint = ("an example size of 0 or 1 is always fixed: use examples with sizes >= 2; otherwise " if small else "")
    warnings.warn(
        "torch.export fixed input dims that were asked to stay dynamic: " + "; ".join(parts) + ". The "
        "converted module accepts only these sizes there (report.dynamic is False; report.dynamic_dims "
        f"lists the dims that are dynamic). To accept other sizes: {hint}remove what ties the dim to a "
        "constant (a shape check such as x.shape[1] == 8, a fixed-size buffer or position table used "
        "whole), or convert with an example of the size you will use",
        GeoNormWarning, stacklevel=5)


def _is_dynamic_size(size) -> bool:
    """A symbolic size with free symbols (torch.export leaves a fixed dim as a SymInt of a constant)."""
    return isinstance(size, torch.SymInt) and bool(free_symbols(size))


def _bounds(size) -> tuple[int, int | None] | None:
    """``(low, high)`` of a dynamic size when torch.export bounded it beyond its default ``[2, inf)``."""
    try:
        vr = size.node.shape_env.bound_sympy(size.node.expr)
    except Exception:  # noqa: BLE001 - no shape environment: no bounds known
        return None
    try:
        high = int(vr.upper)
    except (TypeError, ValueError, AttributeError, OverflowError):
        high = None
    try:
        low = int(vr.lower)
    except (TypeError, ValueError, AttributeError, OverflowError):
        low = 0
    low = low if low > 2 else 0  # 0 and 1 run fine on a graph captured for [2, inf)
    return None if low == 0 and high is None else (low, high)


def input_names(gm: fx.GraphModule) -> list[str]:
    """A readable name per placeholder of ``gm``: the forward argument, plus the path inside it."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    spec = getattr(gm, "_in_spec", None)
    if spec is None or spec.num_leaves != len(placeholders):
        return [str(p.target) for p in placeholders]
    try:
        params = list(inspect.signature(gm.forward).parameters)
    except (TypeError, ValueError):
        params = []
    structure = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(structure)[0]:
        head, rest = path[:2], path[2:]
        if len(head) == 2 and getattr(head[0], "idx", None) == 0:
            i = head[1].idx
            base = params[i] if i < len(params) else f"args[{i}]"
        elif len(head) == 2 and hasattr(head[1], "key"):
            base = str(head[1].key)
        else:
            base, rest = "input", path
        names.append(base + pytree.keystr(tuple(rest)))
    return names


def input_shapes(gm: fx.GraphModule, args: tuple = (), kwargs: dict | None = None,
                 requested: dict[int, tuple] | None = None) -> list[InputShape]:
    """The tensor inputs of a torch.export graph with the shapes the capture left: a size where it is
    fixed, ``None`` where it is symbolic. ``requested`` maps ``id(example tensor)`` to the dims that
    were asked to be dynamic (matched to placeholders through ``gm._in_spec``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples: list = [None] * len(placeholders)
    spec = getattr(gm, "_in_spec", None)
    if spec is not None and (args or kwargs):
        try:
            leaves = tree_flatten_spec((list(args), dict(kwargs or {})), spec)
            if len(leaves) == len(placeholders):
                examples = list(leaves)
        except Exception:  # noqa: BLE001 - names and shapes still come from the graph
            pass
    out = []
    for index, (node, name, example) in enumerate(zip(placeholders, input_names(gm), examples)):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        shape, bounds = [], {}
        for d, size in enumerate(val.shape):
            if _is_dynamic_size(size):
                shape.append(None)
                b = _bounds(size)
                if b is not None:
                    bounds[d] = b
            else:
                shape.append(int(size))
        asked = tuple((requested or {}).get(id(example), ())) if example is not None else ()
        ex = tuple(example.shape) if isinstance(example, torch.Tensor) else ()
        out.append(InputShape(name, index, tuple(shape), asked, bounds, ex))
    return out


def _merge_inputs(per_mode: list[list[InputShape]]) -> list[InputShape]:
    """One view of the inputs over all modes: a dim fixed in any mode's graph is fixed."""
    first = per_mode[0]
    if any(len(other) != len(first) for other in per_mode[1:]):
        return first
    merged = []
    for group in zip(*per_mode):
        base = group[0]
        shape = tuple(next((g.shape[d] for g in group if g.shape[d] is not None), None)
                      for d in range(len(base.shape)))
        bounds = {d: b for g in group for d, b in g.bounds.items() if shape[d] is None}
        merged.append(InputShape(base.name, base.index, shape, base.requested, bounds, base.example))
    return merged


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


def _requested_by_id(model: nn.Module, args: tuple, kwargs: dict,
                     counted: bool = False) -> dict[int, tuple[int, ...]]:
    """``id(tensor input) -> dims to make dynamic``: the batch and sequence dims (dims 0 and 1; only
    dim 0 of an input with 4 or more dims, whose dim 1 is channels or heads: images, 4-d masks); for a
    converted module, the dims its own capture kept dynamic (``model.dynamic_dims()``).

    ``counted=True``: only the dims whose fixing makes the capture not dynamic (and is warned about):
    the last dim of a floating-point input is a feature dim (a ``(batch, features)`` input, a bias
    vector), asked for but expected to be fixed by the weights it meets, so it is left out."""
    dims = model.dynamic_dims() if callable(getattr(model, "dynamic_dims", None)) else None
    out: dict[int, tuple[int, ...]] = {}
    for i, leaf in enumerate(tensor_leaves((args, kwargs))):
        if leaf.dim() >= 1 and id(leaf) not in out:
            if dims is not None and i < len(dims):
                out[id(leaf)] = tuple(dims[i])
            else:
                chosen = (0,) if leaf.dim() >= 4 else tuple(range(min(leaf.dim(), 2)))
                if counted and (leaf.is_floating_point() or leaf.is_complex()):
                    chosen = tuple(d for d in chosen if d != leaf.dim() - 1)
                out[id(leaf)] = chosen
    return out


def dynamic_shapes_for(model: nn.Module, args: tuple, kwargs: dict):
    """``Dim.AUTO`` on the batch and sequence dims of every tensor input (dims 0 and 1; dim 0 alone for
    inputs of 4 or more dims); for a converted module, on the dims its own capture kept dynamic
    (``model.dynamic_dims()``)."""
    shapes = ShapesCollection()
    small = []
    leaves = {id(leaf): leaf for leaf in tensor_leaves((args, kwargs))}
    for leaf_id, chosen in _requested_by_id(model, args, kwargs).items():
        leaf = leaves[leaf_id]
        shapes[leaf] = {d: Dim.AUTO for d in chosen}
        small += [leaf.shape[d] for d in chosen if leaf.shape[d] <= 1]
    if small:
        warnings.warn("an example input has a batch or sequence size of 0 or 1, which torch.export "
                      "specialises: give examples with sizes >= 2 so the result accepts other sizes",
                      GeoNormWarning, stacklevel=5)
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
            return _functional(ep).module(), True
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
                      GeoNormWarning, stacklevel=5)
    return _functional(ep).module(), False


def _writes_read_later(graph: fx.Graph) -> bool:
    """An in-place op writes into a value (or a view of a value) that a later node reads as the old node:
    a dataflow the graph's edges do not show. (T5's ``scores += bias`` is read later through the op's own
    result: its edges are right.)"""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) \
                or not node.target._schema.is_mutable or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        value, aliases = node.args[0], []
        while isinstance(value, fx.Node) and len(aliases) < 16:
            aliases.append(value)
            target = getattr(value.target, "overloadpacket", None)
            if value.op != "call_function" or target is None or target.__name__ not in ALIAS_OP_NAMES:
                break
            value = value.args[0] if value.args else None
        if any(order[u] > order[node] for a in aliases for u in a.users if u is not node):
            return True
    return False


def _functional(ep: ExportedProgram) -> ExportedProgram:
    """torch.export's graph keeps in-place writes into intermediate values (``x[:] = x + f(N(x))`` becomes
    ``copy_(slice(x), ...)``, and later nodes read the mutated ``x``): dataflow over such a graph is not the
    program's. Functionalize it then (no decomposition), keeping the module stacks; graphs without a write
    are returned as they are."""
    if not _writes_read_later(ep.graph):
        return ep
    try:
        return ep.run_decompositions({})
    except Exception:  # noqa: BLE001 - the unfunctionalized capture still runs correctly
        return ep


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
    _refuse_lost_augmented_assignment(gm)
    _functionalize_traced(gm, args, kwargs)
    return gm


def _refuse_lost_augmented_assignment(gm: fx.GraphModule) -> None:
    """symbolic_trace records ``y += t`` on a tensor as ``y = y + t``: eager Python mutates ``y`` (and every
    alias of it, e.g. ``y = x; y += t; return x``) in place, the trace does not. A tensor sum whose result
    nothing reads is the trace of such a statement; the traced graph would compute another function than the
    model, so capture refuses it."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (operator.add, operator.sub, operator.mul) \
                and not node.users and all(isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)
                                           for a in node.args[:2]):
            raise CaptureError(
                f"torch.fx.symbolic_trace lost an in-place update: the tensor result of {node.name} "
                f"({node.args[0].name} {dict([(operator.add, '+'), (operator.sub, '-'), (operator.mul, '*')])[node.target]}"
                f"= ...) is never read, the trace of an augmented assignment through an alias "
                "(``y = x; y += t; return x``), which eager Python applies in place. Fix: use tracer='export' "
                "(the default), which follows it")


# in-place tensor ops functionalised in symbolic_trace graphs: method name -> out-of-place name
_INPLACE_METHODS = {name: name[:-1] for name in (
    "add_", "sub_", "mul_", "div_", "true_divide_", "floor_divide_", "addcmul_", "addcdiv_", "lerp_",
    "pow_", "neg_", "abs_", "exp_", "log_", "sqrt_", "rsqrt_", "reciprocal_", "square_", "clamp_",
    "clamp_min_", "clamp_max_", "clip_", "masked_fill_", "relu_", "sigmoid_", "tanh_", "addmm_", "baddbmm_",
    "fmod_", "remainder_", "nan_to_num_", "tril_", "triu_") if hasattr(torch.Tensor, name[:-1])}
# a plain binary in-place op becomes the operator symbolic_trace records for ``a + b``
_INPLACE_AS_OPERATOR = {"add_": operator.add, "sub_": operator.sub, "mul_": operator.mul,
                        "div_": operator.truediv}
_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                      operator.imod: operator.mod, operator.ipow: operator.pow,
                      operator.imatmul: operator.matmul}
# ops whose result may share storage with their first argument
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
                 "transpose", "permute", "t", "expand", "expand_as", "narrow", "select", "slice", "split",
                 "chunk", "unbind", "tensor_split", "split_with_sizes", "diagonal", "movedim", "moveaxis",
                 "swapaxes", "swapdims", "as_strided", "unfold", "detach", "contiguous", "to", "type",
                 "type_as", "float", "half", "double", "bfloat16", "int", "long", "bool", "cpu", "cuda",
                 "view_as_real", "view_as_complex", "real", "imag", "align_to", "refine_names", "rename",
                 "requires_grad_", "__getitem__"}
_VIEW_FUNCTIONS = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.transpose,
                   torch.permute, torch.t, torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind,
                   torch.tensor_split, torch.diagonal, torch.movedim, torch.moveaxis, torch.swapaxes,
                   torch.swapdims, torch.as_strided, torch.detach, torch.view_as_real, torch.view_as_complex,
                   torch.real, torch.imag, torch.unflatten, operator.getitem}
_VIEW_ATTRS = {"T", "mT", "H", "mH", "data", "real", "imag"}
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                  nn.AlphaDropout, nn.FeatureAlphaDropout)


def _functionalize_traced(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """:func:`functionalize_inplace`, then fresh shape metadata (and a cast back where the in-place
    op kept a dtype its out-of-place form promotes)."""
    pending = functionalize_inplace(gm)
    if not pending:
        return
    while True:  # one cast at a time, in program order: a cast changes the dtypes after it
        propagate_shapes(gm, args, kwargs)
        node = next((n for n in gm.graph.nodes if n in pending and isinstance(n.meta.get("val"), torch.Tensor)
                     and n.meta["val"].dtype != pending[n]), None)
        if node is None:
            return
        with gm.graph.inserting_after(node):
            to = gm.graph.call_method("to", (node, pending.pop(node)))
        node.replace_all_uses_with(to, delete_user_cb=lambda user: user is not to)
        gm.recompile()


def functionalize_inplace(gm: fx.GraphModule) -> dict[fx.Node, torch.dtype]:
    """Turn the in-place tensor ops of a ``symbolic_trace`` graph into out-of-place ones.

    ``x.add_(y)`` (``sub_``, ``mul_``, ``div_``, ``addcmul_``, ..., ``torch.relu_(x)``,
    ``operator.iadd`` on tensors, ``F.relu(x, inplace=True)``) becomes its out-of-place form, and every
    later node (in program order) that reads ``x`` reads the op's result instead. Without this, a
    rewrite of the op's node would be lost: later nodes still read ``x``, and only the in-place call
    made them see the new value. A mutated model input is fine: the converted module returns the same
    values but no longer changes the tensor it is given. Raises :class:`CaptureError` where the
    mutation cannot be made out-of-place safely: the mutated tensor is (or may be) a view or alias of
    another value (a slice, ``transpose``, ``getitem``, ...; its base would have changed too), a view
    of it taken earlier is read later, or it is a parameter or buffer (module state).
    Needs ``node.meta["val"]`` (:func:`propagate_shapes`). Returns ``{node: dtype of its in-place
    result}`` for every node changed.
    """
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    changed: dict[fx.Node, torch.dtype] = {}
    for node in nodes:
        spelled = _inplace_spelling(node)
        if spelled is None:
            continue
        target = node.args[0] if node.args else None
        val = target.meta.get("val") if isinstance(target, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            continue  # in-place arithmetic on Python numbers or sizes: no mutation
        _check_functionalizable(gm, node, target, spelled, order)
        changed[node] = node.meta["val"].dtype if isinstance(node.meta.get("val"), torch.Tensor) else val.dtype
        _make_out_of_place(node)
        for user in list(target.users):
            if user is not node and order.get(user, -1) > order[node]:
                user.replace_input_with(target, node)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _inplace_spelling(node: fx.Node) -> str | None:
    """How ``node`` mutates its first argument (``"x.add_(...)"``), or ``None``."""
    if node.op == "call_method" and node.target in _INPLACE_METHODS:
        return f".{node.target}()"
    if node.op != "call_function":
        return None
    if node.target in _INPLACE_OPERATORS:
        return f"operator.{node.target.__name__}"
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.startswith("_") and getattr(torch, name, None) is node.target \
            and name in _INPLACE_METHODS:
        return f"torch.{name}()"
    if _inplace_flag(node) is not None:
        return f"{getattr(node.target, '__module__', '')}.{name}(inplace=True)"
    return None


def _inplace_flag(node: fx.Node):
    """``("kwarg", "inplace")`` or ``("arg", i)`` where a functional op is called with ``inplace=True``."""
    if getattr(node.target, "__module__", "") != "torch.nn.functional":
        return None
    if node.kwargs.get("inplace") is True:
        return ("kwarg", "inplace")
    try:
        params = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):
        return None
    if "inplace" in params:
        i = params.index("inplace")
        if i < len(node.args) and node.args[i] is True:
            return ("arg", i)
    return None


def _make_out_of_place(node: fx.Node) -> None:
    if node.op == "call_method":
        op = _INPLACE_AS_OPERATOR.get(node.target)
        if op is not None and len(node.args) == 2 and not node.kwargs:
            node.op, node.target = "call_function", op
        else:
            node.target = _INPLACE_METHODS[node.target]
    elif node.target in _INPLACE_OPERATORS:
        node.target = _INPLACE_OPERATORS[node.target]
    elif _inplace_flag(node) is not None:
        where, key = _inplace_flag(node)
        if where == "kwarg":
            node.update_kwarg(key, False)
        else:
            node.update_arg(key, False)
    else:
        node.target = getattr(torch, node.target.__name__[:-1])


def _alias_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """How ``node``'s value may share storage with another value (``None`` when it is its own)."""
    if node.op == "call_method" and (node.target in _VIEW_METHODS or (
            node.target.endswith("_") and not node.target.startswith("_"))):
        return f".{node.target}()"
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1 and node.args[1] in _VIEW_ATTRS:
            return f".{node.args[1]}"
        if node.target in _VIEW_FUNCTIONS:
            name = getattr(node.target, "__name__", str(node.target))
            if node.target is operator.getitem:
                return "indexing (getitem)"
            return f"{name}()"
    if node.op == "call_module":
        try:
            mod = gm.get_submodule(node.target)
        except AttributeError:
            return None
        if isinstance(mod, _ALIAS_MODULES):
            return f"{type(mod).__name__} module {node.target!r} (returns its input as is)"
    return None


def _check_functionalizable(gm: fx.GraphModule, node: fx.Node, target: fx.Node, spelled: str,
                            order: dict) -> None:
    def fail(why: str):
        raise CaptureError(
            f"tracer='fx': the in-place op {spelled} at node {node.name!r} mutates {target.name!r}, {why}; "
            "geonorm-fx makes in-place ops out-of-place so rewrites are not lost, and that is not safe "
            "here. Fix: use tracer='export' (the default), which captures mutations exactly, or write "
            "the op out-of-place in the model")

    if target.op == "get_attr":
        fail(f"the module's parameter or buffer {target.target!r} (module state)")
    how = _alias_of(gm, target)
    if how is not None:
        if target.op == "call_function" and target.target is operator.getitem:
            container = target.args[0]
            cval = container.meta.get("val") if isinstance(container, fx.Node) else None
            if isinstance(container, fx.Node) and not isinstance(cval, torch.Tensor) \
                    and _alias_of(gm, container) is None:
                # an element of a tuple/list/dict: its own tensor, unless that element is read again
                if any(u is not target and order.get(u, -1) > order[node] for u in container.users):
                    fail(f"an element of {container.name!r}, which is read again after the mutation")
                how = None
        if how is not None:
            fail(f"which may be a view or alias of another value (made by {how} at node {target.name!r})")
    # a view of the mutated tensor made before the op and read after it would see the mutation
    stack = [u for u in target.users if order.get(u, len(order)) < order[node] and _alias_of(gm, u)]
    seen: set[fx.Node] = set()
    while stack:
        view = stack.pop()
        if view in seen:
            continue
        seen.add(view)
        for user in view.users:
            if order.get(user, len(order)) > order[node]:
                fail(f"and a view of it made earlier ({view.name!r}) is read after the mutation")
            if _alias_of(gm, user):
                stack.append(user)


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


def _given(gm: fx.GraphModule, args, kwargs, modes, tracer: str, training: bool = True) -> Captured:
    traced = _needs_shapes(gm)  # a symbolic_trace graph: its shapes come from the examples only
    if traced and (args or kwargs):
        propagate_shapes(gm, args, kwargs)
        _functionalize_traced(gm, args, kwargs)
    graphs = {}
    for i, mode in enumerate(modes):
        g = gm if i == 0 else _copy_graph_module(gm)
        set_dropout_mode(g, mode == "train")
        graphs[mode] = g
    inputs = None if traced or not _has_export_shapes(gm) else input_shapes(gm, args, kwargs)
    if inputs is not None:
        dynamic = any(i.dynamic_dims for i in inputs)
    else:
        dynamic = any(_is_dynamic_size(d) for n in gm.graph.nodes
                      for d in getattr(n.meta.get("val"), "shape", ()) or ())
    return Captured(graphs, tracer, dynamic, inputs, bool(training))


def _has_export_shapes(gm: fx.GraphModule) -> bool:
    """The placeholders carry fake tensors of a shape environment (torch.export, make_fx with
    symbolic shapes): their sizes say what the graph is specialised to."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return any(getattr(getattr(v, "fake_mode", None), "shape_env", None) is not None for v in vals)


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
        fix = ("symbolic_trace cannot follow Python control flow on tensors (if/for on values or sizes): "
               "use tracer='export' (the default), which follows control flow on sizes. Control flow on tensor "
               "values stops both: rewrite it with torch.cond / torch.where, or use gf.install, whose capture "
               "(torch.compile) runs such branches in Python between graphs (fullgraph=False)")
    elif hf_decoder:
        fix = ("this is a Hugging Face decoder with use_cache=True: build it with config.use_cache=False "
               "(or pass use_cache=False in kwargs) so no KV cache is returned")
    elif unknown_type:
        name = unknown_type.group(1).rsplit(".", 1)[-1]
        fix = (f"the model's {unknown_type.group(2)} holds a {name}, which torch.export cannot flatten: register it "
               f"with torch.export.register_dataclass({name}) (a dataclass) or "
               "torch.utils._pytree.register_pytree_node, then convert again")
    else:
        fix = ("check that args/kwargs are what forward() expects; a shape that must stay fixed: dynamic=False; "
               "control flow on tensor values: rewrite it with torch.cond / torch.where, or use gf.install "
               "(torch.compile runs such branches between graphs with fullgraph=False); tracer='fx' only helps "
               "when the branch reads no tensor at all")
    return f"{how} could not capture {type(model).__name__}: {type(e).__name__}: {_first_line(e)}. Fix: {fix}"
