"""Graph helpers of the oracles: read node values during a run (taps) and copy a captured graph.

Both leave the detector alone: a tap is a pass-through module hung off a node for one run, and a copy
shares every parameter, buffer and submodule with its source, so an oracle can rewire one copy per site
without touching the capture the others use.
"""
from __future__ import annotations

import copy

from contextlib import contextmanager

import torch
from torch import fx, nn

from ..api import _free_name


class _Tap(nn.Module):
    """Records its input (detached) under ``key`` in a shared dict; its output is never read."""

    def __init__(self, store: dict, key):
        super().__init__()
        self._store, self.key = store, key

    def forward(self, value):
        self._store[self.key] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        return value


def _inserting_after(graph: fx.Graph, node: fx.Node):
    """Where a node computed from ``node`` goes: right after it, or after the last placeholder when
    ``node`` is one (placeholders stay first)."""
    if node.op != "placeholder":
        return graph.inserting_after(node)
    first = next((n for n in graph.nodes if n.op != "placeholder"), None)
    return graph.inserting_before(first)


def run_tapped(gm: fx.GraphModule, nodes, args=(), kwargs=None):
    """Run ``gm`` once (no grad) and return ``(output, {node: value})`` for the given nodes of its graph.

    The taps are removed again before returning: the graph is left as it was."""
    kwargs = kwargs or {}
    nodes = list(dict.fromkeys(nodes))
    store: dict = {}
    name = _free_name(gm, "_geonorm_tap")
    gm.add_module(name, nn.ModuleList(_Tap(store, i) for i in range(len(nodes))))
    inserted = []
    try:
        for i, node in enumerate(nodes):
            with _inserting_after(gm.graph, node):
                inserted.append(gm.graph.call_module(f"{name}.{i}", (node,)))
        gm.recompile()
        with torch.no_grad(), same_randomness():
            out = gm(*args, **kwargs)
    finally:
        for tap in inserted:
            gm.graph.erase_node(tap)
        delattr(gm, name)
        gm.recompile()
    return out, {node: store.get(i) for i, node in enumerate(nodes)}


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict]:
    """A new GraphModule over a copy of ``gm``'s graph, sharing its parameters, buffers and submodules,
    and the map from the nodes of ``gm.graph`` to their copies."""
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    val_map: dict = {}
    copied = graph.graph_copy(gm.graph, val_map, return_output_node=True)
    graph._codegen = gm.graph._codegen   # shared: never changed by the oracles (a deep copy warns on treespecs)
    if copied is not None:
        value, old_output = copied
        new_output = graph.output(value, type_expr=getattr(old_output, "type", None))
        new_output.meta = copy.copy(old_output.meta)
        val_map[old_output] = new_output
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    return out, val_map


@contextmanager
def same_randomness(seed: int = 0):
    """Every run of an oracle draws the same random numbers (a model that samples in its forward, e.g.
    ViT-MAE's random masking, is compared with itself, not with another draw); the caller's RNG state is
    restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
