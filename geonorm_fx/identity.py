"""The Pre-Norm identity (GEONORM.md section 6): a differential test of the detector.

For a pure Pre-Norm model whose every read of the residual stream goes through a scale-invariant norm
and which ends in one, replacing the j-th residual update (1-based, in stream order) by
``x_j = sqrt(j/(j+1)) x_{j-1} + (1/sqrt(j+1)) f_j(N(x_{j-1}))`` scales the stream by ``1/sqrt(j+1)``
and leaves the output unchanged. ``j`` counts the sites of each residual stream separately (an
encoder-decoder has two). If the detector took something that is not the residual stream for
it, the output changes.
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .capture import capture, normalize_inputs
from .errors import GeoNormError, NoSitesError
from .passes.ops import GraphView
from .passes.rewrite import rewrite_sites
from .passes.sites import analyze


class RescaledResidual(nn.Module):
    """``alpha * x + beta * s``: the rescaled Pre-Norm update of paper Eq. 13."""

    def __init__(self, alpha: float, beta: float):
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, x, s):
        return self.alpha * x + self.beta * s


def prenorm_identity_gap(model, args=(), kwargs=None, *, tracer: str = "auto") -> float:
    """Rewrite every detected site of a Pre-Norm model into the rescaled form above and return
    ``max|y - y'| / max|y|`` over all floating-point outputs (0 up to norm epsilons when detection is
    right). Raises :class:`GeoNormError` if a site is not ``pre``, :class:`NoSitesError` if none."""
    args, kwargs = normalize_inputs(args, kwargs)
    graph_module = capture(model, args, kwargs, tracer=tracer, modes=("eval",)).graphs["eval"]
    analysis = analyze(GraphView(graph_module))
    if not analysis.sites:
        raise NoSitesError("prenorm_identity_gap found no residual site in the model")
    others = sorted({s.kind for s in analysis.sites if s.kind != "pre"})
    if others:
        raise GeoNormError(f"prenorm_identity_gap needs a pure Pre-Norm model, but it has {', '.join(others)} "
                           "sites: the identity of GEONORM.md section 6 holds only for Pre-Norm")
    with torch.no_grad():
        reference = graph_module(*args, **kwargs)
    position, seen = [], Counter()
    for site in analysis.sites:  # j, 1-based, counted per residual stream
        seen[site.stream] += 1
        position.append(seen[site.stream])
    updates = nn.ModuleList(RescaledResidual(math.sqrt(j / (j + 1)), 1 / math.sqrt(j + 1)) for j in position)
    graph_module.add_module("_prenorm_identity", updates)
    rewrite_sites(graph_module, analysis.sites, [f"_prenorm_identity.{i}" for i in range(len(updates))])
    with torch.no_grad():
        rescaled = graph_module(*args, **kwargs)
    pairs = [(a, b) for a, b in zip(pytree.tree_leaves(reference), pytree.tree_leaves(rescaled))
             if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if not pairs:
        raise GeoNormError("the model has no floating-point output to compare")
    gap = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
    scale = max(float(a.float().abs().max()) for a, _ in pairs)
    return gap / scale if scale > 0 else gap
