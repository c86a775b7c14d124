"""Rewrite residual sites into geodesic updates, in place on an ``fx.GraphModule``.

Every site becomes ``geo_i(x, s)`` with ``s`` the branch output (the sum of the branches of a
parallel site); it replaces the residual sum (``pre``, ``sandwich``, ``respost``, ``parallel``) or
the norm that read it (``post``, ``deepnorm``: that norm and the DeepNorm scale are removed).
Branch-input and branch-output norms stay; extra terms of the sum (earlier states, injected inputs) are
added to the update's result, and views between a removed norm and its sum are applied to it.
"""
from __future__ import annotations

import torch
from torch import fx

from .ops import GraphView
from .sites import SiteMatch


def rewrite_sites(gm: fx.GraphModule, sites: list[SiteMatch], targets: list[str], *,
                  recompile: bool = True) -> set[str]:
    """Replace each site by a ``call_module`` to ``targets[i]`` (a module ``forward(x, s)`` already
    registered on ``gm``); erase the nodes that became dead and return the ``get_attr`` /
    ``call_module`` targets that no node of the graph references any more. ``recompile=False`` leaves
    ``gm.forward`` stale, for a caller that generates code from ``gm.graph`` itself."""
    graph = gm.graph
    view = GraphView(gm)
    candidates: set[fx.Node] = set()
    replaced: dict[fx.Node, fx.Node] = {}  # a later site's operand may be an earlier site's output
    for site, target in zip(sites, targets):
        branches = [replaced.get(b, b) for b in site.branches]
        with graph.inserting_before(site.sum):
            branch = branches[0]
            for other in branches[1:]:
                value = branch.meta.get("val")
                branch = graph.call_function(torch.ops.aten.add.Tensor, (branch, other))
                branch.meta["val"] = value
            update = graph.call_module(target, (replaced.get(site.x, site.x), branch))
            update.meta = dict(site.sum.meta)
            result = update
            for extra in site.extras:  # earlier states or injected inputs, added after the update
                result = graph.call_function(torch.ops.aten.add.Tensor, (result, replaced.get(extra, extra)))
                result.meta = dict(site.sum.meta)
        result = _reapply_views(graph, view, site.views, result)
        site.output.replace_all_uses_with(result)
        replaced[site.output] = result
        candidates |= site.dead
    dropped = _erase_dead(graph, view, candidates)
    # graph.lint() costs ~5% of the pass at 32 blocks; the tests lint every graph they convert instead
    if recompile:
        gm.recompile()
    still_used = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}
    return {t for t in dropped if t not in still_used}


def _reapply_views(graph: fx.Graph, view: GraphView, views: list[fx.Node], value: fx.Node) -> fx.Node:
    """Apply the same shape-changing views to ``value`` (a removed post norm read ``sum.reshape(-1, d)``: its
    replacement keeps the norm's output shape). Each copy goes right after its original."""
    for node in views:
        source = view.passthrough_input(node)
        with graph.inserting_after(node):
            value = graph.node_copy(node, lambda n, src=source, new=value: new if n is src else n)
    return value


def _erase_dead(graph: fx.Graph, view: GraphView, candidates: set[fx.Node]) -> set[str]:
    """Erase candidates (and the shape-only asserts and parameter reads hanging off them) that no
    longer have users, latest first."""
    dropped: set[str] = set()
    for node in reversed(list(graph.nodes)):
        if node not in candidates or node.op == "placeholder":  # an input stays: the calling convention
            continue
        for user in list(node.users):
            if view.is_shape_only(user) and not user.users:
                graph.erase_node(user)
        if node.users:
            continue
        inputs = node.all_input_nodes
        if node.op == "call_module":
            dropped.add(node.target)
        graph.erase_node(node)
        for inp in inputs:
            if inp.op == "get_attr" and not inp.users:
                dropped.add(inp.target)
                graph.erase_node(inp)
    return dropped
