"""When two captures of one model compute the same program (the eval- and train-mode graphs of a model
whose training mode changes no op): node correspondence, value equality, and reuse of one graph's analysis
for the other."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import torch
from torch import fx, nn

from .ops import is_dropout, same_size


def corresponding_nodes(a: fx.Graph, b: fx.Graph, same_target: Callable[[fx.Node, fx.Node], bool],
                        same_call: Callable[[fx.Node, fx.Node, dict], bool] | None = None,
                        ) -> dict[fx.Node, fx.Node] | None:
    """The map from ``a``'s nodes to ``b``'s when both list the same nodes in the same order: per position the
    same op and name, arguments equal with nodes compared by position (or a pair of calls that ``same_call``
    accepts), and equal targets (or targets that ``same_target`` accepts). ``None`` when they differ anywhere."""
    if len(a.nodes) != len(b.nodes):
        return None
    position: dict[fx.Node, int] = {}
    mapping: dict[fx.Node, fx.Node] = {}
    for i, (x, y) in enumerate(zip(a.nodes, b.nodes)):
        if x.op != y.op or x.name != y.name:
            return None
        if not same_args((x.args, x.kwargs), (y.args, y.kwargs), position) and not (
                same_call is not None and same_call(x, y, position)):
            return None
        if x.target is not y.target and x.target != y.target and not same_target(x, y):
            return None
        position[x] = position[y] = i
        mapping[x] = y
    return mapping


def analysis_twin(a: fx.GraphModule, b: fx.GraphModule) -> dict[fx.Node, fx.Node] | None:
    """The node map ``a -> b`` when the site analysis of ``b`` would find what it found in ``a``: the same
    program (:func:`corresponding_nodes`; modules called by the same name of one class with equal public
    attributes, the training flag aside; dropout calls of the same input, whatever their mode), and per node the same metadata the analysis reads (tensor
    shapes, dtypes and devices; the module stack). Else ``None``."""
    modules_a, modules_b = dict(a.named_modules()), dict(b.named_modules())

    def same_module(x: fx.Node, y: fx.Node) -> bool:
        if x.op != "call_module":
            return False
        ma, mb = modules_a.get(x.target), modules_b.get(y.target)
        return ma is mb or (type(ma) is type(mb) and same_state(ma, mb, ignore=("training",)))

    nodes = corresponding_nodes(a.graph, b.graph, same_module, _same_dropout)
    if nodes is None:
        return None
    for x, y in nodes.items():
        if (x.op == "call_module" and not same_module(x, y)) or not _same_meta(x.meta, y.meta):
            return None
    return nodes


def _same_dropout(x: fx.Node, y: fx.Node, position: dict) -> bool:
    # the analysis reads a dropout as its input, whatever its rate and mode flag (which differ by mode)
    return x.target is y.target and is_dropout(x) and bool(x.args) and same_args(x.args[0], y.args[0], position)


def remap_analysis(analysis, nodes: dict[fx.Node, fx.Node]):
    """``analysis`` (a :class:`~geonorm_fx.passes.sites.Analysis` of graph ``a``) with every node replaced by
    its twin in ``nodes``; objects shared inside it (a norm named by several sites) stay shared."""
    return _remap(analysis, nodes, {})


def _remap(value, nodes: dict, memo: dict):
    if isinstance(value, fx.Node):
        return nodes[value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if id(value) not in memo:
            memo[id(value)] = dataclasses.replace(
                value, **{f.name: _remap(getattr(value, f.name), nodes, memo) for f in dataclasses.fields(value)})
        return memo[id(value)]
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_remap(v, nodes, memo) for v in value)
    if isinstance(value, dict):
        return {_remap(k, nodes, memo): _remap(v, nodes, memo) for k, v in value.items()}
    return value


_ANALYZED_META = ("val", "tensor_meta", "nn_module_stack")


def _same_meta(a: dict, b: dict) -> bool:
    return all(_same_meta_value(a.get(key), b.get(key)) for key in _ANALYZED_META)


def _same_meta_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.device == b.device and a.dim() == b.dim()
                and all(same_size(p, q) for p, q in zip(a.shape, b.shape)))
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return same_size(a, b)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_meta_value(p, q) for p, q in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same_meta_value(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # values without a plain equality: not provably the same
        return False


def same_args(x, y, position: dict) -> bool:
    """Equal argument structures; nodes are equal when ``position`` gives them the same index."""
    if isinstance(x, fx.Node) or isinstance(y, fx.Node):
        return isinstance(x, fx.Node) and isinstance(y, fx.Node) and position.get(x, -1) == position.get(y, -2)
    if isinstance(x, (tuple, list)) or isinstance(y, (tuple, list)):
        return type(x) is type(y) and len(x) == len(y) and all(same_args(p, q, position) for p, q in zip(x, y))
    if isinstance(x, dict) or isinstance(y, dict):
        return type(x) is type(y) and x.keys() == y.keys() and all(same_args(x[k], y[k], position) for k in x)
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return x is y
    return type(x) is type(y) and x == y


def same_value(a, b, depth: int = 0) -> bool:
    """Equal plain values, functions with equal code whose closures hold equal values, or objects of
    one class whose public attributes are equal in this sense."""
    if a is b:
        return True
    if depth > 4:
        return False
    if callable(a) and callable(b) and hasattr(inspect.unwrap(a), "__code__"):
        a, b = inspect.unwrap(a), inspect.unwrap(b)
        code = getattr(a, "__code__", None)
        if code != getattr(b, "__code__", None):
            return False
        cells_a, cells_b = a.__closure__ or (), b.__closure__ or ()
        return len(cells_a) == len(cells_b) and all(
            same_value(x.cell_contents, y.cell_contents, depth + 1) for x, y in zip(cells_a, cells_b))
    if not _same_class(type(a), type(b)) or isinstance(a, (torch.Tensor, nn.Module)):
        return False
    if type(a) is type(b) and a == b:
        return True
    return same_state(a, b, depth + 1)


def same_state(a, b, depth: int = 0, ignore: tuple = ()) -> bool:
    """The public attributes of ``a`` and ``b`` (except ``ignore``) are the same values (:func:`same_value`)."""
    state_a, state_b = getattr(a, "__dict__", None), getattr(b, "__dict__", None)
    if state_a is None or state_b is None:
        return False
    keys = {k for k in state_a if not k.startswith("_") and k not in ignore}
    return keys == {k for k in state_b if not k.startswith("_") and k not in ignore} and all(
        same_value(state_a[k], state_b[k], depth) for k in keys)


def _same_class(a: type, b: type) -> bool:
    # a class defined inside a function is a new class object per call (torch's config patches)
    return a is b or (a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__ and "<locals>" in a.__qualname__)
