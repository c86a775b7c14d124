"""Find normalizations in a graph: whole ops (aten, functional, modules) and decomposed chains.

Each match is a :class:`NormMatch`: its kind, the tensor it normalizes, the node that carries the
result (after the affine weight/bias and trailing casts), and every node that belongs to it.
Decomposed chains are recognised by what they compute, not by literals: RMSNorm is
``u * rsqrt(mean(u**2) + eps)`` (or ``u / sqrt(...)``), LayerNorm the same over ``u - mean(u)``,
whatever the casts, eps, or the order of the operands.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch import fx

from .ops import GraphView, norm_spellings

RESIDUAL_NORM_KINDS = ("layer_norm", "rms_norm")


@dataclass(eq=False)
class NormMatch:
    """One normalization: ``output = N(input)``; ``source`` is ``input`` seen through casts/aliases."""

    kind: str                      # "layer_norm" | "rms_norm" | "batch_norm" | "group_norm" | "instance_norm"
    input: fx.Node
    source: fx.Node
    output: fx.Node
    nodes: set = field(default_factory=set)   # every node of the norm, casts from the input included
    over: str = "the last dimension"
    path: str = ""
    dim: int | None = None         # the one dimension of ``source`` it normalizes (negative), else None
    output_in_source_layout: bool = True   # False when the result stays in a permuted layout

    @property
    def feature_norm(self) -> bool:
        """A LayerNorm/RMSNorm over one dimension of its source (the last, or another one read through an
        axis permutation): the only norms residual sites are built from."""
        return self.kind in RESIDUAL_NORM_KINDS and self.dim is not None

    @property
    def name(self) -> str:
        return self.output.name


def find_norms(view: GraphView, exclude: set | None = None) -> list[NormMatch]:
    """Every normalization in the graph, in graph order. Nodes in ``exclude`` are ignored."""
    exclude = exclude or set()
    spell = norm_spellings()
    found: list[NormMatch] = []
    claimed: set = set()
    for node in view.nodes:
        if node in exclude or node in claimed:
            continue
        match = _whole_op(view, node, spell) or _decomposed(view, node) or _other_norm(view, node)
        if match is None:
            continue
        if match.kind in RESIDUAL_NORM_KINDS:
            _absorb_affine(view, match)
            if match.over == "the last dimension":
                match.dim = -1
                _see_through_permutation(view, match)
        claimed |= match.nodes
        found.append(match)
    return found


def _over(view: GraphView, node: fx.Node, dims: list[int]) -> str:
    if view.is_last_dim(node, dims):
        return "the last dimension"
    ndim = view.ndim(node)
    norm_dims = sorted(d % ndim if ndim else d for d in dims)
    if ndim and norm_dims == list(range(ndim - len(dims), ndim)):
        return f"the last {len(dims)} dimensions"
    return f"dimension(s) {norm_dims}"


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
    inp = _input(node)
    output = _first_output(node) if tuple_out else node
    if inp is None or output is None:
        return None
    nodes = {node} | (set(node.users) if tuple_out else set())  # mean / rstd outputs belong to the norm too
    if isinstance(shape, fx.Node):  # e.g. F.layer_norm(x, x.shape[-1:]) traced by fx
        shape = shape.meta.get("val")
    n_dims = 1 if isinstance(shape, int) or shape is None else len(shape)
    over = "the last dimension" if n_dims == 1 else f"the last {n_dims} dimensions"
    _add_input_casts(view, inp, nodes)
    return NormMatch(kind, inp, view.root(inp), output, nodes, over, view.module_path(node))


def _centered(view: GraphView, node) -> tuple[fx.Node, fx.Node] | None:
    """For ``u - mean(u, dim, keepdim=True)`` return ``(u, mean node)``."""
    if not isinstance(node, fx.Node):
        return None
    ops = view.sub_operands(node)
    if ops is None or not all(isinstance(o, fx.Node) for o in ops):
        return None
    u, m = ops
    mean = view.mean_over(m)
    if mean is None or not mean[2] or view.root(mean[0]) is not view.root(u):
        return None
    return u, m


def _decomposed(view: GraphView, node: fx.Node) -> NormMatch | None:
    """RMSNorm ``u * rsqrt(mean(u**2) + eps)`` or LayerNorm ``c * rsqrt(mean(c**2) + eps)`` with
    ``c = u - mean(u)`` (``/ sqrt`` and ``var(u)`` forms too), anchored at the rsqrt/sqrt."""
    is_rsqrt = view.is_rsqrt(node)
    if not (is_rsqrt or view.is_sqrt(node)):
        return None
    inner = node.args[0]
    if not isinstance(inner, fx.Node):
        return None
    eps = view.add_scalar_operand(inner)
    reduced = eps[0] if eps else inner
    nodes = {node, reduced} | ({inner} if eps else set())
    mean = view.mean_over(reduced)
    if mean is None:  # a sum of squares (L2 normalization, RMSNorm up to a constant) is read the same way
        summed = view.sum_of_squares_over(reduced)
        mean = summed if summed is not None and view.squared_input(summed[0]) is not None else None
    if mean is not None:
        squared, dims, keepdim = mean
        base = view.squared_input(squared)
        nodes.add(squared)
    else:
        variance = view.variance_over(reduced)
        if variance is None:
            return None
        base, dims, keepdim = variance
        squared = reduced
    if base is None or not keepdim:
        return None
    centered = _centered(view, base) if mean is not None else (base, None)
    kind = "layer_norm" if centered is not None else "rms_norm"
    u = centered[0] if centered is not None else base
    source = view.root(u)
    product = normalized = None
    for user in view.data_users(node):
        if is_rsqrt:
            ops = view.mul_operands(user)
            other = None if ops is None else ops[0] if ops[1] is node else ops[1] if ops[0] is node else None
        else:
            other = user.args[0] if view.is_div(user) and len(user.args) > 1 and user.args[1] is node else None
        if not isinstance(other, fx.Node):
            continue
        if kind == "layer_norm":  # the product is over u - mean(u), computed once or again
            c = _centered(view, other)
            ok = c is not None and view.root(c[0]) is source
        else:
            ok = view.root(other) is source
        if ok:
            product, normalized = user, other
            break
    if product is None:
        return None
    nodes.add(product)
    for value in {base, normalized}:
        c = _centered(view, value)
        if c is not None:
            nodes |= {value, c[1]}
            _add_input_casts(view, c[0], nodes, stop=source)
            _add_input_casts(view, view.mean_over(c[1])[0], nodes, stop=source)
        else:
            _add_input_casts(view, value, nodes, stop=source)
    return NormMatch(kind, u, source, product, nodes, _over(view, squared, dims), view.module_path(node))


def _other_norm(view: GraphView, node: fx.Node) -> NormMatch | None:
    kind = view.other_norm_kind(node)
    if kind is None:
        return None
    inp = _input(node)
    if inp is None:
        return None
    output = (_first_output(node) or node) if isinstance(view.value(node), (tuple, list)) else node
    over = {"batch_norm": "the batch", "group_norm": "channel groups", "instance_norm": "each instance"}[kind]
    return NormMatch(kind, inp, view.root(inp), output, {node, output}, over, view.module_path(node))


def _input(node: fx.Node) -> fx.Node | None:
    inp = node.args[0] if node.args else node.kwargs.get("input")
    return inp if isinstance(inp, fx.Node) else None


def _first_output(node: fx.Node) -> fx.Node | None:
    """The ``getitem(node, 0)`` of an op that returns a tuple (normalized output, statistics...)."""
    firsts = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    return firsts[0] if len(firsts) == 1 else None


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
            if view.dtype(nxt) != view.dtype(match.source):
                return  # an up-cast by the next reader (e.g. the next norm's float32 copy), not ours
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
        if other is None or not is_parameter_expr(view, other):
            return
        match.nodes.add(nxt)
        match.nodes |= parameter_expr_nodes(view, other)
        match.output = nxt


def _same_shape_passthrough(view: GraphView, node: fx.Node) -> fx.Node | None:
    src = view.passthrough_input(node)
    return src if src is not None and view.same_shape(src, node) else None


def _see_through_permutation(view: GraphView, match: NormMatch) -> None:
    """A last-dimension norm of ``t.permute(p)`` normalizes ``t`` over its dimension ``p[-1]`` (a
    channels-first ``(N, C, L)`` stream normalized over C, e.g. SqueezeBERT). Re-anchor ``match`` on
    ``t``; when the result is permuted back by the inverse permutation, its output is that permute."""
    path, cur = [], match.input
    while True:
        perm = view.permutation(cur)
        if perm is not None:
            break
        src = _same_shape_passthrough(view, cur)
        if src is None:
            return
        path.append(cur)
        cur = src
    t, p = perm
    ndim = len(p)
    if p[-1] == ndim - 1:
        return  # the last dimension stays last: a norm of the permuted stream, as it is
    match.nodes |= set(path) | {cur}
    match.input, match.source, match.dim = t, view.root(t), p[-1] - ndim
    match.over = f"dimension {p[-1]} (read through a permute)"
    out, trail = match.output, []
    while True:
        users = view.data_users(out)
        if len(users) != 1:
            break
        nxt = users[0]
        back = view.permutation(nxt)
        if back is not None and back[0] is out and all(p[q] == j for j, q in enumerate(back[1])):
            match.nodes |= set(trail) | {nxt}
            match.output = nxt
            return
        if _same_shape_passthrough(view, nxt) is not out:
            break
        trail.append(nxt)
        out = nxt
    match.output_in_source_layout = False


def is_parameter_expr(view: GraphView, node, depth: int = 0) -> bool:
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
        return bool(inputs) and all(is_parameter_expr(view, i, depth + 1) for i in inputs)
    return False


def parameter_expr_nodes(view: GraphView, node) -> set:
    if not isinstance(node, fx.Node) or node.op == "get_attr":
        return set()
    out = {node}
    for i in node.all_input_nodes:
        out |= parameter_expr_nodes(view, i)
    return out
