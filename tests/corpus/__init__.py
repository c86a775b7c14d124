"""An adversarial corpus of small hand-written models that pins what the detector MUST do according to
GEONORM.md (sections 2, 3, 4 and their "Decision (soundness)" bullets), independent of what it does today.

Every case (:class:`Case`) gives

- ``build()``: the model (seeded; in eval mode unless the case is about train mode);
- ``inputs()``: example inputs at two shapes (different batch and sequence sizes; the first one is the
  conversion example);
- ``sites``: the expected ``(kind, stream, block)`` of every site, in stream order (possibly empty);
- ``kept``: the norms that must be left untouched (weights still in the converted ``state_dict`` with the
  same values, listed in ``report.skipped`` under their module path, never the norm of a site);
- ``ref(m64, *args64)``: an independent float64 reference of the GeoNorm model, written by hand with
  :func:`tests.reference.reference_geodesic` for every site and the harmonic decays ``1/(k+1)``
  (streams numbered separately, the sites of one block sharing the decay). ``m64`` is a deep copy of the
  source model in float64, so the reference runs the source's own submodules. Cases with zero sites have
  no reference: the converted output must equal the source model's output.

The docstring of each builder states the rule of the spec that the case pins. Cases whose answer the
spec leaves open are marked "abstain allowed": the report may either have the listed sites (and then the
output must be the reference) or none of them with the norms of ``abstain_kept`` skipped (and then the
output must be the source's). Where the spec allows two block groupings, ``alt_sites`` lists the other
one with its own reference.

The cases live in the theme modules of this package; :data:`CASES` collects them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..reference import reference_geodesic


@dataclass(frozen=True)
class Kept:
    """A norm that must not be rewritten: ``path`` is the module path the report gives it (the norm
    module, or for a functional norm the module whose forward calls it; ``""`` for the root);
    ``params`` its state_dict keys (default: every source key under ``path + "."``)."""

    path: str
    params: tuple[str, ...] | None = None
    why: str = ""
    listed: bool = True   # False: only "not removed" is required (its weights stay, unchanged)


@dataclass
class Case:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], list[tuple]]
    sites: list[tuple[str, int, int]]
    ref: Callable | None = None
    kept: tuple[Kept, ...] = ()
    alt_sites: tuple = ()                      # other site lists the spec allows: a list (same reference)
                                               # or a (list, reference) pair
    abstain: bool = False                      # "abstain allowed": no site at all is also accepted
    abstain_kept: tuple[Kept, ...] = ()        # then these norms must be skipped too
    norms: list[str] | None = None             # expected Site.norm of each site
    tracer: str = "auto"
    train: bool = False
    rel_tol: float | None = None               # relative max-error bound instead of rtol/atol 1e-4
    dynamic: dict | None = None                # class 8: {"bad": [(args, dim)], "maybe": [(args, dim)]}
    seed_calls: bool = False                   # reseed the RNG before every call (stochastic depth)
    train_outputs: bool = True                 # train-mode cases: compare train-mode outputs too
    doc: str = ""
    theme: str = ""


CASES: list[Case] = []


def case(id: str, *, sites, inputs, ref=None, kept=(), alt_sites=(), abstain=False, abstain_kept=(),
         norms=None, tracers=("auto",), train=False, rel_tol=None, dynamic=None, jitter_norms=True,
         seed_calls=False, dtype=None, train_outputs=True):
    """Register the decorated builder as one case per tracer (id suffixed with the tracer when there
    are several). The builder runs under ``torch.manual_seed(0)``; norm affine parameters (and BatchNorm
    statistics) are then jittered so that no norm is the identity map; the model is put in eval mode
    unless ``train``."""

    def deco(fn):
        def build():
            torch.manual_seed(0)
            model = fn()
            if jitter_norms:
                jitter(model)
            if dtype is not None:
                model = model.to(dtype)
            return model.train(train)

        theme = fn.__module__.rsplit(".", 1)[-1]
        for tracer in tracers:
            CASES.append(Case(id if len(tracers) == 1 else f"{id}-{tracer}", build, inputs, list(sites), ref,
                              tuple(kept), tuple(alt_sites), abstain, tuple(abstain_kept), norms, tracer,
                              train, rel_tol, dynamic, seed_calls, train_outputs, (fn.__doc__ or "").strip(),
                              theme))
        return fn

    return deco


# ---------------------------------------------------------------------------------------------------
# helpers shared by the theme modules

D = 12
VOCAB = 23
SHAPES = ((2, 5), (3, 7))
EVEN_SHAPES = ((2, 6), (3, 8))
CLAMP = math.pi / 4


def geo(x, s, k, clamp=CLAMP):
    """The rewritten residual step of block ``k`` (harmonic decay ``1/(k+1)``), in float64, with the guards
    of GEONORM.md section 2: a token whose update has no tangent part (``|v| < 1e-8``, e.g. a branch
    zeroed by stochastic depth) keeps ``x``; an all-zero state (``R < 1e-6``) falls back to ``x + s``."""
    if s.shape != x.shape:
        s = s.expand_as(x)
    out = reference_geodesic(x, s, 1.0 / (k + 1), clamp)
    xd, sd = x.double(), s.double()
    radius = xd.norm(dim=-1, keepdim=True)
    unit = xd / radius.clamp_min(1e-300)
    vn = (sd - (sd * unit).sum(-1, keepdim=True) * unit).norm(dim=-1, keepdim=True)
    out = torch.where(vn < 1e-8, x.to(out.dtype), out)
    return torch.where(radius < 1e-6, (x + s).to(out.dtype), out)


def S(kind: str, stream: int, *blocks: int, per: int = 1) -> list[tuple[str, int, int]]:
    """``per`` sites of ``kind`` for each block of ``blocks`` on ``stream``."""
    return [(kind, stream, b) for b in blocks for _ in range(per)]


def tokens(b, t, vocab=VOCAB, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + 31 * b + t)
    return torch.randint(0, vocab, (b, t), generator=g)


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + sum(31 ** i * s for i, s in enumerate(shape)))
    return torch.randn(*shape, generator=g)


def token_inputs(shapes=SHAPES, vocab=VOCAB):
    return lambda: [(tokens(b, t, vocab),) for b, t in shapes]


def float_inputs(d=D, shapes=SHAPES):
    return lambda: [(randn(b, t, d),) for b, t in shapes]


_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def jitter(model: nn.Module, scale: float = 0.2) -> nn.Module:
    """Perturb every norm's affine parameters (modules of the norm types, or any module with a
    ``_norm_like`` attribute) and BatchNorm running statistics, deterministically."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _NORM_TYPES) or getattr(m, "_norm_like", False):
                for p in m.parameters(recurse=False):
                    p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def case_ids() -> list[str]:
    return [c.id for c in CASES]


def _load():
    from . import (adversarial, branches, continuity, dataflow, dropping, final_norms, heads,  # noqa: F401
                   inplace, realworld, scales, shapes, spellings, streams, views)


_load()
