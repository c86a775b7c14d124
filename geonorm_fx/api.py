"""``inspect`` and ``convert``: capture -> find sites -> rewrite -> report. The input is never mutated."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .capture import Captured, capture
from .errors import ConversionError, InvalidInputError, NoSitesError, ScheduleError
from .geodesic import GeodesicUpdate
from .module import GeoNormModule
from .passes.ops import GraphView
from .passes.rewrite import rewrite_sites
from .passes.sites import Analysis, analyze
from .report import SITE_KINDS, Report, Site, Skip
from .schedules import Schedule, decay_constants, validate_schedule


def inspect(model, args=(), kwargs=None, *, dynamic: bool = True, tracer: str = "auto",
            schedule: Schedule = "harmonic") -> Report:
    """Find every residual-plus-normalization site of ``model`` without changing anything.

    Returns a :class:`Report` whose sites carry kind, norm, block, the decay ``schedule`` would give
    the block, and the module path; norms that are not rewritten are listed in ``report.skipped``.
    """
    _check_schedule(schedule)
    cap = capture(model, args, kwargs, dynamic=dynamic, tracer=tracer, modes=("eval",), copy_weights=False)
    analysis = analyze(GraphView(cap.graphs["eval"]))
    decays = _decays(schedule, analysis)
    report = _report(analysis, decays, range(len(analysis.sites)), schedule, cap.tracer, cap.dynamic, updates={})
    return _with_shapes(report, cap)


def convert(model, args=(), kwargs=None, *, schedule: Schedule = "harmonic", clamp: float = math.pi / 4,
            learnable: bool = True, kinds: Iterable[str] | None = None, dynamic: bool = True,
            tracer: str = "auto", strict: bool = False, copy: bool = True) -> nn.Module:
    """Rewrite every residual site of ``model`` into a geodesic update (GEONORM.md sections 2-4).

    Each site ``i`` becomes ``GeodesicUpdate(decay_k, clamp, learnable)`` with ``decay_k`` from
    ``schedule`` for its block ``k``; post-norms are removed, branch-input norms stay. The result is a
    :class:`GeoNormModule` (an ordinary, trainable ``nn.Module``) whose ``geonorm_report`` lists
    what was rewritten. ``kinds`` restricts the rewrite to the named kinds; ``strict=True`` raises
    :class:`NoSitesError` when nothing was rewritten. ``copy=False``: the result holds the source's own
    parameter and buffer objects instead of copies (no second copy of the weights in memory; training the
    result then trains the source's tensors too, the one exception to "the source is never mutated").
    """
    _check_kinds(kinds)
    _check_schedule(schedule)
    if not isinstance(clamp, (int, float)) or not (0.0 < float(clamp) <= math.pi):
        raise InvalidInputError(f"clamp must be an angle in (0, pi], got {clamp!r}")
    if not isinstance(copy, bool):
        raise InvalidInputError(f"copy must be True or False, got {copy!r}")
    cap = capture(model, args, kwargs, dynamic=dynamic, tracer=tracer, copy_weights=copy)
    return convert_captured(cap, schedule=schedule, clamp=clamp, learnable=learnable, kinds=kinds, strict=strict)


def convert_captured(cap: Captured, *, schedule: Schedule = "harmonic", clamp: float = math.pi / 4,
                     learnable: bool = True, kinds: Iterable[str] | None = None,
                     strict: bool = False) -> nn.Module:
    """The pass alone: find sites in each captured graph, rewrite them in place, wrap the graphs in a
    :class:`GeoNormModule`. :func:`convert` is ``capture`` followed by this (benchmarks time it apart)."""
    kind_set = _check_kinds(kinds)
    analyses = {mode: analyze(GraphView(gm)) for mode, gm in cap.graphs.items()}
    reference = analyses["eval"]
    for mode, analysis in analyses.items():
        if [s.signature() for s in analysis.sites] != [s.signature() for s in reference.sites]:
            raise ConversionError(
                f"the {mode}-mode graph has different residual sites than the eval-mode graph "
                f"({len(analysis.sites)} vs {len(reference.sites)}): the model's structure depends on "
                "its training mode; convert it in one mode with tracer='export' on an ExportedProgram")
    decays = _decays(schedule, reference)
    chosen = [i for i, s in enumerate(reference.sites) if kind_set is None or s.kind in kind_set]
    if strict and not chosen:
        found = ", ".join(f"{k}={v}" for k, v in sorted(_count(reference).items())) or "none"
        raise NoSitesError(f"no residual site was rewritten (sites found: {found}; kinds={kinds!r}); "
                           "run geonorm_fx.inspect to see why norms were skipped")
    root = cap.graphs["eval"]
    prefix = _free_name(root, "geonorm")
    updates = nn.ModuleList(
        GeodesicUpdate(decays[i], clamp, learnable, dim=reference.sites[i].dim) for i in chosen)
    updates.to(_device_of(root))
    removed: set[str] = set()
    for mode, gm in cap.graphs.items():
        gm.add_module(prefix, updates)
        sites = [analyses[mode].sites[i] for i in chosen]
        # GeoNormModule generates the forward code from the graphs: no recompile here
        removed |= rewrite_sites(gm, sites, [f"{prefix}.{j}" for j in range(len(chosen))], recompile=False)
    still_used = {n.target for gm in cap.graphs.values() for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    removed -= still_used
    for target in removed if not cap.shared else ():  # shared modules are the source's: leave them whole
        _delete(root, target)
    report = _report(reference, decays, chosen, schedule, cap.tracer, cap.dynamic, kind_set,
                     {i: f"{prefix}.{j}" for j, i in enumerate(chosen)})
    report.removed_parameters = sorted(removed)
    return GeoNormModule(cap.graphs, _with_shapes(report, cap), inputs=cap.inputs, training=cap.training)


def _with_shapes(report: Report, cap: Captured) -> Report:
    """The capture's input dims: which stayed dynamic, which it fixed (see :class:`Report`)."""
    report.dynamic_dims = cap.dynamic_dims()
    report.fixed_dims = cap.fixed_dims()
    return report


def _report(analysis: Analysis, decays, chosen, schedule, tracer, dynamic, kind_set=None,
            updates: dict[int, str] | None = None) -> Report:
    """``updates``: per chosen site index the module path of its update (default ``geonorm.<j>``)."""
    updates = updates if updates is not None else {i: f"geonorm.{j}" for j, i in enumerate(chosen)}
    chosen = set(chosen)
    sites = []
    skipped = list(analysis.skipped)
    for i, s in enumerate(analysis.sites):
        if i in chosen:
            sites.append(Site(kind=s.kind, norm=s.norm.kind, block=s.block, decay=decays[i],
                              path=s.path, node=s.sum.name, stream=s.stream,
                              norm_path=s.norm.path, update=updates.get(i, "")))
        else:
            skipped.append(Skip(reason=f"{s.kind} site left as it is: kind {s.kind!r} not in "
                                       f"kinds={sorted(kind_set or ())}", node=s.sum.name, path=s.path))
    name = schedule if isinstance(schedule, str) else "custom"
    return Report(sites=sites, skipped=skipped, n_blocks=analysis.n_blocks, schedule=name,
                  tracer=tracer, dynamic=dynamic, blocks_per_stream=list(analysis.blocks_per_stream))


def _decays(schedule: Schedule, analysis: Analysis) -> list[float]:
    """The decay constant of every site: each residual stream is scheduled over its own blocks."""
    per_stream = [decay_constants(schedule, n) for n in analysis.blocks_per_stream]
    return [per_stream[s.stream][s.block] for s in analysis.sites]


def _check_kinds(kinds) -> set[str] | None:
    if kinds is None:
        return None
    if isinstance(kinds, str):
        kinds = [kinds]
    try:
        kind_set = set(kinds)
    except TypeError:
        raise InvalidInputError(f"kinds must be None or an iterable of site kinds, got {kinds!r}") from None
    unknown = kind_set - set(SITE_KINDS)
    if unknown:
        raise InvalidInputError(f"unknown site kind(s) {sorted(unknown)}: use any of {list(SITE_KINDS)}")
    return kind_set


def _check_schedule(schedule) -> None:
    validate_schedule(schedule)


def _count(analysis: Analysis) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in analysis.sites:
        out[s.kind] = out.get(s.kind, 0) + 1
    return out


def _free_name(gm: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _device_of(gm: nn.Module) -> torch.device:
    for t in list(gm.parameters()) + list(gm.buffers()):
        return t.device
    return torch.device("cpu")


def _delete(root: nn.Module, target: str) -> None:
    *path, name = target.split(".")
    owner = root.get_submodule(".".join(path)) if path else root
    delattr(owner, name)
