"""Residual-stream analysis: which adds are residual updates, of which kind, in which block.

A residual add is ``a = x + s`` where the branch output ``s`` depends on the stream value ``x``
through data edges (shape-only reads do not count). It is a site when a last-dim norm takes part:

- ``pre``:  every data path from ``x`` to ``s`` passes through a norm of ``x``  (``x + f(N(x))``);
- ``post``: ``a`` is read by nothing but a norm  (``N(x + f(x))``).

Block indices follow the order of application: sites are grouped by the innermost module invocation
on their module stack that is one of several invocations of the same class under one parent (a
repeated layer); without such module information, two sites make a block.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import fx

from ..geodesic import GeodesicUpdate
from ..report import Skip
from .norms import NormMatch, find_norms
from .ops import GraphView, qualified_name

_GEODESIC_CLASS = qualified_name(GeodesicUpdate)


@dataclass(eq=False)
class SiteMatch:
    """A residual site in one graph: ``output`` carries the stream value after the update."""

    kind: str
    x: fx.Node
    s: fx.Node
    add: fx.Node
    norm: NormMatch
    output: fx.Node
    block: int = -1
    path: str = ""
    stream: int = 0

    def signature(self) -> tuple:
        return (self.kind, self.norm.kind, self.block, self.path)


@dataclass
class Analysis:
    sites: list[SiteMatch] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    n_blocks: int = 0


def analyze(view: GraphView) -> Analysis:
    """Find the residual sites and the skipped norms of one graph, with block indices."""
    geo_nodes = _geodesic_nodes(view)
    norms = find_norms(view, exclude=geo_nodes)
    by_source: dict[fx.Node, list[NormMatch]] = defaultdict(list)
    norm_nodes: set = set()
    for n in norms:
        by_source[n.source].append(n)
        norm_nodes |= n.nodes
    sites = []
    for node in view.nodes:
        if node in geo_nodes or node in norm_nodes:
            continue
        operands = view.add_operands(node)
        if operands is None or not view.same_shape(node, *operands):
            continue
        site = _classify(view, node, operands, by_source)
        if site is not None:
            sites.append(site)
    n_blocks = _assign_blocks(view, sites)
    skipped = _skips(view, norms, sites, geo_nodes)
    return Analysis(sites, skipped, n_blocks)


def _classify(view: GraphView, add: fx.Node, operands, by_source) -> SiteMatch | None:
    for x, s in (operands, operands[::-1]):
        stream = view.root(x)
        if not reaches(view, stream, s):
            continue
        own_norms = [n for n in by_source.get(stream, []) if n.last_dim_only]
        branch_norms = [n for n in own_norms if reaches(view, n.output, s)]
        if branch_norms:
            blocked = set().union(*(n.nodes for n in own_norms))
            if not reaches(view, stream, s, blocked=blocked):
                return SiteMatch("pre", x, s, add, branch_norms[0], add)
        post = _exclusive_norm(view, add, by_source)
        if post is not None:
            return SiteMatch("post", x, s, add, post, post.output)
        return None
    return None


def reaches(view: GraphView, src: fx.Node, target: fx.Node, blocked: set | frozenset = frozenset()) -> bool:
    """True when a data path leads from ``src`` to ``target`` avoiding ``blocked`` nodes.

    The walk never goes past ``target`` in graph order, so its cost is bounded by the region between
    the two nodes (one block for a residual site), which keeps the pass linear in the graph size.
    """
    if src is target:
        return True
    limit = view.index[target]
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


def _exclusive_norm(view: GraphView, add: fx.Node, by_source) -> NormMatch | None:
    """The last-dim norm that is the only reader of ``add`` (seen through casts), if any."""
    for norm in by_source.get(add, []):
        if norm.last_dim_only and _only_read_by(view, add, norm.nodes):
            return norm
    return None


def _only_read_by(view: GraphView, node: fx.Node, allowed: set) -> bool:
    users = view.data_users(node)
    return bool(users) and all(u in allowed for u in users)


def _geodesic_nodes(view: GraphView) -> set:
    """Nodes that implement an existing geodesic update (a converted model captured again)."""
    out = set()
    for node in view.nodes:
        if isinstance(view.module(node), GeodesicUpdate) or view.inside_module_class(node, [_GEODESIC_CLASS]):
            out.add(node)
    return out


def _assign_blocks(view: GraphView, sites: list[SiteMatch]) -> int:
    chains = [view.module_stack(site.add) for site in sites]
    siblings: dict[tuple, set] = defaultdict(set)
    for chain in chains:
        parent = None
        for key, _path, cls in chain:
            siblings[(parent, cls)].add(key)
            parent = key
    block = -1
    previous: object = object()
    pending = 0
    for site, chain in zip(sites, chains):
        unit = None
        parent = None
        for key, path, cls in chain:
            if len(siblings[(parent, cls)]) >= 2:
                unit = (key, path)
            parent = key
        if unit is None:
            if previous is not None or pending >= 2:
                block += 1
                pending = 0
            pending += 1
        elif unit != previous:
            block += 1
        previous = unit
        site.block = block
        site.path = unit[1] if unit else ""
    return block + 1


def _skips(view: GraphView, norms: list[NormMatch], sites: list[SiteMatch], geo_nodes: set) -> list[Skip]:
    used = {id(s.norm) for s in sites}
    stream_values = {view.root(s.x) for s in sites} | {s.output for s in sites}
    last_value = sites[-1].output if sites else None
    first_input = view.root(sites[0].x) if sites else None
    geo_inputs = {view.root(i) for g in geo_nodes for i in view.data_inputs(g)}
    skipped = []
    for norm in norms:
        if id(norm) in used:
            continue
        if not norm.last_dim_only:
            reason = (f"normalizes over the last {norm.trailing_dims} dimensions, not over the last one "
                      "only: not a residual-stream norm")
        elif norm.source in geo_inputs:
            reason = "branch-input norm of an existing geodesic update: the model is already converted"
        elif last_value is not None and norm.source is last_value:
            reason = "final norm: reads the residual stream after the last block (before the head)"
        elif norm.source in stream_values:
            reason = "reads the residual stream but takes no part in a residual update (e.g. a side head)"
        elif first_input is not None and (view.root(norm.output) is first_input
                                          or reaches(view, norm.output, first_input)):
            reason = "embedding norm: normalizes the input of the first block, not a residual update"
        elif not sites:
            reason = "no residual add x + f(x) reads or feeds it"
        else:
            reason = ("off the residual stream: it normalizes a value computed inside a branch "
                      "(e.g. a QK-norm or a norm inside an MLP)")
        skipped.append(Skip(reason=reason, node=norm.name, path=norm.path))
    return skipped
