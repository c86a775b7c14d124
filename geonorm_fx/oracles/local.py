"""The local branch-invariance check: a per-site form of the Pre-Norm identity with no global precondition.

The Pre-Norm identity of GEONORM.md section 6 is global: it rescales the whole stream and needs every
read of it to go through a scale-invariant norm, and a final norm. A model that injects unscaled terms
into the stream (``h = block(h) + e``, Gemma 3n's AltUp and per-layer embeddings), reads it in a side
head, or has no final norm fails it although its sites are right.

The local check asks only what makes a site pre-type: its branches read ``x`` through scale-invariant
norms. For each ``pre``/``sandwich``/``parallel`` site, on a copy of the captured graph, the stream value
entering the site (the site's ``stream_value``) is multiplied by ``alpha`` on *every* read except the
site's own skip, i.e. except the chain of nodes from the stream value to the update operand ``x``
(casts, views, a skip scale ``a * x``), which the site's sum keeps reading unscaled. The branch sum ``s``
of the site is recorded and compared with the original run: ``local_gap = max|s' - s| / max|s|`` is about
1e-6 (with tiny norm eps) when every branch reads the stream only through scale-invariant norms, and of
order one when a branch reads what the detector called the stream directly (the detector took a
value that is not the stream, or a branch that bypasses its norm). Sites are checked one at a time, each
on its own copy: rescaling several sites' streams at once would let one site's change mask another's.

Invariance alone would also hold for branches that do not read the stream value at all (a site whose
``x`` and branch were swapped), so the same copy is run once more with the stream value multiplied
elementwise by a fixed random factor in ``[0.5, 1.5]``, which no norm undoes: ``dependence``, the relative
change of ``s`` then, must be far from 0 for a site whose branches read its ``x``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..api import _free_name
from .graphs import _inserting_after, copy_graph_module, run_tapped

#: the site kinds whose branches read the stream only through norms (the Pre-Norm identity's kinds)
PRE_KINDS = ("pre", "sandwich", "parallel")
ALPHA = 3.0


def skip_chain(graph: fx.Graph, stream: fx.Node, x: fx.Node) -> list[fx.Node]:
    """The nodes from ``stream`` (excluded) to ``x`` (included) that ``x`` is computed through, in graph
    order: the casts, views and skip scale between the stream value and the update operand."""
    if x is stream:
        return []
    order = {n: k for k, n in enumerate(graph.nodes)}
    low = order[stream]
    ancestors, todo = set(), [x]
    while todo:
        node = todo.pop()
        if node in ancestors or order[node] <= low:
            continue
        ancestors.add(node)
        todo += node.all_input_nodes
    depends = {stream}
    for node in sorted(ancestors, key=order.__getitem__):
        if any(i in depends for i in node.all_input_nodes):
            depends.add(node)
    return [n for n in sorted(ancestors, key=order.__getitem__) if n in depends]


class _Rescale(nn.Module):
    """``x * factor`` (a number), or, with ``factor`` None, ``x`` times a fixed random elementwise factor in
    ``[0.5, 1.5]`` (seeded: the same in every run)."""

    def __init__(self, factor: float | None = ALPHA):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        if self.factor is not None:
            return x * self.factor
        g = torch.Generator(device=x.device).manual_seed(1234)
        noise = torch.rand(x.shape, generator=g, device=x.device, dtype=torch.float32)
        return x * (0.5 + noise).to(x.dtype)


def rescale_stream_but_skip(gm: fx.GraphModule, stream: fx.Node, x: fx.Node, skip_readers,
                            scale: nn.Module) -> fx.Node:
    """Rewire ``gm``'s graph so that every read of ``stream`` sees ``scale(stream)``, except the skip: the
    ``skip_readers`` (the site's sum and its inner adds) read ``x`` computed from the unscaled stream.
    Returns the node of ``scale``."""
    graph = gm.graph
    chain = skip_chain(graph, stream, x)
    name = _free_name(gm, "_geonorm_rescale")
    gm.add_module(name, scale)
    with _inserting_after(graph, stream):
        scaled = graph.call_module(name, (stream,))
    stream.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    unscaled = {scaled: stream}
    for node in chain:       # an unscaled copy of the skip chain, read by the sum only
        with graph.inserting_after(node):
            unscaled[node] = graph.node_copy(node, lambda n: unscaled.get(n, n))
    read = scaled if x is stream else x          # what the sum reads as its x operand now
    for user in list(read.users):
        if user in skip_readers:
            user.replace_input_with(read, unscaled.get(read, read))
    gm.recompile()
    return scaled


@dataclass
class LocalCheck:
    """The local check of one site: ``gap`` the relative change of its branch sum when the stream is
    rescaled on every read but the skip (~0 for a pre-type site); ``dependence`` the same under an
    elementwise random factor (far from 0 when the branches read the stream at all; None when the branch
    sum is zero); ``error`` why the check could not run (then both are None)."""

    gap: float | None = None
    dependence: float | None = None
    error: str | None = None


def local_checks(gm: fx.GraphModule, sites: list, args=(), kwargs=None, *, alpha: float = ALPHA) -> list:
    """Per site of ``sites`` (``SiteMatch`` es of ``gm``): a :class:`LocalCheck` for a pre-type site, None
    for other kinds. ``gm`` is left as it was (each site is checked on a copy of the graph)."""
    kwargs = kwargs or {}
    out: list = [None] * len(sites)
    chosen = [i for i, s in enumerate(sites) if s.kind in PRE_KINDS]
    if not chosen:
        return out
    _, base = run_tapped(gm, [b for i in chosen for b in sites[i].branches], args, kwargs)
    for i in chosen:
        site = sites[i]
        stream = site.stream_value if site.stream_value is not None else site.x
        try:
            work, vmap = copy_graph_module(gm)
            scale = _Rescale(alpha)
            rescale_stream_but_skip(work, vmap[stream], vmap[site.x],
                                    {vmap[n] for n in ({site.sum} | set(site.dead)) if n in vmap}, scale)
            before = _branch_sum([base[b] for b in site.branches])
            _, values = run_tapped(work, [vmap[b] for b in site.branches], args, kwargs)
            gap = _relative(before, _branch_sum([values[vmap[b]] for b in site.branches]))
            scale.factor = None
            _, values = run_tapped(work, [vmap[b] for b in site.branches], args, kwargs)
            dependence = _relative(before, _branch_sum([values[vmap[b]] for b in site.branches]))
            zero = not (isinstance(before, torch.Tensor) and before.numel() and bool(before.abs().max() > 0))
            out[i] = LocalCheck(gap, None if zero else dependence)
        except Exception as e:  # noqa: BLE001 - reported with the site, never raised
            text = str(e).splitlines()[0] if str(e) else ""
            out[i] = LocalCheck(error=f"{type(e).__name__}: {text}")
    return out


def local_gaps(gm: fx.GraphModule, sites: list, args=(), kwargs=None, *, alpha: float = ALPHA) -> list:
    """Per site: the local branch-invariance gap of :func:`local_checks` (None where it does not apply
    or could not run)."""
    return [None if c is None else c.gap for c in local_checks(gm, sites, args, kwargs, alpha=alpha)]


def _branch_sum(values):
    total = None
    for v in values:
        v = v.double() if hasattr(v, "double") else v
        total = v if total is None else total + v
    return total


def _relative(before, after) -> float:
    if before.shape != after.shape:
        return math.inf
    scale = float(before.abs().max()) if before.numel() else 0.0
    gap = float((after - before).abs().max()) if before.numel() else 0.0
    gap = gap / scale if scale > 0 else gap
    return gap if gap == gap else math.inf
