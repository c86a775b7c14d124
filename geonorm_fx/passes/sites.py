"""Residual-stream analysis: which sums are steps of a residual stream, of which kind, in which block.

A residual sum is ``x + s_1 + ... + s_m + e_1 + ...`` (nested adds whose only reader is the next add are
flattened into terms, then split again by dataflow, not by association): the branches ``s_i`` are the terms
that no other term depends on, the stream ``x`` is the latest term they are computed from, and every other
term (``e_i``: an earlier state, an injected input) is added after the update. With ``N`` a LayerNorm or
RMSNorm over the stream's feature dimension (GEONORM.md section 4):

- ``pre``:      every data path from ``x`` to the branches passes through a norm of ``x``: ``x + f(N(x))``
- ``sandwich``: as ``pre``, and the branch ends in a norm:  ``x + N2(f(N1(x)))``
- ``parallel``: as ``pre``, with two or more branches:    ``x + f1(N1(x)) + f2(N2(x))``
- ``respost``:  ``x`` feeds the branch directly and the branch ends in a norm:  ``x + N(f(x))``
- ``post``:     ``x`` feeds the branch directly and the sum is read only by a norm:  ``N(x + f(x))``
- ``deepnorm``: ``post`` with a number-scaled stream:  ``N(a*x + f(x))`` (``a`` removed with ``N``)

A scaled skip ``a*x`` (a number, or a learned scalar or per-channel gain) in the other kinds is kept: the
update's state operand is ``a*x``.

Soundness (GEONORM.md section 4, "Decision (soundness)"): a site is a step of the residual stream of a stack of
blocks. Where the graph records modules, a candidate outside every repeated unit (a head, a pooling head, a
position or embedding norm, a final norm) is dropped as soon as any candidate lies in one; a post norm must lie
in its sum's block; a candidate computed inside another site's branch is part of that branch; a post norm
whose stream is still read after the step is not a step. Rejected candidates leave their norms in ``skipped``
with the reason. Streams and blocks: see :func:`_assign_streams_and_blocks`.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from torch import fx

from ..geodesic import GeodesicUpdate
from ..report import Skip
from .blocks import ModuleTree, Unit
from .norms import RESIDUAL_NORM_KINDS, NormMatch, find_norms, is_parameter_expr, parameter_expr_nodes
from .ops import GraphView, is_reshape, qualified_name

_GEODESIC_CLASS = qualified_name(GeodesicUpdate)
# per-token normalizations: a path through one of them starts a new residual stream
_BOUNDARY_KINDS = set(RESIDUAL_NORM_KINDS) | {"group_norm", "instance_norm", "norm_like"}


@dataclass(eq=False)
class SiteMatch:
    """A residual site in one graph. ``geo(x, sum(branches)) + sum(extras)`` replaces ``output``; ``dead`` are
    the nodes the rewrite makes unused (the sum, inner adds, a DeepNorm scale, a removed norm)."""

    kind: str
    x: fx.Node                      # the update's state operand (``a*x`` when the skip is scaled)
    branches: list
    sum: fx.Node
    norm: NormMatch                 # the norm named in the report
    norms: list                     # every norm the site uses (branch-input, branch-output, removed)
    output: fx.Node
    dead: set = field(default_factory=set)
    block: int = -1
    path: str = ""
    stream: int = 0
    dim: int = -1                   # the stream's feature dimension in the sum's layout
    stream_value: fx.Node | None = None   # the stream state (``x`` without a skip scale), seen through casts
    extras: list = field(default_factory=list)   # terms added after the update (earlier states, injections)
    views: list = field(default_factory=list)    # post: view ops between the sum and its norm, re-applied
    unit: Unit | None = None
    flat_fill: int = 0
    pred: "SiteMatch | None" = None   # the site whose output this site's stream continues (None: a new stream)

    def signature(self) -> tuple:
        return (self.kind, self.norm.kind, self.stream, self.block, self.path)


@dataclass
class Analysis:
    sites: list[SiteMatch] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    blocks_per_stream: list[int] = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        return sum(self.blocks_per_stream)


class _Context:
    """What the analysis of one graph knows about its norms."""

    def __init__(self, view: GraphView, norms: list[NormMatch], geo_nodes: set):
        self.view = view
        self.norms = norms
        self.geo_nodes = geo_nodes
        self.by_source: dict[fx.Node, list[tuple[NormMatch, int]]] = {}
        self.by_output: dict[fx.Node, NormMatch] = {}
        self.norm_nodes: set = set()
        self.boundary: set = set()
        self.constants: dict = {}
        self.notes: dict[int, str] = {}     # id(norm) -> why a candidate using it was rejected
        for n in norms:
            self.norm_nodes |= n.nodes
            if n.kind in _BOUNDARY_KINDS:  # (its own arithmetic, not the views or casts it reads through)
                self.boundary |= {m for m in n.nodes
                                  if view.passthrough_input(m) is None and view.permutation(m) is None}
            if n.feature_norm and not getattr(n, "skip_reason", None):
                self.by_source.setdefault(n.source, []).append((n, n.dim))
                direct = getattr(n, "direct_source", None)
                if direct is not None and direct is not n.source:
                    self.by_source.setdefault(direct, []).append((n, -1))
                if n.output_in_source_layout:
                    self.by_output[view.root(n.output)] = n

    def note(self, norms, reason: str) -> None:
        for n in norms:
            self.notes.setdefault(id(n), reason)

    def is_constant(self, node, depth: int = 0) -> bool:
        """The value depends on no graph input: parameters, buffers, factories and random masks, through
        any ops (shape-only reads do not count)."""
        if not isinstance(node, fx.Node):
            return True
        cached = self.constants.get(node)
        if cached is not None:
            return cached
        if node.op == "get_attr":
            result = True
        elif node.op == "placeholder" or depth > 16:
            result = False
        else:
            result = all(self.is_constant(i, depth + 1) for i in self.view.data_inputs(node))
        self.constants[node] = result
        return result


def analyze(view: GraphView) -> Analysis:
    """Find the residual sites and the skipped norms of one graph, with streams and block indices."""
    geo_nodes = _geodesic_nodes(view)
    norms = find_norms(view, exclude=geo_nodes)
    ctx = _Context(view, norms, geo_nodes)
    tree = ModuleTree(view, not_units=_norm_modules(view, ctx.norm_nodes))
    candidates, residuals = _candidates(ctx)
    sites = _sound(ctx, tree, candidates, residuals)
    blocks = _assign_streams_and_blocks(ctx, sites)
    residual_sums = [] if sites else _residual_sums(ctx)
    skipped = _skips(ctx, sites, residual_sums) + _affine_normalized_sums(ctx, sites)
    return Analysis(sites, skipped, blocks)


def _norm_modules(view: GraphView, norm_nodes: set) -> set[str]:
    """Module paths whose own computation is nothing but normalization (a norm module, shared or not): never a
    block, however often it is applied."""
    other: set[str] = set()
    seen: set[str] = set()
    for node in view.nodes:
        if node.op in ("placeholder", "output", "get_attr") or view.is_shape_only(node):
            continue
        path = view.module_path(node)
        if path:
            seen.add(path)
            if node not in norm_nodes and view.passthrough_input(node) is None:
                other.add(path)
    return seen - other


# ----- candidates --------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Residual:
    """A residual sum ``x + f(x)`` that is not a site (no norm, or not of a GeoNorm kind): what a site
    nested in its branch ``f`` belongs to."""

    sum: fx.Node
    stream_value: fx.Node
    branches: list
    unit: Unit | None = None


def _candidates(ctx: _Context) -> tuple[list[SiteMatch], list[_Residual]]:
    """Every site candidate, and every other residual sum, in graph order."""
    view = ctx.view
    sites, residuals = [], []
    for node in view.nodes:
        if node in ctx.geo_nodes or node in ctx.norm_nodes or not _is_sum(view, node) or _is_inner_add(view, node):
            continue
        _visit(ctx, node, True, sites, residuals)
    sites.sort(key=lambda c: view.index[c.sum])
    residuals.sort(key=lambda r: view.index[r.sum])
    return sites, residuals


def _visit(ctx: _Context, node: fx.Node, flatten: bool, sites: list, residuals: list) -> None:
    """Classify one sum. When its flattened terms form no single step (two streams merging:
    ``towerA(x) + towerB(y)`` whose last steps are inner adds), each inner add is a sum of its own."""
    view = ctx.view
    split = _split(ctx, node, flatten)
    if split is None:
        if flatten:
            ops = view.add_operands(node)
            inner = [op for op in ops if _is_inner_add(view, op)]
            for op in inner:
                _visit(ctx, op, True, sites, residuals)
            if inner:
                _visit(ctx, node, False, sites, residuals)
        return
    site = _kind(ctx, node, *split)
    if site is not None:
        sites.append(site)
    else:
        x, branches = split[0], split[1]
        residuals.append(_Residual(node, x.source, branches))


def _is_sum(view: GraphView, node: fx.Node) -> bool:
    """``a + b`` of two tensors of the output's shape (no broadcasting)."""
    ops = view.add_operands(node)
    return ops is not None and view.same_shape(node, *ops)


def _is_inner_add(view: GraphView, node: fx.Node) -> bool:
    """A sum whose only reader is another sum: a term of a larger sum."""
    users = view.data_users(node)
    return _is_sum(view, node) and len(users) == 1 and _is_sum(view, users[0])


def _terms(view: GraphView, node: fx.Node, inner: set) -> list[fx.Node]:
    out = []
    for op in view.add_operands(node):
        if _is_inner_add(view, op):
            inner.add(op)
            out += _terms(view, op, inner)
        else:
            out.append(op)
    return out


@dataclass
class _Term:
    node: fx.Node
    source: fx.Node                 # the value the term carries, seen through casts
    inner: fx.Node | None = None    # for a scaled term ``a*t``: ``t`` seen through casts
    scale_kind: str = ""            # "number" | "gain"
    operand: fx.Node | None = None  # for a scaled term: the node ``t`` itself (what DeepNorm's update reads)
    scale: fx.Node | None = None    # set when the branches read ``t``, not ``a*t``: a scaled skip


def _term(view: GraphView, node: fx.Node) -> _Term:
    scaled = _scaled_stream(view, node)
    if scaled is not None:
        inner, kind, _gain_nodes = scaled
        return _Term(node, view.root(node), view.root(inner), kind, inner)
    return _Term(node, view.root(node))


def _split(ctx: _Context, total: fx.Node, flatten: bool = True):
    """Split the flattened sum by dataflow into ``(stream term, branches, constants, extras, inner adds)``;
    None when it is not a residual sum (no term is computed from another)."""
    view = ctx.view
    inner: set = set()
    terms = [_term(view, t) for t in (_terms(view, total, inner) if flatten else view.add_operands(total))]

    def feeds(a: _Term, b: _Term) -> bool:
        return any(v is not None and v is not b.source and reaches(view, v, b.node) for v in (a.source, a.inner))

    # a term computed from parameters only is part of the branch sum (a bias), unless the other terms are
    # computed from it (a learned initial state, Perceiver's latents: the stream)
    data = [t for t in terms if not ctx.is_constant(t.node) or any(feeds(t, o) for o in terms if o is not t)]
    if len(data) < 2:
        return None

    sinks = [b for b in data if not any(feeds(b, o) for o in data if o is not b)]
    if not sinks:
        return None
    streams = []
    for b in sinks:
        feeders = [a for a in data if a is not b and feeds(a, b)]
        if not feeders:
            return None       # an independent term (a merge of two towers, an injection): no step
        # the latest feeder, an input-dependent one if any: a parameter term the branch also reads
        # (``x + f(N(x) + b) + b``) is part of the branch, not the stream
        streams.append(max(feeders, key=lambda a: (not ctx.is_constant(a.node), view.index[a.source])))
    x = streams[0]
    if any(s is not x for s in streams):
        return None           # branches of different streams
    branches = [t.node for t in sinks]
    if x.inner is not None and not any(reaches(view, x.source, b) for b in branches):
        x.source, x.scale = x.inner, x.node   # the branches read t: ``a*t`` is a scaled skip
    constants = [t.node for t in terms if t is not x and ctx.is_constant(t.node)]
    extras = [t.node for t in data if t not in sinks and t is not x and not ctx.is_constant(t.node)]
    return x, branches, constants, extras, inner


def _scaled_stream(view: GraphView, term: fx.Node) -> tuple[fx.Node, str, set] | None:
    """For ``a * t`` with ``a`` a number (``"number"``), or a parameter expression of at most one dimension (a
    learnable residual gain, scalar or per channel: ``"gain"``), return ``(t, kind, nodes of the gain)``."""
    scaled = view.scalar_mul_input(term)
    if scaled is not None:
        return scaled[0], "number", set()
    ops = view.mul_operands(term)
    if ops is None:
        return None
    for t, gain in (ops, ops[::-1]):
        if isinstance(t, fx.Node) and isinstance(gain, fx.Node) and gain.op != "placeholder" \
                and is_parameter_expr(view, gain) and view.same_shape(term, t):
            return t, "gain", parameter_expr_nodes(view, gain)
    return None


def _kind(ctx: _Context, total, x: _Term, branches, constants, extras, inner) -> SiteMatch | None:
    """Name the kind of ``total = x + sum(branches) + sum(constants) + sum(extras)``, or None."""
    view = ctx.view
    stream = x.source
    own = ctx.by_source.get(stream, [])
    blocked = set().union(*(n.nodes for n, _ in own)) if own else set()
    through_norms = bool(own) and not any(reaches(view, stream, b, blocked=blocked) for b in branches)
    branch_norms = [(n, d) for n, d in own if any(reaches(view, n.output, b) for b in branches)]
    dead = inner | {total}
    all_branches = branches + constants

    def site(kind, named, norms, output, x_node, removed=None, scale_dead=(), views=()):
        dims = {d for _, d in norms}
        if len(dims) != 1:
            return None  # norms over different dimensions of the stream: no one feature dimension
        return SiteMatch(kind, x_node, all_branches, total, named, [n for n, _ in norms], output,
                         dead | set(scale_dead) | (removed.nodes if removed else set()),
                         dim=dims.pop(), stream_value=stream, extras=extras, views=list(views))

    if through_norms and branch_norms:
        if len(branches) > 1 or _parallel_sum(view, stream, branches[0]):
            return site("parallel", branch_norms[0][0], branch_norms, total, x.node)
        end = _norm_ending(ctx, branches[0])
        if end is not None and end.source is not stream:
            return site("sandwich", branch_norms[0][0], branch_norms + [(end, end.dim)], total,
                        x.node)
        return site("pre", branch_norms[0][0], branch_norms, total, x.node)
    if through_norms or len(branches) > 1:
        return None
    exclusive = None if extras else _exclusive_norm(ctx, total)
    if exclusive is not None:
        norm, dim = exclusive
        views = _views_between(view, total, norm)
        if x.scale is not None and x.scale_kind == "number":
            return site("deepnorm", norm, [(norm, dim)], norm.output, x.operand, norm,
                        scale_dead={x.scale}, views=views)
        if x.scale is not None:
            ctx.note([norm], "post-norm over a learned scale on the skip (a*x + f(x), a a parameter): not DeepNorm's "
                             "constant, so the norm cannot be removed; left as it is")
            return None
    end = _norm_ending(ctx, branches[0])
    if end is not None and end.source is not stream:
        return site("respost", end, [(end, end.dim)], total, x.node)
    if exclusive is not None:
        norm, dim = exclusive
        return site("post", norm, [(norm, dim)], norm.output, x.node, norm, views=_views_between(view, total, norm))
    return None


def _parallel_sum(view: GraphView, stream: fx.Node, branch: fx.Node) -> bool:
    """The branch is itself a sum of two branches that both read the stream: ``x + (f1 + f2)``."""
    ops = view.add_operands(view.root(branch))
    if ops is None:
        return False
    a, b = ops
    return (reaches(view, stream, a) and reaches(view, stream, b)
            and not reaches(view, a, b) and not reaches(view, b, a))


def _norm_ending(ctx: _Context, term: fx.Node) -> NormMatch | None:
    """The norm a branch ends in, seen through casts, dropout, stochastic depth (a product with a random
    per-sample mask) and constant or learned scales (LayerScale)."""
    view = ctx.view
    node = term
    for _ in range(8):
        node = view.root(node)
        norm = ctx.by_output.get(node)
        if norm is not None:
            return norm
        ops = view.mul_operands(node)
        if ops is None:
            ops = _div_operands(view, node)
        if ops is None:
            return None
        a, b = ops
        if isinstance(a, fx.Node) and (not isinstance(b, fx.Node) or ctx.is_constant(b)):
            node = a
        elif isinstance(b, fx.Node) and (not isinstance(a, fx.Node) or ctx.is_constant(a)):
            node = b
        else:
            return None
    return None


def _div_operands(view: GraphView, node: fx.Node):
    if view.is_div(node) and len(node.args) == 2:
        return node.args[0], node.args[1]
    return None


def _exclusive_norm(ctx: _Context, total: fx.Node) -> tuple[NormMatch, int] | None:
    """The feature norm that is the only reader of ``total`` (seen through casts and views) and gives its
    result in the stream's layout, if any."""
    view = ctx.view
    for norm, dim in ctx.by_source.get(total, []):
        if not norm.output_in_source_layout:
            continue
        # every reader of the sum, and of the casts/views the norm reads it through, is the norm's own
        frontier, ok = [total], bool(view.data_users(total))
        while frontier and ok:
            node = frontier.pop()
            for user in view.data_users(node):
                if user not in norm.nodes:
                    ok = False
                elif view.passthrough_input(user) is node:
                    frontier.append(user)
        if ok:
            return norm, dim
    return None


def _views_between(view: GraphView, total: fx.Node, norm: NormMatch) -> list[fx.Node]:
    """The shape-changing views from ``total`` to the norm's input (``(B, T, d) -> (B*T, d)``), in order."""
    chain = []
    node = norm.input
    while node is not total and isinstance(node, fx.Node):
        src = view.passthrough_input(node)
        if src is None:
            return []
        if view.shape(node) != view.shape(src) and not view.is_cast(node):
            chain.append(node)
        node = src
    return chain[::-1]


def reaches(view: GraphView, src: fx.Node, target: fx.Node, blocked: set | frozenset = frozenset()) -> bool:
    """True when a data path leads from ``src`` to ``target`` avoiding ``blocked`` nodes.

    The walk never goes past ``target`` in graph order, so its cost is bounded by the region between
    the two nodes (one block for a residual site), which keeps the pass linear in the graph size.
    """
    if src is target:
        return True
    limit = view.index[target]
    if view.index[src] > limit:
        return False
    stack = [src]
    seen = {src}
    while stack:
        for user in view.data_users(stack.pop()):
            if user is target:
                return True
            if user in seen or user in blocked or view.index[user] > limit:
                continue
            seen.add(user)
            stack.append(user)
    return False


# ----- soundness -----------------------------------------------------------------------------------------

OUTSIDE_REASON = ("outside the repeated blocks (a head, pooling head, position/embedding norm or final norm): "
                  "not a step of the residual stream of a stack of blocks")


def _sound(ctx: _Context, tree: ModuleTree, candidates: list[SiteMatch], residuals: list[_Residual]) \
        -> list[SiteMatch]:
    """Keep the candidates that are steps of a residual stream of a stack of blocks (module docstring)."""
    view = ctx.view
    for c in candidates:
        c.unit = tree.unit(c.sum) or tree.common_unit(
            [view.root(b) for b in c.branches if isinstance(b, fx.Node)] + [n.output for n in c.norms])
    for r in residuals:
        r.unit = tree.unit(r.sum) or tree.common_unit([view.root(b) for b in r.branches])
    if any(c.unit is not None for c in candidates):
        for c in candidates:
            if c.unit is None:
                ctx.note(c.norms, OUTSIDE_REASON)
        candidates = [c for c in candidates if c.unit is not None]
    candidates = _resolve_nesting(ctx, candidates, residuals)
    return [c for c in candidates if c.kind not in ("post", "deepnorm") or _sound_post(ctx, tree, c, candidates)]


def _inside(view: GraphView, c: SiteMatch, d) -> bool:
    """``c`` is computed inside the branch of ``d``: after ``d``'s stream, from it, and feeding a branch."""
    start, end = view.index[view.root(d.stream_value)], view.index[d.sum]
    return (c is not d and start < view.index[c.sum] < end and reaches(view, d.stream_value, c.sum)
            and any(reaches(view, view.root(c.output), b) for b in d.branches if isinstance(b, fx.Node)))


def _resolve_nesting(ctx: _Context, candidates: list[SiteMatch], residuals: list[_Residual]) -> list[SiteMatch]:
    """A candidate ``c`` computed inside the branch of a residual sum ``d`` (a candidate or not):

    - ``d``'s branch is ``c``'s stream carried along (views, casts, scales, adds) from ``d``'s own stream:
      ``d`` merges two states of one stream (``N(h + stack(h))``); ``c`` stands and a candidate ``d`` is not a
      step;
    - ``c`` lies in a repeated unit inside ``d``'s (a stack of blocks inside a wrapper, Swin2SR's stage
      residual): the stack's steps stand, a candidate ``d`` is a skip connection around them;
    - otherwise ``c`` is part of ``d``'s branch ``f`` (a norm inside a branch is part of it) when both lie in
      one block; between two candidates in different or unknown blocks nothing tells which is the step, and
      both abstain.
    """
    view = ctx.view
    dropped: set = set()
    positions = [view.index[c.sum] for c in candidates]   # candidates come in graph order
    for d in list(candidates) + list(residuals):
        is_site = isinstance(d, SiteMatch)
        lo = bisect.bisect_right(positions, view.index[view.root(d.stream_value)])
        hi = bisect.bisect_left(positions, view.index[d.sum])
        for c in candidates[lo:hi]:   # only candidates between d's stream and d's sum can be inside it
            if id(c) in dropped or not _inside(view, c, d):
                continue
            if _carries_stream(ctx, d.stream_value, c.stream_value) and any(
                    _carries_stream(ctx, view.root(c.output), view.root(b)) for b in d.branches if isinstance(b, fx.Node)):
                if is_site:
                    dropped.add(id(d))
                    ctx.note(d.norms, "its branch carries the residual stream itself (a skip connection around "
                                      f"the step at {c.sum.name}): not a step")
            elif _stack_inside(view, c, d):
                if is_site:  # a stack of blocks inside the branch of a wrapper: the stack's steps stand
                    dropped.add(id(d))
                    ctx.note(d.norms, f"wraps a stack of blocks ({c.unit.path}, ...) in its branch: the blocks' "
                                      "sites are the steps of the stream, this add is a skip connection around them")
            elif c.unit == d.unit:
                dropped.add(id(c))
                ctx.note(c.norms, f"inside the branch f of the residual add {d.sum.name} "
                                  f"({d.unit.path if d.unit else 'same module'}): a norm inside a branch is part of it")
            elif is_site:
                dropped |= {id(c), id(d)}
                ctx.note(c.norms + d.norms, f"a residual add ({c.sum.name}) inside the branch of another "
                                            f"({d.sum.name}) in a different or unknown block: which one is the "
                                            "step of the stream is ambiguous, so neither is rewritten")
    return [c for c in candidates if id(c) not in dropped]


def _stack_inside(view: GraphView, c: SiteMatch, d) -> bool:
    """``c`` lies in a block of a stack inside ``d``'s block: in an inner repeated unit, or in an element of a
    ModuleList/Sequential below ``d``'s unit whose call does not also compute ``d`` (a one-layer stage of
    Swin2SR, not EdgeNeXt's SDTA block, whose own residual wraps the inner one)."""
    if c.unit is not None and c.unit != d.unit and (d.unit is None or c.unit.path.startswith(d.unit.path + ".")):
        return True
    prefix = d.unit.path + "." if d.unit is not None else ""
    around_d = {key for key, _p, _c in view.module_stack(d.sum)}   # modules whose call computes d itself
    return any(path.startswith(prefix) and path.rsplit(".", 1)[-1].isdigit() and key not in around_d
               for key, path, _c in view.module_stack(c.sum))


def _carries_stream(ctx: _Context, src: fx.Node, dst: fx.Node) -> bool:
    """``dst`` is the value ``src`` carried along by value-preserving ops, views of any shape, axis
    permutations, scales and adds (the stream between two steps), not by any other computation."""
    view = ctx.view
    frontier, seen = [dst], {dst}
    while frontier:
        node = frontier.pop()
        if node is src:
            return True
        if view.index[node] < view.index[src] or node in ctx.boundary:
            continue
        nxt = []
        through = view.passthrough_input(node)
        perm = view.permutation(node)
        scaled = _scaled_stream(view, node)
        if through is not None:
            nxt = [through]
        elif perm is not None:
            nxt = [perm[0]]
        elif scaled is not None:
            nxt = [scaled[0]]
        elif view.add_operands(node) is not None:
            nxt = list(view.add_operands(node))
        elif is_reshape(node) and node.args and isinstance(node.args[0], fx.Node):
            nxt = [node.args[0]]
        for n in nxt:
            if isinstance(n, fx.Node) and n not in seen:
                seen.add(n)
                frontier.append(n)
    return False


def _sound_post(ctx: _Context, tree: ModuleTree, c: SiteMatch, candidates: list[SiteMatch]) -> bool:
    """A post/deepnorm norm is removed, so it must be the stream's own step: inside the sum's block, the
    stream not read after the step, and (without module information) a consistent stream."""
    view = ctx.view
    sum_unit = tree.unit(c.sum)
    core = [n for n in c.norm.nodes if view.module_path(n) == c.norm.path] or [c.norm.output]
    if sum_unit is not None and not any(tree.contains(sum_unit, n) for n in core):
        ctx.note([c.norm], f"reads the residual sum of the block {sum_unit.path} from outside that block (a final "
                           "or head norm, or the next block's input norm): not a post-norm step of this block, left "
                           "as it is")
        return False
    later = _readers_after_step(ctx, c, candidates)
    if later:
        ctx.note([c.norm], f"the stream x of {c.sum.name} is still read after the step (by {later[0].name}): "
                           "the norm does not produce the next state of that stream, so it is not removed")
        return False
    if sum_unit is None:
        before = view.root(c.stream_value)
        prev = next((p for p in candidates if view.root(p.output) is before), None)
        if prev is None and _is_residual_sum(ctx, before):
            nxt = any(view.root(p.stream_value) is view.root(c.output) for p in candidates if p is not c)
            if not nxt:
                ctx.note([c.norm], "follows a residual step that is not a post-norm site and feeds no further "
                                   "step (a final norm after norm-free blocks): not a post-norm step")
                return False
        elif prev is not None and prev.kind not in ("post", "deepnorm"):
            nxt = any(view.root(p.stream_value) is view.root(c.output) for p in candidates if p is not c)
            if not nxt:
                ctx.note([c.norm], f"follows the {prev.kind} site at {prev.sum.name} and feeds no further step "
                                   "(a final norm): not a post-norm step")
                return False
    return True


def _readers_after_step(ctx: _Context, c: SiteMatch, candidates: list[SiteMatch]) -> list[fx.Node]:
    """Readers of the stream state ``x`` (through casts and views) outside the step that feed the model's
    computation: not the sum, not in a branch, not a value that only reaches the graph's output (a returned
    hidden state, a cached memory) without reaching a norm or a later step."""
    view = ctx.view
    later_steps = [p.sum for p in candidates if view.index[p.sum] > view.index[c.sum]]

    def observed_only(user) -> bool:
        return not any(reaches(view, user, t) for t in later_steps) and \
            not any(reaches(view, user, n.output) for n in ctx.norms if view.index[n.output] > view.index[user])
    base = view.root(c.stream_value)
    step_nodes = {c.sum} | set(c.dead)
    out = []
    frontier, seen = [base], {base}
    while frontier:
        node = frontier.pop()
        for user in view.data_users(node):
            if user in seen or user in step_nodes or user.op == "output" or not user.users:
                continue  # (a read whose result nobody uses, e.g. torch.export's input guards, changes nothing)
            seen.add(user)
            if view.passthrough_input(user) is node or view.permutation(user) is not None:
                frontier.append(user)
                continue
            if any(reaches(view, user, b) for b in c.branches if isinstance(b, fx.Node)) or observed_only(user):
                continue
            out.append(user)
    return out


def _is_residual_sum(ctx: _Context, node: fx.Node) -> bool:
    view = ctx.view
    if not _is_sum(view, node):
        return False
    a, b = view.add_operands(node)
    ra, rb = view.root(a), view.root(b)
    return (reaches(view, ra, b) or reaches(view, rb, a)) and not (ctx.is_constant(a) or ctx.is_constant(b))


# ----- streams and blocks --------------------------------------------------------------------------------


def _assign_streams_and_blocks(ctx: _Context, sites: list[SiteMatch]) -> list[int]:
    """Set ``stream``, ``block`` and ``path`` of every site; return the number of blocks per stream.

    A site continues the stream of the latest site whose output reaches its ``x`` along a path through no
    per-token norm, when both have the same feature size (GEONORM.md section 4: a new stream starts where every
    path from the old one passes a norm or changes the feature size). Its block is that site's block when both
    lie in the same application of one unit, else the next one: block indices count blocks along the chain,
    so two heads after one trunk both continue its numbering. Without module information two sites make a
    block (one parallel site fills it).
    """
    view = ctx.view
    by_output = {view.root(s.output): s for s in sites}
    carrier: dict[fx.Node, SiteMatch | None] = {}
    for node in view.nodes:
        site = by_output.get(node)
        if site is not None:
            carrier[node] = site
            continue
        if node in ctx.boundary or node in ctx.geo_nodes:
            carrier[node] = None
            continue
        best = None
        reshapes = view.passthrough_input(node) is not None or view.permutation(node) is not None \
            or is_reshape(node)
        for i in view.data_inputs(node):
            c = carrier.get(i)
            if c is None or not (reshapes or _same_size_last(view, i, node)):
                continue  # (a projection or concatenation that changes the feature size ends the stream)
            if best is None or view.index[c.sum] > view.index[best.sum]:
                best = c
        carrier[node] = best
    n_streams = 0
    blocks: list[int] = []
    for site in sites:
        pred = carrier.get(view.root(site.stream_value))
        need = 2 if site.kind == "parallel" else 1
        if pred is not None and pred is not site and _same_feature_size(view, pred, site):
            site.pred = pred
            site.stream = pred.stream
            if site.unit is not None and site.unit == pred.unit:
                site.block = pred.block
            elif site.unit is None and pred.unit is None and pred.flat_fill + need <= 2:
                site.block, site.flat_fill = pred.block, pred.flat_fill + need
            else:
                site.block, site.flat_fill = pred.block + 1, need
        else:
            site.stream, site.block, site.flat_fill = n_streams, 0, need
            n_streams += 1
            blocks.append(0)
        site.path = site.unit.path if site.unit is not None else ""
        blocks[site.stream] = max(blocks[site.stream], site.block + 1)
    return blocks


def _same_size_last(view: GraphView, a: fx.Node, b: fx.Node) -> bool:
    la, lb = view.last_dim(a), view.last_dim(b)
    return la is None or lb is None or str(la) == str(lb)


def _same_feature_size(view: GraphView, a: SiteMatch, b: SiteMatch) -> bool:
    sa, sb = view.shape(a.sum), view.shape(b.sum)
    if not sa or not sb:
        return True
    return str(sa[a.dim]) == str(sb[b.dim])


# ----- what is left, and why ------------------------------------------------------------------------------


def _geodesic_nodes(view: GraphView) -> set:
    """Nodes that implement an existing geodesic update (a converted model captured again)."""
    return {node for node in view.nodes
            if isinstance(view.module(node), GeodesicUpdate) or view.inside_module_class(node, [_GEODESIC_CLASS])}


AFFINE_REASON = ("elementwise affine in place of a norm (x * w + b, e.g. MobileBERT's NoNorm) reads the residual "
                 "sum x + f(x): it does not normalize, so this is not a GeoNorm site")


def _residual_sums(ctx: _Context) -> list[fx.Node]:
    """Sums in which one term reaches another input-dependent term (residual adds of any kind)."""
    view = ctx.view
    out = []
    for node in view.nodes:
        if node in ctx.geo_nodes or node in ctx.norm_nodes or not _is_sum(view, node) or _is_inner_add(view, node):
            continue
        terms = [t for t in _terms(view, node, set()) if not ctx.is_constant(t)]
        if len(terms) > 1 and any(reaches(view, view.root(x), b) for x in terms for b in terms if b is not x):
            out.append(node)
    return out


def _elementwise_affine(view: GraphView, node: fx.Node) -> fx.Node | None:
    """If the only reader of ``node`` is ``node * w + b`` with ``w`` and ``b`` learnt per-channel vectors
    (a norm's affine without the normalization), return the ``+ b`` node."""
    def only_reader(n):
        users = view.data_users(n)
        return users[0] if len(users) == 1 else None

    def per_channel(p, n):
        shape = view.shape(p)
        return (isinstance(p, fx.Node) and p.op != "placeholder" and is_parameter_expr(view, p)
                and shape is not None and len(shape) == 1 and view.last_dim(n) is not None
                and str(shape[0]) == str(view.last_dim(n)))

    mul = only_reader(node)
    ops = view.mul_operands(mul) if mul is not None else None
    gain = None if ops is None else ops[1] if ops[0] is node else ops[0] if ops[1] is node else None
    if not per_channel(gain, node):
        return None
    add = only_reader(mul)
    ops = view.add_operands(add) if add is not None else None
    bias = None if ops is None else ops[1] if ops[0] is mul else ops[0] if ops[1] is mul else None
    return add if per_channel(bias, node) else None


def _affine_normalized_sums(ctx: _Context, sites: list) -> list[Skip]:
    """Residual sums whose only reader is an elementwise affine ``x * w + b`` with learnt per-channel ``w``,
    ``b``, standing where a post-norm would: listed so the report says why they are left."""
    view = ctx.view
    used = {s.sum for s in sites}
    out = []
    for node in view.nodes:
        if node in used or node in ctx.geo_nodes or node in ctx.norm_nodes or not _is_sum(view, node) \
                or _is_inner_add(view, node):
            continue
        affine = _elementwise_affine(view, node)
        if affine is None:
            continue
        terms = _terms(view, node, set())
        if any(all(reaches(view, view.root(x), b) for b in terms[:i] + terms[i + 1:]) for i, x in enumerate(terms)):
            out.append(Skip(reason=AFFINE_REASON, node=affine.name, path=view.module_path(affine)))
    return out


def _skips(ctx: _Context, sites: list[SiteMatch], residual_sums: list) -> list[Skip]:
    view = ctx.view
    used = {id(n) for s in sites for n in s.norms}
    stream_values = {view.root(s.stream_value) for s in sites} | {view.root(s.output) for s in sites}
    continued = {id(s.pred) for s in sites if s.pred is not None}
    last_values = {view.root(s.output) for s in sites if id(s) not in continued}
    first_inputs = {view.root(s.stream_value) for s in sites if s.pred is None}
    geo_inputs = {view.root(i) for g in ctx.geo_nodes for i in view.data_inputs(g)}
    skipped = []
    for norm in ctx.norms:
        if id(norm) in used:
            continue
        own_reason = getattr(norm, "skip_reason", None)
        if own_reason:
            reason = own_reason
        elif norm.kind not in RESIDUAL_NORM_KINDS:
            reason = (f"{norm.kind.replace('_', ' ')} normalizes over {norm.over}, not the feature dimension: "
                      "residual blocks around it (ResNet-style) are left alone")
        elif not norm.feature_norm:
            reason = f"normalizes over {norm.over}, not over one feature dimension: not a residual-stream norm"
        elif norm.source in geo_inputs:
            reason = "branch-input norm of an existing geodesic update: the model is already converted"
        elif id(norm) in ctx.notes:
            reason = ctx.notes[id(norm)]
        elif _reads_any(view, norm, last_values):
            reason = "final norm: reads the residual stream after the last block (before the head)"
        elif _reads_any(view, norm, stream_values):
            reason = "reads the residual stream but takes no part in a residual update (e.g. a side head)"
        elif any(view.root(norm.output) is first or reaches(view, norm.output, first) for first in first_inputs):
            reason = ("embedding norm: normalizes the input of the first block of a residual stream (an "
                      "embedding, or a stage boundary such as patch merging), not a residual update")
        elif not sites and any(reaches(view, norm.output, r) for r in residual_sums):
            reason = ("feeds a residual add x + f(...) without normalizing its stream x: the branch input is "
                      "derived from x first (e.g. hyper-connections or attention over earlier layers mix "
                      "several streams before the norm, or a norm inside the branch), so it is not a GeoNorm site")
        elif not sites:
            reason = "no residual add x + f(x) reads or feeds it"
        else:
            reason = ("off the residual stream: it normalizes a value computed inside a branch "
                      "(e.g. a QK-norm or a norm inside an MLP)")
        skipped.append(Skip(reason=reason, node=norm.name, path=norm.path))
    return skipped


def _reads_any(view: GraphView, norm: NormMatch, values: set) -> bool:
    direct = getattr(norm, "direct_source", None)
    return norm.source in values or (direct is not None and direct in values)
