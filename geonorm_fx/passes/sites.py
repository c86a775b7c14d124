"""Residual-stream analysis: which sums are residual updates, of which kind, in which block.

A residual sum is ``x + s_1 + ... + s_m`` (any association: nested adds whose only reader is the next
add are flattened into terms) in which one term, the stream ``x`` (or ``a * x`` for DeepNorm),
reaches every other term through data edges; shape-only reads do not count. With ``N`` a LayerNorm
or RMSNorm over the last dimension (GEONORM.md section 4):

- ``pre``:      every data path from ``x`` to the branches passes through a norm of ``x``: ``x + f(N(x))``
- ``sandwich``: as ``pre``, and the branch ends in a norm:  ``x + N2(f(N1(x)))``
- ``parallel``: as ``pre``, with two or more branches:    ``x + f1(N1(x)) + f2(N2(x))``
- ``respost``:  ``x`` feeds the branch directly and the branch ends in a norm:  ``x + N(f(x))``
- ``post``:     ``x`` feeds the branch directly and the sum is read only by a norm:  ``N(x + f(x))``
- ``deepnorm``: ``post`` with a constant-scaled stream:  ``N(a*x + f(x))``

A scaled stream ``a*x`` in a ``pre``/``sandwich``/``parallel``/``respost`` sum, ``a`` a number (depth-scaled
residuals ``a*x + c*N2(f(N1(x)))``) or a learnable gain of at most one dimension (``w * x + f(N(x))``), is
the same site with ``a`` dropped: the update keeps ``|x|`` (a dropped gain is a removed parameter).

Streams: a site whose ``x`` is not downstream of an earlier site's output starts a new residual
stream (the decoder of an encoder-decoder). Blocks are numbered per stream in order of application:
sites are grouped by the innermost module invocation on their module stack that is one of several
invocations of the same class under one parent (a repeated layer; a shared layer applied n times is n
invocations); without such module information two sites make a block (one for parallel sites).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import fx

from ..geodesic import GeodesicUpdate
from ..report import Skip
from .norms import RESIDUAL_NORM_KINDS, NormMatch, find_norms, is_parameter_expr, parameter_expr_nodes
from .ops import GraphView, qualified_name

_GEODESIC_CLASS = qualified_name(GeodesicUpdate)


@dataclass(eq=False)
class SiteMatch:
    """A residual site in one graph. ``geo(x, sum(branches))`` replaces ``output``; ``dead`` are the
    nodes the rewrite makes unused (the sum, inner adds, a DeepNorm scale, a removed norm)."""

    kind: str
    x: fx.Node
    branches: list
    sum: fx.Node
    norm: NormMatch                 # the norm named in the report
    norms: list                     # every norm the site uses (branch-input, branch-output, removed)
    output: fx.Node
    dead: set = field(default_factory=set)
    block: int = -1
    path: str = ""
    stream: int = 0
    dim: int = -1                   # the stream's feature dimension, over which the norms normalize

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


@dataclass
class _Context:
    view: GraphView
    by_source: dict
    by_output: dict
    blocked_nodes: set
    constants: dict = field(default_factory=dict)


def analyze(view: GraphView) -> Analysis:
    """Find the residual sites and the skipped norms of one graph, with streams and block indices."""
    geo_nodes = _geodesic_nodes(view)
    norms = find_norms(view, exclude=geo_nodes)
    ctx = _Context(view, defaultdict(list), {}, set())
    for n in norms:
        ctx.blocked_nodes |= n.nodes
        if n.feature_norm:
            ctx.by_source[n.source].append(n)
            if n.output_in_source_layout:
                ctx.by_output[view.root(n.output)] = n
    sites = []
    for node in view.nodes:
        if node in geo_nodes or node in ctx.blocked_nodes or not _is_sum(view, node) or _is_inner_add(view, node):
            continue
        site = _classify(ctx, node)
        if site is not None:
            sites.append(site)
    blocks = _assign_streams_and_blocks(view, sites)
    residual_sums = [] if sites else _residual_sums(ctx, geo_nodes)
    skipped = _skips(view, norms, sites, geo_nodes, residual_sums) + _affine_normalized_sums(ctx, sites, geo_nodes)
    return Analysis(sites, skipped, blocks)


AFFINE_REASON = ("elementwise affine in place of a norm (x * w + b, e.g. MobileBERT's NoNorm) reads the residual "
                 "sum x + f(x): it does not normalize, so this is not a GeoNorm site")


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


def _residual_sums(ctx: _Context, geo_nodes: set) -> list[fx.Node]:
    """Sums in which one term reaches every other input-dependent term (residual adds of any kind)."""
    view = ctx.view
    out = []
    for node in view.nodes:
        if node in geo_nodes or node in ctx.blocked_nodes or not _is_sum(view, node) or _is_inner_add(view, node):
            continue
        terms = [t for t in _terms(view, node, set()) if not _is_constant(ctx, t)]
        if len(terms) > 1 and any(all(reaches(view, view.root(x), b) for b in terms[:i] + terms[i + 1:])
                                  for i, x in enumerate(terms)):
            out.append(node)
    return out


def _affine_normalized_sums(ctx: _Context, sites: list, geo_nodes: set) -> list[Skip]:
    """Residual sums (one term reaches every other) whose only reader is an elementwise affine
    ``x * w + b`` with learnt per-channel ``w``, ``b``, standing where a post-norm would: listed so the
    report says why they are left."""
    view = ctx.view
    used = {s.sum for s in sites}
    out = []
    for node in view.nodes:
        if node in used or node in geo_nodes or node in ctx.blocked_nodes or not _is_sum(view, node) \
                or _is_inner_add(view, node):
            continue
        affine = _elementwise_affine(view, node)
        if affine is None:
            continue
        terms = _terms(view, node, set())
        if any(all(reaches(view, view.root(x), b) for b in terms[:i] + terms[i + 1:])
               for i, x in enumerate(terms)):
            out.append(Skip(reason=AFFINE_REASON, node=affine.name, path=view.module_path(affine)))
    return out


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


def _classify(ctx: _Context, total: fx.Node) -> SiteMatch | None:
    view = ctx.view
    inner: set = set()
    terms = _terms(view, total, inner)
    for i, term in enumerate(terms):
        branches = terms[:i] + terms[i + 1:]
        candidates = [(term, None)]
        scaled = _scaled_stream(view, term)
        if scaled is not None:
            candidates.append((scaled[0], term))
        # terms computed from parameters only (a bias expanded to the stream's shape) are part of the
        # branch sum ``s`` but need not depend on ``x``; at least one term must
        data = [b for b in branches if not _is_constant(ctx, b)]
        for x, scale_node in candidates:
            stream = view.root(x)
            if data and all(reaches(view, stream, b) for b in data):
                extra = scaled[1] if scale_node is not None else set()
                return _kind(ctx, total, x, branches, scale_node, inner | extra, data)
    return None


def _is_constant(ctx: _Context, node, depth: int = 0) -> bool:
    """The value depends on no graph input: parameters, buffers and factories, through any ops
    (shape-only reads do not count)."""
    if not isinstance(node, fx.Node):
        return True
    cached = ctx.constants.get(node)
    if cached is not None:
        return cached
    if node.op == "get_attr":
        result = True
    elif node.op == "placeholder" or depth > 16:
        result = False
    else:
        result = all(_is_constant(ctx, i, depth + 1) for i in ctx.view.data_inputs(node))
    ctx.constants[node] = result
    return result


def _scaled_stream(view: GraphView, term: fx.Node) -> tuple[fx.Node, set] | None:
    """For ``a * t`` with ``a`` a number, or a parameter expression (a learnable residual gain, scalar or
    per channel: ``w * t``, ``w.to(dtype) * t``) of at most one dimension, return ``(t, nodes of the gain
    expression)``; the gain goes away with the sum it scales."""
    scaled = view.scalar_mul_input(term)
    if scaled is not None:
        return scaled[0], set()
    ops = view.mul_operands(term)
    if ops is None:
        return None
    for t, gain in (ops, ops[::-1]):
        if isinstance(t, fx.Node) and isinstance(gain, fx.Node) and gain.op != "placeholder" \
                and is_parameter_expr(view, gain) and view.same_shape(term, t):
            return t, parameter_expr_nodes(view, gain)
    return None


def _kind(ctx: _Context, total, x, branches, scale_node, inner, data=None) -> SiteMatch | None:
    """Classify ``total = x + sum(branches)``; ``data`` are the branches that depend on the inputs (the
    others are parameter-only terms such as a bias, carried along in ``s``)."""
    view = ctx.view
    all_branches, branches = branches, (data if data is not None else branches)
    stream = view.root(x)
    own = ctx.by_source.get(stream, [])
    blocked = set().union(*(n.nodes for n in own)) if own else set()
    through_norms = bool(own) and not any(reaches(view, stream, b, blocked=blocked) for b in branches)
    branch_norms = [n for n in own if any(reaches(view, n.output, b) for b in branches)]
    out_norm = ctx.by_output.get(view.root(branches[0])) if len(branches) == 1 else None
    exclusive = _exclusive_norm(ctx, total)
    dead = inner | {total} | ({scale_node} if scale_node is not None else set())

    def site(kind, named, norms, output, removed=None):
        dims = {n.dim for n in norms}
        if len(dims) != 1:
            return None  # norms over different dimensions of the stream: no one feature dimension
        return SiteMatch(kind, x, all_branches, total, named, norms, output,
                         dead | (removed.nodes if removed else set()), dim=dims.pop())

    # A scaled stream ``a*x + s`` (depth-scaled residuals, learnable residual gains): the update keeps
    # ``|x|``, so ``a`` is dropped as for DeepNorm; factors on the branches stay part of ``s``.
    if through_norms and branch_norms:
        if len(branches) > 1 or _parallel_sum(view, stream, branches[0]):
            return site("parallel", branch_norms[0], branch_norms, total)
        if out_norm is not None and out_norm.source is not stream:
            return site("sandwich", branch_norms[0], branch_norms + [out_norm], total)
        return site("pre", branch_norms[0], branch_norms, total)
    if through_norms or len(branches) > 1:
        return None
    if scale_node is not None and exclusive is not None:
        return site("deepnorm", exclusive, [exclusive], exclusive.output, exclusive)
    if out_norm is not None and out_norm.source is not stream:
        return site("respost", out_norm, [out_norm], total)
    if exclusive is not None and scale_node is None:
        return site("post", exclusive, [exclusive], exclusive.output, exclusive)
    return None


def _parallel_sum(view: GraphView, stream: fx.Node, branch: fx.Node) -> bool:
    """The branch is itself a sum of two branches that both read the stream: ``x + (f1 + f2)``."""
    ops = view.add_operands(view.root(branch))
    if ops is None:
        return False
    a, b = ops
    return (reaches(view, stream, a) and reaches(view, stream, b)
            and not reaches(view, a, b) and not reaches(view, b, a))


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


def _exclusive_norm(ctx: _Context, total: fx.Node) -> NormMatch | None:
    """The feature norm that is the only reader of ``total`` (seen through casts) and gives its result in
    the stream's layout, if any."""
    for norm in ctx.by_source.get(total, []):
        users = ctx.view.data_users(total)
        if norm.output_in_source_layout and users and all(u in norm.nodes for u in users):
            return norm
    return None


def _geodesic_nodes(view: GraphView) -> set:
    """Nodes that implement an existing geodesic update (a converted model captured again)."""
    return {node for node in view.nodes
            if isinstance(view.module(node), GeodesicUpdate) or view.inside_module_class(node, [_GEODESIC_CLASS])}


def _assign_streams_and_blocks(view: GraphView, sites: list[SiteMatch]) -> list[int]:
    """Set ``site.stream`` / ``site.block`` / ``site.path``; return the number of blocks per stream."""
    last_output: list[fx.Node] = []   # per stream, the latest site output
    for site in sites:
        start = view.root(site.x)
        upstream = [s for s, out in enumerate(last_output) if out is start or reaches(view, out, start)]
        if upstream:
            site.stream = max(upstream, key=lambda s: view.index[last_output[s]])
            last_output[site.stream] = view.root(site.output)
        else:
            site.stream = len(last_output)
            last_output.append(view.root(site.output))
    return [_assign_blocks(view, [s for s in sites if s.stream == k]) for k in range(len(last_output))]


def _assign_blocks(view: GraphView, sites: list[SiteMatch]) -> int:
    chains = [view.module_stack(site.sum) for site in sites]
    siblings: dict[tuple, set] = defaultdict(set)
    for chain in chains:
        parent = None
        for key, _path, cls in chain:
            siblings[(parent, cls)].add(key)
            parent = key
    block = -1
    previous: object = object()
    room = 0
    for site, chain in zip(sites, chains):
        unit = None
        parent = None
        for key, path, cls in chain:
            if len(siblings[(parent, cls)]) >= 2:
                unit = (key, path)
            parent = key
        if unit is None:  # no module structure: two sites a block, one for a parallel block
            need = 2 if site.kind == "parallel" else 1
            if previous is not None or room < need:
                block += 1
                room = 2
            room -= need
        elif unit != previous:
            block += 1
        previous = unit
        site.block = block
        site.path = unit[1] if unit else ""
    return block + 1


def _skips(view: GraphView, norms: list[NormMatch], sites: list[SiteMatch], geo_nodes: set,
           residual_sums: list = ()) -> list[Skip]:
    used = {id(n) for s in sites for n in s.norms}
    stream_values = {view.root(s.x) for s in sites} | {view.root(s.output) for s in sites}
    first_of_stream: dict[int, SiteMatch] = {}
    last_of_stream: dict[int, SiteMatch] = {}
    for s in sites:
        first_of_stream.setdefault(s.stream, s)
        last_of_stream[s.stream] = s
    last_values = {view.root(s.output) for s in last_of_stream.values()}
    first_inputs = {view.root(s.x) for s in first_of_stream.values()}
    geo_inputs = {view.root(i) for g in geo_nodes for i in view.data_inputs(g)}
    skipped = []
    for norm in norms:
        if id(norm) in used:
            continue
        if norm.kind not in RESIDUAL_NORM_KINDS:
            reason = (f"{norm.kind.replace('_', ' ')} normalizes over {norm.over}, not the last dimension: "
                      "residual blocks around it (ResNet-style) are left alone")
        elif not norm.feature_norm:
            reason = f"normalizes over {norm.over}, not over one feature dimension: not a residual-stream norm"
        elif norm.source in geo_inputs:
            reason = "branch-input norm of an existing geodesic update: the model is already converted"
        elif norm.source in last_values:
            reason = "final norm: reads the residual stream after the last block (before the head)"
        elif norm.source in stream_values:
            reason = "reads the residual stream but takes no part in a residual update (e.g. a side head)"
        elif any(view.root(norm.output) is first or reaches(view, norm.output, first) for first in first_inputs):
            reason = "embedding norm: normalizes the input of the first block, not a residual update"
        elif not sites and any(reaches(view, norm.output, r) for r in residual_sums):
            reason = ("feeds a residual add x + f(...) without normalizing its stream x: the branch input is "
                      "derived from x first (e.g. hyper-connections or attention over earlier layers mix "
                      "several streams before the norm), so it is not a GeoNorm site")
        elif not sites:
            reason = "no residual add x + f(x) reads or feeds it"
        else:
            reason = ("off the residual stream: it normalizes a value computed inside a branch "
                      "(e.g. a QK-norm or a norm inside an MLP)")
        skipped.append(Skip(reason=reason, node=norm.name, path=norm.path))
    return skipped
