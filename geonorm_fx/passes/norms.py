"""Find normalizations in a graph: whole ops (aten, functional, modules) and decomposed chains.

Each match is a :class:`NormMatch`: its kind, the tensor it normalizes, the node that carries the
result (after the affine weight/bias and trailing casts), and every node that belongs to it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch import fx

from .ops import GraphView, norm_spellings


@dataclass(eq=False)
class NormMatch:
    """One normalization: ``output = N(input)``; ``source`` is ``input`` seen through casts/aliases."""

    kind: str                      # "layer_norm" | "rms_norm"
    input: fx.Node
    source: fx.Node
    output: fx.Node
    nodes: set = field(default_factory=set)   # every node of the norm, casts from the input included
    trailing_dims: int = 1         # how many trailing dims it normalizes over
    path: str = ""

    @property
    def last_dim_only(self) -> bool:
        return self.trailing_dims == 1

    @property
    def name(self) -> str:
        return self.output.name


def find_norms(view: GraphView, exclude: set | None = None) -> list[NormMatch]:
    """Every LayerNorm / RMSNorm in the graph, in graph order. Nodes in ``exclude`` are ignored."""
    exclude = exclude or set()
    spell = norm_spellings()
    found: list[NormMatch] = []
    claimed: set = set()
    for node in view.nodes:
        if node in exclude or node in claimed:
            continue
        match = _whole_op(view, node, spell) or _decomposed_rms(view, node)
        if match is None:
            continue
        _absorb_affine(view, match)
        claimed |= match.nodes
        found.append(match)
    return found


def _whole_op(view: GraphView, node: fx.Node, spell: dict) -> NormMatch | None:
    kind = None
    tuple_out = False
    shape = None
    if node.op == "call_function":
        t = node.target
        if t in spell["layer_norm_ops"] or t in spell["layer_norm_tuple_ops"]:
            kind, tuple_out = "layer_norm", t in spell["layer_norm_tuple_ops"]
        elif t in spell["rms_norm_ops"] or t in spell["rms_norm_tuple_ops"]:
            kind, tuple_out = "rms_norm", t in spell["rms_norm_tuple_ops"]
        if kind:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    elif node.op == "call_module":
        mod = view.module(node)
        if isinstance(mod, spell["layer_norm_modules"]):
            kind = "layer_norm"
        elif spell["rms_norm_modules"] and isinstance(mod, spell["rms_norm_modules"]):
            kind = "rms_norm"
        if kind:
            shape = mod.normalized_shape
    if kind is None:
        return None
    inp = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(inp, fx.Node):
        return None
    output = node
    nodes = {node}
    if tuple_out:
        firsts = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(firsts) != 1:
            return None
        output = firsts[0]
        nodes |= set(node.users)  # mean / rstd outputs belong to the norm too
    if isinstance(shape, fx.Node):  # e.g. F.layer_norm(x, x.shape[-1:]) traced by fx
        shape = shape.meta.get("val")
    dims = 1 if isinstance(shape, int) or shape is None else len(shape)
    _add_input_casts(view, inp, nodes)
    return NormMatch(kind, inp, view.root(inp), output, nodes, dims, view.module_path(node))


def _decomposed_rms(view: GraphView, node: fx.Node) -> NormMatch | None:
    """``u * rsqrt(mean(u**2, -1, keepdim=True) + eps)`` (or ``u / sqrt(...)``), casts allowed."""
    is_rsqrt = view.is_rsqrt(node)
    if not (is_rsqrt or view.is_sqrt(node)):
        return None
    inner = node.args[0]
    if not isinstance(inner, fx.Node):
        return None
    eps = view.add_scalar_operand(inner)
    mean_node = eps[0] if eps else inner
    mean = view.mean_over(mean_node)
    if mean is None:
        return None
    squared, dims, keepdim = mean
    u = view.squared_input(squared)
    if u is None or not keepdim or not view.is_last_dim(squared, dims):
        return None
    source = view.root(u)
    product = None
    for user in view.data_users(node):
        if is_rsqrt:
            ops = view.mul_operands(user)
            other = None if ops is None else ops[0] if ops[1] is node else ops[1] if ops[0] is node else None
        else:
            other = user.args[0] if view.is_div(user) and len(user.args) > 1 and user.args[1] is node else None
        if isinstance(other, fx.Node) and view.root(other) is source:
            product = user
            normalized = other
            break
    if product is None:
        return None
    nodes = {squared, mean_node, node, product}
    if eps:
        nodes.add(inner)
    _add_input_casts(view, u, nodes, stop=source)
    _add_input_casts(view, normalized, nodes, stop=source)
    return NormMatch("rms_norm", u, source, product, nodes, 1, view.module_path(node))


def _add_input_casts(view: GraphView, node: fx.Node, nodes: set, stop: fx.Node | None = None) -> None:
    """Add the value-preserving ops between ``node`` and its root (exclusive) to ``nodes``."""
    stop = stop if stop is not None else view.root(node)
    cur = node
    while cur is not stop:
        src = view.passthrough_input(cur)
        if src is None:
            return
        nodes.add(cur)
        cur = src


def _absorb_affine(view: GraphView, match: NormMatch) -> None:
    """Extend ``match.output`` over a trailing elementwise affine (``* w``, ``+ b``, ``* (1 + w)``)
    and casts, as long as each step is the only reader of the previous one."""
    while True:
        users = view.data_users(match.output)
        if len(users) != 1:
            return
        nxt = users[0]
        if view.is_cast(nxt) and view.passthrough_input(nxt) is match.output:
            match.nodes.add(nxt)
            match.output = nxt
            continue
        ops = view.mul_operands(nxt) or view.add_operands(nxt)
        if ops is None:
            ops = view.add_scalar_operand(nxt)
            if ops is None or ops[0] is not match.output:
                return
            match.nodes.add(nxt)
            match.output = nxt
            continue
        other = ops[1] if ops[0] is match.output else ops[0] if ops[1] is match.output else None
        if other is None or not _is_parameter_expr(view, other):
            return
        match.nodes.add(nxt)
        match.nodes |= _parameter_expr_nodes(view, other)
        match.output = nxt


def _is_parameter_expr(view: GraphView, node, depth: int = 0) -> bool:
    """A value computed from parameters/constants only (e.g. ``w``, ``1 + w``, ``w.to(dtype)``),
    at most 1-D (a per-channel weight or a scalar)."""
    if not isinstance(node, fx.Node):
        return isinstance(node, (int, float))
    if depth > 4:
        return False
    shape = view.shape(node)
    if shape is not None and len(shape) > 1:
        return False
    if node.op == "get_attr":
        return True
    if node.op in ("call_function", "call_method"):
        inputs = node.all_input_nodes
        return bool(inputs) and all(_is_parameter_expr(view, i, depth + 1) for i in inputs)
    return False


def _parameter_expr_nodes(view: GraphView, node) -> set:
    if not isinstance(node, fx.Node) or node.op == "get_attr":
        return set()
    out = {node}
    for i in node.all_input_nodes:
        out |= _parameter_expr_nodes(view, i)
    return out
