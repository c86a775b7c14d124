"""Activation checkpointing through the install backend.

Dynamo captures a ``torch.utils.checkpoint.checkpoint`` call (Hugging Face's ``gradient_checkpointing_enable``)
as a ``tag_activation_checkpoint`` higher-order op whose body is a separate graph. The detector needs the
whole model in one graph, so :func:`inline_checkpoints` inlines every body and tags its nodes as torch's own
lowering does (``meta["recompute"]``, ``meta["ac_graph_id"]``, which ``make_fx`` keeps): AOT-based backends
(``inductor``, ``aot_eager``) then recompute those regions in the backward pass. For the ``eager`` backend,
:func:`outline_checkpoints` cuts the rewritten graph back into the tagged regions and runs each through
``torch.utils.checkpoint.checkpoint`` (non-reentrant, RNG state preserved).
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint

_HOP = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)


def inline_checkpoints(gm: fx.GraphModule) -> int:
    """Inline every ``tag_activation_checkpoint`` body of ``gm`` in place; return how many were inlined."""
    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if _HOP is None or node.op != "call_function" or node.target is not _HOP:
            continue
        count += 1
        body_ref, *args = node.args
        body = getattr(gm, body_ref.target)
        env: dict[fx.Node, object] = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], args))
        result = None
        with graph.inserting_before(node):
            for inner in body.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    result = fx.node.map_arg(inner.args[0], lambda n: env[n])
                    break
                if inner.op == "get_attr":
                    name = f"_ckpt{count}_{inner.target.replace('.', '_')}"
                    setattr(gm, name, _lookup(body, inner.target))
                    copied = graph.get_attr(name)
                    copied.meta = dict(inner.meta)
                else:
                    copied = graph.node_copy(inner, lambda n: env[n])
                copied.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
                copied.meta["ac_graph_id"] = count
                env[inner] = copied
        for user in list(node.users):
            if user.op == "call_function" and user.target.__name__ == "getitem" and isinstance(result, (tuple, list)):
                user.replace_all_uses_with(result[user.args[1]])
                graph.erase_node(user)
        if node.users:
            node.replace_all_uses_with(result)
        graph.erase_node(node)
        if not body_ref.users:
            graph.erase_node(body_ref)
    if count:
        graph.lint()
        gm.recompile()
    return count


def outline_checkpoints(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every maximal run of nodes of one ``ac_graph_id`` moved into a submodule that runs under
    non-reentrant ``checkpoint``; ``gm`` itself when no node is tagged."""
    tags = [n.meta.get("ac_graph_id") for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    if not any(t is not None for t in tags):
        return gm
    from torch.fx.passes.split_module import split_module

    partition_of: dict[fx.Node, int] = {}
    tagged: set[int] = set()
    current, last_tag = 0, object()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        tag = node.meta.get("ac_graph_id")
        if tag != last_tag:
            current, last_tag = current + 1, tag
            if tag is not None:
                tagged.add(current)
        partition_of[node] = current
    split = split_module(gm, gm, lambda n: partition_of[n], keep_original_order=True)
    for index in tagged:
        name = f"submod_{index}"
        if hasattr(split, name):
            setattr(split, name, Checkpointed(getattr(split, name)))
    return split


class Checkpointed(nn.Module):
    """``forward(*args) = checkpoint(inner, *args, use_reentrant=False)``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.inner(*args)
        return checkpoint(self.inner, *args, use_reentrant=False)


def _lookup(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
