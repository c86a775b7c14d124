"""The op vocabulary: the one place that knows how aten, torch-level and call_module graphs spell
"add", "layer_norm", "rms_norm", a value-preserving cast or view, dropout, and a shape-only read.

:class:`GraphView` wraps an ``fx.GraphModule`` and answers semantic questions about its nodes, so
the passes never test op spellings themselves.
"""
from __future__ import annotations

import builtins
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_ADD_ATEN = {aten.add.Tensor, aten.add_.Tensor}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}

_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}
_MUL_ATEN = {aten.mul.Tensor, aten.mul_.Tensor, aten.mul.Scalar}
_MUL_METHODS = {"mul", "mul_", "__mul__"}

# Ops whose output equals their first input in value (up to dtype, layout or dropout noise).
_VALUE_PRESERVING_ATEN = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten._to_copy.default,
    aten.type_as.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.lift_fresh_copy.default, aten.dropout.default, aten.feature_dropout.default,
    aten.alpha_dropout.default, aten.feature_alpha_dropout.default,
}
_VALUE_PRESERVING_FUNCS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.clone,
}
_VALUE_PRESERVING_METHODS = {"to", "type", "float", "half", "bfloat16", "double", "type_as", "clone",
                             "contiguous"}
_VALUE_PRESERVING_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                             nn.FeatureAlphaDropout, nn.Identity)
_TUPLE_DROPOUT_ATEN = {aten.native_dropout.default}

_CAST_ATEN = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten._to_copy.default,
              aten.type_as.default}
_CAST_METHODS = {"to", "type", "float", "half", "bfloat16", "double", "type_as"}

_VIEW_ATEN = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
              aten.unflatten.int}
_VIEW_FUNCS = {torch.reshape, torch.flatten}
_VIEW_METHODS = {"view", "reshape", "flatten", "unflatten"}
_PERMUTE = ({aten.permute.default}, {torch.permute}, {"permute"})
_TRANSPOSE = ({aten.transpose.int}, {torch.transpose}, {"transpose"})

# Ops that read only the shape, dtype or device of their tensor inputs, not their values.
_SHAPE_ONLY_ATEN = {
    aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
    aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.rand_like.default, aten.randn_like.default, aten.new_zeros.default, aten.new_ones.default,
    aten.new_empty.default, aten.new_full.default, aten._assert_tensor_metadata.default,
}
# Ops that read only the shape/dtype of some arguments (``bias.expand_as(x)`` reads x's shape): positions.
_META_ARGS_ATEN = {aten.expand_as.default: (1,), aten.view_as.default: (1,), aten.reshape_as.default: (1,),
                   aten.type_as.default: (1,)}
_META_ARGS_METHODS = {"expand_as": (1,), "view_as": (1,), "reshape_as": (1,), "type_as": (1,)}
_SHAPE_ONLY_FUNCS = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like,
                     torch.rand_like, torch.randn_like, builtins.getattr, builtins.len}
_SHAPE_ONLY_METHODS = {"size", "dim", "numel", "new_zeros", "new_ones", "new_empty", "new_full",
                       "get_device"}

_RSQRT = ({aten.rsqrt.default}, {torch.rsqrt}, {"rsqrt"})
_SQRT = ({aten.sqrt.default}, {torch.sqrt}, {"sqrt"})
_MEAN = ({aten.mean.dim}, {torch.mean}, {"mean"})
_SUM = ({aten.sum.dim_IntList}, {torch.sum}, {"sum"})
_POW = ({aten.pow.Tensor_Scalar}, {torch.pow, operator.pow}, {"pow", "__pow__"})
_SQUARE = ({aten.square.default}, {torch.square}, {"square"})
_DIV = ({aten.div.Tensor}, {operator.truediv, torch.div}, {"div", "__truediv__"})
_SUB = ({aten.sub.Tensor}, {operator.sub, torch.sub}, {"sub", "__sub__"})
_VAR = ({aten.var.correction, aten.var.dim}, {torch.var}, {"var"})

# Reductions a norm divides by, by the name of their meaning; the positional argument names of the
# torch-level and Tensor-method spellings (aten overloads are bound through their schema).
_REDUCTION_ATEN = {
    aten.mean.dim: "mean", aten.sum.dim_IntList: "sum", aten.amax.default: "amax",
    aten.var.dim: "var", aten.var.correction: "var", aten.std.dim: "std", aten.std.correction: "std",
    aten.linalg_vector_norm.default: "vector_norm", aten.norm.ScalarOpt_dim: "norm",
}
_REDUCTION_FUNCS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.var: "var", torch.std: "std",
                    torch.norm: "norm", torch.linalg.vector_norm: "vector_norm", torch.linalg.norm: "linalg_norm"}
_REDUCTION_METHODS = {"mean": "mean", "sum": "sum", "amax": "amax", "var": "var", "std": "std", "norm": "norm"}
# Ops returning (statistic, ...) tuples: (aten overloads, callables, methods) -> the meaning of each item.
_TUPLE_REDUCTION_ATEN = {aten.var_mean.dim: ("var", "mean"), aten.var_mean.correction: ("var", "mean"),
                         aten.std_mean.dim: ("std", "mean"), aten.std_mean.correction: ("std", "mean"),
                         aten.max.dim: ("amax", None)}
_TUPLE_REDUCTION_FUNCS = {torch.var_mean: ("var", "mean"), torch.std_mean: ("std", "mean"), torch.max: ("amax", None)}
_TUPLE_REDUCTION_METHODS = {"max": ("amax", None)}
_ARG_NAMES = {"mean": ("input", "dim", "keepdim"), "sum": ("input", "dim", "keepdim"),
              "amax": ("input", "dim", "keepdim"), "var": ("input", "dim", "unbiased", "keepdim"),
              "std": ("input", "dim", "unbiased", "keepdim"), "norm": ("input", "p", "dim", "keepdim"),
              "vector_norm": ("input", "ord", "dim", "keepdim"), "linalg_norm": ("input", "ord", "dim", "keepdim"),
              "normalize": ("input", "p", "dim", "eps")}
_ABS = ({aten.abs.default}, {torch.abs}, {"abs"})
_RECIPROCAL = ({aten.reciprocal.default}, {torch.reciprocal}, {"reciprocal"})
_CLAMP = ({aten.clamp.default, aten.clamp_min.default}, {torch.clamp, torch.clamp_min, torch.clip},
          {"clamp", "clamp_min", "clip"})
_UNSQUEEZE = ({aten.unsqueeze.default}, {torch.unsqueeze}, {"unsqueeze"})
_EXPAND = ({aten.expand.default, aten.expand_as.default} | _UNSQUEEZE[0], _UNSQUEEZE[1],
           {"expand", "expand_as"} | _UNSQUEEZE[2])
_NORMALIZE_FUNCS = {F.normalize}


@dataclass(frozen=True)
class Reduction:
    """A reduction over ``dims`` (non-negative when the input's rank is known) of ``input``.

    ``op`` is ``"mean"``, ``"sum"``, ``"amax"`` (also ``max(t, dim)[0]``), ``"var"``, ``"std"`` (with their
    ``correction``: 0 biased, 1 unbiased) or ``"vector_norm"`` (with its ``ord``; ``norm(p="fro")`` over
    dims is ord 2). ``nodes``: the reduction node, and for a tuple op (``var_mean``) the op and the item."""

    op: str
    input: fx.Node
    dims: tuple
    keepdim: bool
    nodes: frozenset
    correction: float = 0.0
    ord: float = 2.0


# Normalizations that are never residual-stream norms; found only to report them as skipped.
_OTHER_NORM_ATEN = {
    aten.batch_norm.default: "batch_norm", aten.native_batch_norm.default: "batch_norm",
    aten._native_batch_norm_legit_no_training.default: "batch_norm",
    aten._native_batch_norm_legit_functional.default: "batch_norm", aten._native_batch_norm_legit.default: "batch_norm",
    aten.group_norm.default: "group_norm", aten.native_group_norm.default: "group_norm",
    aten.instance_norm.default: "instance_norm",
}
_OTHER_NORM_FUNCS = {F.batch_norm: "batch_norm", F.group_norm: "group_norm", F.instance_norm: "instance_norm"}
_OTHER_NORM_MODULES = ((nn.modules.batchnorm._BatchNorm, "batch_norm"), (nn.GroupNorm, "group_norm"),
                       (nn.modules.instancenorm._InstanceNorm, "instance_norm"))

_LAYER_NORM_ATEN = {aten.layer_norm.default}
_LAYER_NORM_TUPLE_ATEN = {aten.native_layer_norm.default}
_LAYER_NORM_FUNCS = {F.layer_norm, torch.layer_norm}
_RMS_NORM_ATEN = {aten.rms_norm.default}
_RMS_NORM_TUPLE_ATEN = {getattr(aten, "_fused_rms_norm").default} if hasattr(aten, "_fused_rms_norm") else set()
_RMS_NORM_FUNCS = {F.rms_norm, torch.rms_norm} if hasattr(F, "rms_norm") else set()
_RMS_NORM_MODULES = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


# Ops that give their whole input in another shape or as a copy (the value carried along unchanged), by
# the name of the aten op, torch function or Tensor method.
_RESHAPE_NAMES = {"view", "_unsafe_view", "reshape", "flatten", "unflatten", "contiguous", "clone"}
# aten ops whose result may alias (a part of) their first input: an in-place write into it writes there too.
ALIAS_OP_NAMES = frozenset({"slice", "select", "view", "_unsafe_view", "reshape", "as_strided", "permute",
                            "transpose", "t", "expand", "alias", "unsqueeze", "squeeze", "narrow", "diagonal",
                            "unfold", "split", "chunk", "unbind", "flatten", "unflatten", "view_as", "detach"})


def is_reshape(node: fx.Node) -> bool:
    """A view or copy of its whole first input in any shape (``view``, ``reshape``, ``flatten``, ...)."""
    return node.op in ("call_function", "call_method") and \
        str(getattr(node.target, "__name__", node.target)).split(".")[0] in _RESHAPE_NAMES


def qualified_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class GraphView:
    """Semantic queries over one ``fx.GraphModule``: node order, data edges, op meaning."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(gm.named_modules())
        self._root_cache: dict[fx.Node, fx.Node] = {}
        self._users_cache: dict[fx.Node, list[fx.Node]] = {}
        # both caches hold while the graph is unchanged: the analysis never edits it, and the rewrite's view
        # only asks is_shape_only
        self._inputs_cache: dict[fx.Node, list[fx.Node]] = {}

    # ----- generic node facts -------------------------------------------------------------------
    def matches(self, node: fx.Node, spelling: tuple[set, set, set]) -> bool:
        """``spelling`` is (aten overloads, torch-level callables, Tensor method names)."""
        aten_ops, funcs, methods = spelling
        if node.op == "call_function":
            return node.target in aten_ops or node.target in funcs
        if node.op == "call_method":
            return node.target in methods
        return False

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    @staticmethod
    def value(node) -> object:
        return node.meta.get("val", node.meta.get("tensor_meta")) if isinstance(node, fx.Node) else node

    def is_tensor(self, node) -> bool:
        """True when the node produces a tensor (unknown nodes count as tensors, get_attr included)."""
        if not isinstance(node, fx.Node):
            return False
        val = self.value(node)
        if val is None:
            return node.op in ("placeholder", "get_attr", "call_function", "call_method", "call_module")
        return isinstance(val, torch.Tensor) or type(val).__name__ == "TensorMetadata"

    def shape(self, node) -> tuple | None:
        val = self.value(node)
        shape = getattr(val, "shape", None)
        return tuple(shape) if shape is not None else None

    def dtype(self, node) -> torch.dtype | None:
        return getattr(self.value(node), "dtype", None)

    def same_shape(self, *nodes) -> bool:
        """True when all nodes have the same (non-scalar) shape, or some shape is unknown."""
        shapes = [self.shape(n) for n in nodes]
        if any(s is None for s in shapes):
            return True
        first = shapes[0]
        return bool(first) and all(len(s) == len(first) and all(_same_size(a, b) for a, b in zip(s, first))
                                   for s in shapes[1:])

    def last_dim(self, node):
        shape = self.shape(node)
        return shape[-1] if shape else None

    def ndim(self, node) -> int | None:
        shape = self.shape(node)
        return len(shape) if shape is not None else None

    # ----- data edges ---------------------------------------------------------------------------
    def is_shape_only(self, node: fx.Node) -> bool:
        """The node reads only metadata (shape, dtype, device) of its tensor inputs."""
        if node.op == "call_function":
            return node.target in _SHAPE_ONLY_ATEN or node.target in _SHAPE_ONLY_FUNCS
        if node.op == "call_method":
            return node.target in _SHAPE_ONLY_METHODS
        return False

    def carries_data(self, node) -> bool:
        """True unless the node is known to produce only a number (a size, a flag) or nothing."""
        if not isinstance(node, fx.Node):
            return False
        if node.op == "output":
            return True
        val = self.value(node)
        if val is None:
            return not self.is_shape_only(node)
        if isinstance(val, (tuple, list)):
            return any(isinstance(v, torch.Tensor) for v in val)
        return isinstance(val, torch.Tensor) or type(val).__name__ == "TensorMetadata"

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        """Inputs whose values flow into ``node`` (shape-only reads and number-valued inputs excluded)."""
        cached = self._inputs_cache.get(node)
        if cached is None:
            cached = self._inputs_cache[node] = self._data_inputs(node)
        return cached

    def _data_inputs(self, node: fx.Node) -> list[fx.Node]:
        if self.is_shape_only(node) or not self.carries_data(node):
            return []
        meta = (_META_ARGS_ATEN.get(node.target) if node.op == "call_function"
                else _META_ARGS_METHODS.get(node.target) if node.op == "call_method" else None)
        if meta:
            valued = [a for i, a in enumerate(node.args) if i not in meta] + list(node.kwargs.values())
            reads = set(_nodes_in(valued))
            return [i for i in node.all_input_nodes if i in reads and self.carries_data(i)]
        return [i for i in node.all_input_nodes if self.carries_data(i)]

    def data_users(self, node: fx.Node) -> list[fx.Node]:
        """Nodes that read the value of ``node`` (shape-only reads excluded)."""
        cached = self._users_cache.get(node)
        if cached is None:
            cached = [u for u in node.users if node in self.data_inputs(u)]
            self._users_cache[node] = cached
        return cached

    # ----- see-through ops ----------------------------------------------------------------------
    def passthrough_input(self, node: fx.Node) -> fx.Node | None:
        """If ``node`` preserves its input's value (cast, clone, dropout, identity, a view that keeps
        the last dim), return that input; else None."""
        if node.op == "call_function":
            t = node.target
            if t in _VALUE_PRESERVING_ATEN or t in _VALUE_PRESERVING_FUNCS:
                return self._first_tensor_arg(node)
            if t is operator.getitem and node.args[1] == 0 and isinstance(node.args[0], fx.Node) \
                    and node.args[0].op == "call_function" and node.args[0].target in _TUPLE_DROPOUT_ATEN:
                return self._first_tensor_arg(node.args[0])
            if t in _VIEW_ATEN or t in _VIEW_FUNCS:
                return self._view_input(node)
        elif node.op == "call_method":
            if node.target in _VALUE_PRESERVING_METHODS:
                return self._first_tensor_arg(node)
            if node.target in _VIEW_METHODS:
                return self._view_input(node)
        elif node.op == "call_module":
            if isinstance(self.module(node), _VALUE_PRESERVING_MODULES):
                return self._first_tensor_arg(node)
        return None

    def is_cast(self, node: fx.Node) -> bool:
        """A dtype/device conversion (value-preserving)."""
        if node.op == "call_function":
            return node.target in _CAST_ATEN
        return node.op == "call_method" and node.target in _CAST_METHODS

    def _first_tensor_arg(self, node: fx.Node) -> fx.Node | None:
        arg = node.args[0] if node.args else node.kwargs.get("input")
        return arg if isinstance(arg, fx.Node) else None

    def _view_input(self, node: fx.Node) -> fx.Node | None:
        src = self._first_tensor_arg(node)
        if src is None:
            return None
        a, b = self.shape(src), self.shape(node)
        if a is None or b is None or not a or not b:
            return None
        same_last = _same_size(a[-1], b[-1])
        return src if same_last else None

    def root(self, node: fx.Node) -> fx.Node:
        """Follow value-preserving ops upwards to the node that computed the value."""
        cached = self._root_cache.get(node)
        if cached is not None:
            return cached
        cur = node
        seen = []
        while True:
            src = self.passthrough_input(cur)
            if src is None:
                break
            seen.append(cur)
            cur = src
        for n in seen + [node]:
            self._root_cache[n] = cur
        return cur

    # ----- arithmetic ---------------------------------------------------------------------------
    def add_operands(self, node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
        """For ``a + b`` with two tensor operands (unit alpha), return ``(a, b)``."""
        if node.op == "call_function" and (node.target in _ADD_ATEN or node.target in _ADD_FUNCS):
            if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
                return None
        elif not (node.op == "call_method" and node.target in _ADD_METHODS):
            return None
        args = list(node.args[:2])
        if len(args) < 2:
            args.append(node.kwargs.get("other"))
        if all(isinstance(a, fx.Node) and self.is_tensor(a) for a in args):
            return args[0], args[1]
        return None

    def mul_operands(self, node: fx.Node) -> tuple[object, object] | None:
        """For ``a * b`` return ``(a, b)`` (either may be a number)."""
        if node.op == "call_function" and (node.target in _MUL_ATEN or node.target in _MUL_FUNCS):
            return node.args[0], node.args[1]
        if node.op == "call_method" and node.target in _MUL_METHODS:
            return node.args[0], node.args[1]
        return None

    def add_scalar_operand(self, node: fx.Node) -> tuple[fx.Node, float] | None:
        """For ``t + c`` with a Python number ``c`` return ``(t, c)``."""
        if node.op == "call_function" and node.target in (_ADD_ATEN | _ADD_FUNCS | {aten.add.Scalar}):
            args = node.args
        elif node.op == "call_method" and node.target in _ADD_METHODS:
            args = node.args
        else:
            return None
        if len(args) == 2:
            a, b = args
            if isinstance(a, fx.Node) and isinstance(b, (int, float)):
                return a, float(b)
            if isinstance(b, fx.Node) and isinstance(a, (int, float)):
                return b, float(a)
        return None

    def is_rsqrt(self, node) -> bool:
        """``rsqrt(t)``, or ``t ** -0.5`` (Gemma 3n's RMSNorm spells it ``torch.pow(t, -0.5)``)."""
        return isinstance(node, fx.Node) and (self.matches(node, _RSQRT) or self._power_of(node) == -0.5)

    def is_sqrt(self, node) -> bool:
        """``sqrt(t)`` or ``t ** 0.5``."""
        return isinstance(node, fx.Node) and (self.matches(node, _SQRT) or self._power_of(node) == 0.5)

    def _power_of(self, node: fx.Node) -> float | None:
        if self.matches(node, _POW) and len(node.args) >= 2 and isinstance(node.args[0], fx.Node) \
                and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool):
            return float(node.args[1])
        return None

    def is_div(self, node) -> bool:
        return isinstance(node, fx.Node) and self.matches(node, _DIV)

    def sum_of_squares_over(self, node: fx.Node) -> tuple[fx.Node, list[int], bool] | None:
        """For a sum reduction return ``(input, dims, keepdim)`` (``u * rsqrt(sum(u**2))`` is an RMSNorm
        with the constant gain ``1/sqrt(d)``: the L2 normalization of nGPT-style models)."""
        return self.mean_over(node, _SUM)

    def mean_over(self, node: fx.Node, spelling=_MEAN) -> tuple[fx.Node, list[int], bool] | None:
        """For a mean reduction return ``(input, dims, keepdim)``."""
        if not self.matches(node, spelling):
            return None
        args = list(node.args)
        src = args[0]
        dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
        keepdim = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None or not isinstance(src, fx.Node):
            return None
        dims = [dims] if isinstance(dims, int) else list(dims)
        return src, dims, bool(keepdim)

    def squared_input(self, node: fx.Node) -> fx.Node | None:
        """For ``u ** 2``, ``u * u`` or ``square(u)`` return ``u``."""
        if self.matches(node, _POW) and len(node.args) >= 2 and node.args[1] == 2 \
                and isinstance(node.args[0], fx.Node):
            return node.args[0]
        if self.matches(node, _SQUARE) and isinstance(node.args[0], fx.Node):
            return node.args[0]
        ops = self.mul_operands(node)
        if ops and isinstance(ops[0], fx.Node) and ops[0] is ops[1]:
            return ops[0]
        return None

    def sub_operands(self, node: fx.Node) -> tuple[object, object] | None:
        """For ``a - b`` (unit alpha) return ``(a, b)``."""
        if self.matches(node, _SUB) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
            return node.args[0], node.args[1]
        return None

    def scalar_mul_input(self, node: fx.Node) -> tuple[fx.Node, float] | None:
        """For ``c * t`` / ``t * c`` with a Python number ``c`` return ``(t, c)``."""
        ops = self.mul_operands(node)
        if ops is None:
            return None
        a, b = ops
        if isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
            return a, float(b)
        if isinstance(b, fx.Node) and isinstance(a, (int, float)) and not isinstance(a, bool):
            return b, float(a)
        return None

    def variance_over(self, node: fx.Node) -> tuple[fx.Node, list[int], bool] | None:
        """For a biased variance reduction ``var(u, dims, correction=0, keepdim)`` return ``(u, dims, keepdim)``
        (``unbiased``/``correction`` by position or keyword; dims non-negative when the rank is known)."""
        red = self.reduction(node)
        if red is None or red.op != "var" or red.correction != 0:
            return None
        return red.input, list(red.dims), red.keepdim

    # ----- statistics a normalization divides by ---------------------------------------------------
    def bound_args(self, node: fx.Node, names: Sequence[str] = ()) -> dict:
        """The arguments of ``node`` by name: an aten overload's schema names them (``self`` read as
        ``input``), else ``names`` (the positional names of the torch-level/method spelling)."""
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is not None:
            names = ["input" if a.name == "self" else a.name for a in schema.arguments]
        out = dict(zip(names, node.args))
        out.update(node.kwargs)
        return out

    def reduction(self, node) -> Reduction | None:
        """``node`` as a :class:`Reduction` over explicit dims (a reduction over all dims is None)."""
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
            return None
        nodes = {node}
        op = _REDUCTION_ATEN.get(node.target) or _REDUCTION_FUNCS.get(node.target) \
            if node.op == "call_function" else _REDUCTION_METHODS.get(node.target)
        call, names = node, op
        if op is None and node.op == "call_function" and node.target in (operator.getitem, builtins.getattr) \
                and len(node.args) == 2 and isinstance(node.args[0], fx.Node) \
                and node.args[0].op in ("call_function", "call_method"):
            call, index = node.args[0], node.args[1]
            items = (_TUPLE_REDUCTION_ATEN.get(call.target) or _TUPLE_REDUCTION_FUNCS.get(call.target)
                     if call.op == "call_function" else _TUPLE_REDUCTION_METHODS.get(call.target))
            index = 0 if index == "values" and isinstance(index, str) else index
            if not items or type(index) is not int or index not in (0, 1) or items[index] is None:
                return None
            op, names, nodes = items[index], items[0], {node, call}
        if op is None:
            return None
        args = self.bound_args(call, _ARG_NAMES[names])
        src, dims = args.get("input"), args.get("dim")
        if op in ("var", "std") and isinstance(dims, bool):  # torch.var(x, unbiased)
            args["unbiased"], dims = dims, None
        if not isinstance(src, fx.Node) or dims is None or (isinstance(dims, (list, tuple)) and not dims):
            return None
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            return None
        ndim = self.ndim(src)
        dims = tuple(sorted(d % ndim for d in dims)) if ndim else tuple(dims)
        keepdim = bool(args.get("keepdim", False))
        correction = args.get("correction") if op in ("var", "std") else 0.0
        if correction is None:
            correction = 0.0 if args.get("unbiased", True) is False else 1.0
        ord_ = 2.0
        if op in ("norm", "linalg_norm", "vector_norm"):
            ord_ = args.get("p" if op == "norm" else "ord", 2.0 if op == "vector_norm" else None)
            if ord_ in (None, "fro"):
                ord_ = 2.0
            if isinstance(ord_, str) or (op == "linalg_norm" and len(dims) != 1):
                return None  # "nuc", matrix norms
            op = "vector_norm"
        return Reduction(op, src, dims, keepdim, frozenset(nodes), float(correction), float(ord_))

    def power_step(self, node) -> tuple[fx.Node, float] | None:
        """For ``t ** p`` return ``(t, p)``: ``rsqrt`` (-0.5), ``sqrt`` (0.5), ``pow``, ``square`` and
        ``t * t`` (2), ``reciprocal`` and ``c / t`` with a number ``c > 0`` (-1)."""
        if not isinstance(node, fx.Node):
            return None
        arg = node.args[0] if node.args else None
        if self.matches(node, _RSQRT):
            return (arg, -0.5) if isinstance(arg, fx.Node) else None
        if self.matches(node, _SQRT):
            return (arg, 0.5) if isinstance(arg, fx.Node) else None
        if self.matches(node, _RECIPROCAL):
            return (arg, -1.0) if isinstance(arg, fx.Node) else None
        power = self._power_of(node)
        if power is not None:
            return arg, power
        t = self.squared_input(node)
        if t is not None:
            return t, 2.0
        if self.is_div(node) and len(node.args) == 2 and isinstance(node.args[1], fx.Node) \
                and _positive_number(node.args[0]):
            return node.args[1], -1.0
        return None

    def floor_input(self, node) -> fx.Node | None:
        """For an eps guard ``t + eps`` (a number ``>= 0``) or ``t.clamp(min=eps)`` (no max) return ``t``."""
        if not isinstance(node, fx.Node):
            return None
        added = self.add_scalar_operand(node)
        if added is not None:
            return added[0] if added[1] >= 0 else None
        if self.matches(node, _CLAMP):
            args = self.bound_args(node, ("input", "min", "max"))
            if isinstance(args.get("input"), fx.Node) and _positive_number(args.get("min"), zero=True) \
                    and args.get("max") is None:
                return args["input"]
        return None

    def constant_scale_input(self, node) -> fx.Node | None:
        """For ``t * c`` / ``c * t`` / ``t / c`` with a number ``c > 0`` return ``t``."""
        if not isinstance(node, fx.Node):
            return None
        if self.is_div(node) and len(node.args) == 2 and _positive_number(node.args[1]) \
                and isinstance(node.args[0], fx.Node):
            return node.args[0]
        scaled = self.scalar_mul_input(node)
        return scaled[0] if scaled is not None and scaled[1] > 0 else None

    def broadcast_input(self, node) -> fx.Node | None:
        """For ``t.expand(...)``, ``t.expand_as(u)`` or ``t.unsqueeze(d)`` return ``t`` (same values, broadcast)."""
        if isinstance(node, fx.Node) and self.matches(node, _EXPAND):
            return self._first_tensor_arg(node)
        return None

    def is_unsqueeze(self, node) -> bool:
        return isinstance(node, fx.Node) and self.matches(node, _UNSQUEEZE)

    def abs_input(self, node) -> fx.Node | None:
        """For ``|t|`` return ``t``."""
        if isinstance(node, fx.Node) and self.matches(node, _ABS):
            return self._first_tensor_arg(node)
        return None

    def div_operands(self, node) -> tuple[object, object] | None:
        """For ``a / b`` return ``(a, b)``."""
        if self.is_div(node) and len(node.args) == 2 and node.kwargs.get("rounding_mode") is None:
            return node.args[0], node.args[1]
        return None

    def normalize_call(self, node: fx.Node) -> tuple[fx.Node, float, tuple] | None:
        """For ``F.normalize(t, p, dim)`` (the torch-level op; torch.export decomposes it into
        ``t / vector_norm(t).clamp_min(eps).expand_as(t)``) return ``(t, p, dims)``."""
        if node.op != "call_function" or node.target not in _NORMALIZE_FUNCS:
            return None
        args = self.bound_args(node, _ARG_NAMES["normalize"])
        src, p, dim = args.get("input"), args.get("p", 2.0), args.get("dim", 1)
        if not isinstance(src, fx.Node) or not isinstance(dim, int) or not isinstance(p, (int, float)):
            return None
        ndim = self.ndim(src)
        return src, float(p), ((dim % ndim,) if ndim else (dim,))

    def other_norm_kind(self, node: fx.Node) -> str | None:
        """``"batch_norm"`` / ``"group_norm"`` / ``"instance_norm"`` for those ops and modules."""
        if node.op == "call_function":
            return _OTHER_NORM_ATEN.get(node.target) or _OTHER_NORM_FUNCS.get(node.target)
        mod = self.module(node)
        for cls, kind in _OTHER_NORM_MODULES:
            if isinstance(mod, cls):
                return kind
        return None

    def permutation(self, node: fx.Node) -> tuple[fx.Node, tuple[int, ...]] | None:
        """For an axis permutation ``y = x.permute(p)`` (or a transpose), return ``(x, p)`` with ``p`` in
        non-negative form: ``y`` axis ``i`` is ``x`` axis ``p[i]``."""
        src = self._first_tensor_arg(node) if node.op in ("call_function", "call_method") else None
        ndim = self.ndim(src) if src is not None else None
        if ndim is None:
            return None
        rest = list(node.args[1:])
        if self.matches(node, _PERMUTE):
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            dims = dims or node.kwargs.get("dims")
        elif self.matches(node, _TRANSPOSE) and len(rest) == 2:
            a, b = rest
            if not (isinstance(a, int) and isinstance(b, int)):
                return None
            dims = list(range(ndim))
            dims[a % ndim], dims[b % ndim] = dims[b % ndim], dims[a % ndim]
        else:
            return None
        if not dims or len(dims) != ndim or not all(isinstance(d, int) for d in dims):
            return None
        perm = tuple(d % ndim for d in dims)
        return (src, perm) if sorted(perm) == list(range(ndim)) else None

    def is_last_dim(self, node: fx.Node, dims: Sequence[int]) -> bool:
        """True when ``dims`` names exactly the last dimension of ``node``."""
        if len(dims) != 1:
            return False
        ndim = self.ndim(node)
        return dims[0] == -1 or (ndim is not None and dims[0] == ndim - 1)

    # ----- module structure ---------------------------------------------------------------------
    @staticmethod
    def module_stack(node: fx.Node) -> list[tuple[str, str, str]]:
        """``[(invocation key, module path, class name), ...]`` from outermost to innermost."""
        stack = node.meta.get("nn_module_stack") or {}
        out = []
        for key, (path, cls) in stack.items():
            out.append((str(key), _clean_path(path), _class_name(cls)))
        return out

    def module_path(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        stack = self.module_stack(node)
        return stack[-1][1] if stack else ""

    def inside_module_class(self, node: fx.Node, class_names: Iterable[str]) -> bool:
        names = set(class_names)
        stack = node.meta.get("nn_module_stack") or {}
        return any(_class_name(cls) in names for _path, cls in stack.values())  # paths not cleaned: hot


def _positive_number(value, zero: bool = False) -> bool:
    """A Python number ``> 0`` (``>= 0`` with ``zero``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 or (zero and value == 0))


def _nodes_in(args) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, out.append)
    return out


def _class_name(cls) -> str:
    return cls if isinstance(cls, str) else qualified_name(cls)


def _clean_path(path: str) -> str:
    """``"L['self'].model.layers[0]"`` style paths (strict export) become ``"model.layers.0"``."""
    p = str(path)
    if p.startswith("L['self']"):
        p = p[len("L['self']"):].lstrip(".")
    p = p.replace("[", ".").replace("]", "").replace("'", "").replace("..", ".")
    return p.strip(".")


def _same_size(a, b) -> bool:
    # Symbolic sizes: identical expressions decide at once; `a == b` on SymInts goes through the shape
    # environment's guard machinery, which dominated the pass's run time on deep models.
    expr_a, expr_b = getattr(getattr(a, "node", None), "expr", a), getattr(getattr(b, "node", None), "expr", b)
    if expr_a is expr_b or (type(expr_a) is int and type(expr_b) is int):
        return expr_a == expr_b
    if expr_a == expr_b:  # structurally equal expressions (sympy compares them without the guards)
        return True
    try:
        return bool(a == b)
    except Exception:  # symbolic sizes that cannot be decided
        return str(a) == str(b)


def norm_spellings():
    """The whole-op normalization spellings, for :mod:`geonorm_fx.passes.norms`."""
    return {
        "layer_norm_ops": _LAYER_NORM_ATEN | _LAYER_NORM_FUNCS,
        "layer_norm_tuple_ops": _LAYER_NORM_TUPLE_ATEN,
        "rms_norm_ops": _RMS_NORM_ATEN | _RMS_NORM_FUNCS,
        "rms_norm_tuple_ops": _RMS_NORM_TUPLE_ATEN,
        "layer_norm_modules": (nn.LayerNorm,),
        "rms_norm_modules": _RMS_NORM_MODULES,
    }
