"""Find normalizations in a graph: whole ops (aten, functional, modules) and decomposed chains.

Each match is a :class:`NormMatch`: its kind, the tensor it normalizes, the node that carries the
result (after the affine weight/bias and trailing casts), and every node that belongs to it.
Decomposed chains are recognised by what they compute, not by literals (see :func:`_classify`): RMSNorm
is ``u * rsqrt(mean(u**2) + eps)`` (or ``u / sqrt(...)``, ``u / |u|``, ``F.normalize(u)``), LayerNorm the
same over ``u - mean(u)`` or with ``var``/``std``/``var_mean``, whatever the casts, eps (added or clamped,
inside or outside the root), dims spelling, or the order of the operands. Any other division of a tensor by
a magnitude of itself over some dims is found as ``norm_like`` with a ``skip_reason``, so it is reported.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace

from torch import fx

from .ops import GraphView, Reduction, norm_spellings

RESIDUAL_NORM_KINDS = ("layer_norm", "rms_norm")


@dataclass(eq=False)
class NormMatch:
    """One normalization: ``output = N(input)``; ``source`` is ``input`` seen through casts/aliases."""

    kind: str   # "layer_norm" | "rms_norm" | "norm_like" | "batch_norm" | "group_norm" | "instance_norm"
    input: fx.Node
    source: fx.Node
    output: fx.Node
    nodes: set = field(default_factory=set)   # every node of the norm, casts from the input included
    over: str = "the last dimension"
    path: str = ""
    dim: int | None = None         # the one dimension of ``source`` it normalizes (negative), else None
    output_in_source_layout: bool = True   # False when the result stays in a permuted layout
    skip_reason: str | None = None  # set for a norm-like op that is neither LayerNorm nor RMSNorm (kind
    # "norm_like"): what it is and why it is left alone, in words; such a match never becomes a site
    direct_source: fx.Node | None = None  # set when re-anchored through a permute: the permuted input's root

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
        match = (_whole_op(view, node, spell) or _normalize_op(view, node) or _scaled(view, node)
                 or _other_norm(view, node))
        if match is None or (exclude and match.nodes & exclude):
            continue
        if match.kind in RESIDUAL_NORM_KINDS or match.kind == "norm_like":
            _absorb_affine(view, match)
            if match.over == "the last dimension":
                match.dim = -1
                if match.kind in RESIDUAL_NORM_KINDS:
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


def _normalize_op(view: GraphView, node: fx.Node) -> NormMatch | None:
    """``F.normalize(x, p, dim)`` as one op (fx graphs): ``x / max(|x|_p, eps)``. With ``p = 2`` it is an
    RMSNorm up to the constant ``1/sqrt(d)`` (x-transformers' ScaleNorm / SimpleRMSNorm / RMSNorm spell
    RMSNorm ``F.normalize(x, dim=-1) * g * sqrt(d)``); another ``p`` is norm-like."""
    call = view.normalize_call(node)
    if call is None:
        return None
    src, p, dims = call
    over = _over(view, src, list(dims))
    nodes = {node}
    _add_input_casts(view, src, nodes)
    if p == 2:
        return NormMatch("rms_norm", src, view.root(src), node, nodes, over, view.module_path(node))
    return NormMatch("norm_like", src, view.root(src), node, nodes, over, view.module_path(node),
                     skip_reason=f"L{p:g} normalization (F.normalize with p={p:g}) over {over}: divides by the "
                                 f"L{p:g} norm, {_NEITHER}")


_NEITHER = "neither a LayerNorm nor an RMSNorm, left as it is"


def _scaled(view: GraphView, node: fx.Node) -> NormMatch | None:
    """A decomposed normalization, anchored at its product: ``n * s`` or ``n / t`` where ``s`` (``1/t``)
    is a power of a reduction ``r`` of (a function of) ``n`` itself, over dims ``D`` with ``keepdim``,
    seen through eps guards at any depth (``+ eps``, ``.clamp(min=eps)``), positive constant factors,
    per-channel gains, casts and broadcasts (``expand_as``, ``unsqueeze``). Read by :func:`_classify`."""
    div = view.div_operands(node)
    if div is not None:
        candidates = [(div[0], div[1], -1.0)]
    else:
        ops = view.mul_operands(node)
        if ops is None:
            return None
        candidates = [(ops[0], ops[1], 1.0), (ops[1], ops[0], 1.0)]
    for n, s, power in candidates:
        if isinstance(n, fx.Node) and isinstance(s, fx.Node):
            stat = _statistic(view, s, power)
            if stat is not None:
                match = _classify(view, node, n, *stat)
                if match is not None:
                    return match
    return None


def _statistic(view: GraphView, s: fx.Node, power: float):
    """For a factor ``s = c * r ** power`` (``c`` constant or per-channel) of a keepdim reduction ``r``
    return ``(r, power, nodes between)``."""
    nodes: set = set()
    cur, restored = s, False
    for _ in range(16):
        red = view.reduction(cur)
        if red is not None:
            return (red, power, nodes) if red.keepdim or restored else None
        step = view.power_step(cur)
        if step is not None:
            nxt, p = step
            power *= p
        else:
            nxt = (view.floor_input(cur) or _eps_tensor_input(view, cur) or view.passthrough_input(cur)
                   or view.constant_scale_input(cur) or _gain_input(view, cur))
            if nxt is None:
                nxt = view.broadcast_input(cur)
                restored |= view.is_unsqueeze(cur)
        if nxt is None:
            return None
        nodes.add(cur)
        cur = nxt
    return None


def _eps_tensor_input(view: GraphView, node: fx.Node) -> fx.Node | None:
    """For ``t + eps`` with ``eps`` a one-element constant tensor (a buffer, a lifted constant) return ``t``."""
    ops = view.add_operands(node)
    if ops is None:
        return None
    for t, eps in (ops, ops[::-1]):
        shape = view.shape(eps)
        if is_parameter_expr(view, eps) and shape is not None and all(type(d) is int for d in shape) \
                and math.prod(shape) == 1:
            return t
    return None


def _gain_input(view: GraphView, node: fx.Node) -> fx.Node | None:
    """For ``t * g`` / ``g * t`` with ``g`` a number or a parameter expression (per-channel gain) return ``t``."""
    ops = view.mul_operands(node)
    if ops is None:
        return None
    a, b = ops
    if isinstance(a, fx.Node) and a is not b and is_parameter_expr(view, b):
        return a
    if isinstance(b, fx.Node) and a is not b and is_parameter_expr(view, a):
        return b
    return None


def _magnitude(view: GraphView, node: fx.Node) -> tuple[fx.Node, float, bool, set]:
    """Read a reduction's input as ``f(u)`` with ``f`` a composition of ``abs``, positive powers and casts:
    return ``(u, degree of f, f depends on |u| only, nodes of f)``."""
    degree, even, nodes, cur = 1.0, False, set(), node
    for _ in range(8):
        nxt = view.abs_input(cur)
        if nxt is not None:
            even = True
        else:
            step = view.power_step(cur)
            if step is not None and step[1] > 0:
                nxt, p = step
                degree *= p
                even |= p % 2 == 0
            else:
                nxt = view.passthrough_input(cur)
        if nxt is None:
            break
        nodes.add(cur)
        cur = nxt
    return cur, degree, even, nodes


def _mean_of(view: GraphView, node: fx.Node) -> Reduction | None:
    """``mean(u, D)``, or ``sum(u, D) / n`` with ``n`` the number of elements reduced."""
    red = view.reduction(node)
    if red is not None:
        return red if red.op == "mean" else None
    ops = view.div_operands(node)
    if ops is None or not isinstance(ops[0], fx.Node) or not isinstance(ops[1], (int, float)):
        return None
    red = view.reduction(ops[0])
    shape = view.shape(red.input) if red is not None else None
    if red is None or red.op != "sum" or not shape or not all(type(shape[d]) is int for d in red.dims):
        return None
    if math.prod(shape[d] for d in red.dims) != ops[1]:
        return None
    return replace(red, op="mean", nodes=red.nodes | {node})


def _centred(view: GraphView, node: fx.Node, dims: tuple) -> tuple[fx.Node, set] | None:
    """For ``u - mean(u, D, keepdim=True)`` (seen through casts) with ``D == dims`` exactly, return ``(u,
    nodes)``: a centring over another dimension is not the centring of a LayerNorm."""
    cur = view.root(node)
    ops = view.sub_operands(cur)
    if ops is None or not all(isinstance(o, fx.Node) for o in ops):
        return None
    u, m = ops
    nodes, restored = {cur}, False
    for _ in range(4):  # casts and broadcasts of the mean (``x.mean(-1).unsqueeze(-1)``)
        nxt = view.passthrough_input(m) or view.broadcast_input(m)
        if nxt is None:
            break
        restored |= view.is_unsqueeze(m)
        nodes.add(m)
        m = nxt
    mean = _mean_of(view, m)
    if mean is None or mean.dims != dims or not (mean.keepdim or restored) \
            or view.root(mean.input) is not view.root(u):
        return None
    nodes |= mean.nodes
    _add_input_casts(view, node, nodes)
    _add_input_casts(view, mean.input, nodes)
    return u, nodes


def _strip_gain(view: GraphView, node: fx.Node) -> tuple[fx.Node, set]:
    """``g * u`` with a constant or per-channel ``g`` (the Annotated Transformer's ``a * (x - m) / (std + eps)``)
    normalizes ``u``: return ``(u, the gain's nodes)``."""
    nodes: set = set()
    for _ in range(3):
        inner = _gain_input(view, node)
        if inner is None:
            break
        a, b = view.mul_operands(node)
        nodes |= {node} | parameter_expr_nodes(view, b if a is inner else a)
        node = inner
    return node, nodes


def _describe(red: Reduction, degree: float, even: bool) -> str:
    if red.op in ("var", "std"):
        return {"var": "the variance", "std": "the standard deviation"}[red.op]
    if red.op == "vector_norm":
        return f"the L{red.ord:g} norm"
    what = ("absolute value" if degree == 1 and even else "square" if degree == 2
            else f"|x|^{degree:g}" if even else f"x^{degree:g}")
    return {"mean": f"the mean {what}", "sum": f"the sum of each {what}", "amax": f"the maximum {what}"}[red.op]


def _relation(view: GraphView, family: str, rn: fx.Node, rb: fx.Node, cn, cb) -> str | None:
    """How the normalized value (root ``rn``, centring ``cn``) relates to the reduced one (``rb``, ``cb``):
    ``"plain"`` (the same tensor), ``"centred"`` (both the same ``x - mean(x, D)``, or ``x - mean(x, D)``
    over the spread of ``x``), ``"uncentred"`` (``x`` over its spread), ``"mismatch"`` (``x - mean(x)`` over
    the RMS of ``x``), or None (unrelated: not a normalization)."""
    if family == "std":  # the variance is shift-invariant: var(x) == var(x - mean(x))
        spread_of = view.root(cb[0]) if cb else rb
        return "centred" if cn and view.root(cn[0]) is spread_of else "uncentred" if rn is spread_of else None
    if rn is rb:
        return "centred" if cn else "plain"
    if cn and cb and view.root(cn[0]) is view.root(cb[0]):
        return "centred"
    if cb and view.root(cb[0]) is rn:
        return "uncentred"
    if cn and view.root(cn[0]) is rb:
        return "mismatch"
    return None


def _classify(view: GraphView, anchor: fx.Node, n: fx.Node, red: Reduction, power: float,
              chain: set) -> NormMatch | None:
    """Name ``y = n * r ** power`` (``r`` a reduction over dims ``D`` of ``f(u)``) by what it computes:

    - ``rms_norm``: ``r`` is the mean or sum of ``u**2`` (``power = -1/2``) or the L2 norm of ``u``
      (``power = -1``), and ``n`` is ``u`` (up to casts). A sum or a norm differs from the RMS by the
      constant ``sqrt(d)``: an RMSNorm up to a constant gain (L2 normalization, ``x / |x| * sqrt(d)``).
    - ``layer_norm``: the same with ``n = u = x - mean(x, D)`` (centring computed once or twice), or
      ``r = var(x, D)`` / ``std(x, D)`` with ``n = x - mean(x, D)``. The variance may be BIASED OR UNBIASED:
      ``correction=1`` only scales the output by the constant ``sqrt(d/(d-1))`` (the Annotated Transformer's
      ``(x - m) / (std + eps)``), which a LayerNorm's gain absorbs, so it is read as a LayerNorm too.
      The centring must reduce exactly ``D``: ``c = x - mean(x, other dim)`` normalized by its RMS over ``D``
      is an RMSNorm of ``c``, not a LayerNorm of ``x``.
    - ``norm_like`` (with ``skip_reason``): any other division of ``n`` by a magnitude of itself over ``D``:
      the standard deviation without centring (timm's SimpleNorm-like ``x / sqrt(var(x) + eps)``), a
      centring that the scale does not match, the mean or maximum absolute value, an Lp norm with
      ``p != 2``, or a power that does not cancel the input's scale.
    Eps values, eps placement, casts, operand order and the spelling of dims never change the kind."""
    base, degree, even, fnodes = _magnitude(view, red.input)
    k = degree * (2.0 if red.op == "var" else 1.0)   # the reduction is homogeneous of degree k in u
    if k * power >= 0:
        return None  # multiplies by a magnitude: not a normalization
    if (red.op in ("mean", "sum") and degree == 2) or (red.op == "vector_norm" and red.ord == 2 and degree == 1):
        family = "rms"
    elif red.op in ("var", "std") and degree == 1 and not even:
        family = "std"
    elif even or red.op in ("vector_norm", "var", "std"):
        family = "other"
    else:
        return None  # e.g. x / x.sum(-1) (a probability normalization) or x / x.amax(-1): not a scale
    cb = _centred(view, base, red.dims)
    relation = None
    for core, gain_nodes in ((n, set()), _strip_gain(view, n)):  # n itself first: it may be an earlier norm's w*y
        cn = _centred(view, core, red.dims)
        relation = _relation(view, family, view.root(core), view.root(base), cn, cb)
        if relation is not None:
            break
    if relation is None:
        return None
    over = _over(view, red.input, list(red.dims))
    what = _describe(red, degree, even)
    kind, reason = "norm_like", None
    if abs(k * power + 1) > 1e-9:
        reason = f"divides by a power of {what} over {over} that does not cancel the input's scale: {_NEITHER}"
    elif family == "other":
        reason = f"divides by {what} over {over}: {_NEITHER}"
    elif relation == "uncentred":
        reason = f"divides by the standard deviation over {over} without centring: {_NEITHER}"
    elif relation == "mismatch":
        reason = (f"centres over {over} but divides by the root mean square of the uncentred input: "
                  f"{_NEITHER}")
    else:
        kind = "layer_norm" if relation == "centred" else "rms_norm"
    u = cn[0] if cn and relation in ("centred", "mismatch") else core
    source = view.root(u)
    nodes = {anchor} | chain | set(red.nodes) | fnodes | gain_nodes
    for c in (cn, cb):
        if c is not None:
            nodes |= c[1]
    _add_input_casts(view, core, nodes)
    _add_input_casts(view, base, nodes)
    return NormMatch(kind, u, source, anchor, nodes, over, view.module_path(anchor), skip_reason=reason)


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
    match.direct_source = match.source   # the permuted value itself: a stream kept in that layout reads it so
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
