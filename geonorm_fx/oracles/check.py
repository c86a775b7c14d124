"""``check_sites``: every oracle on one model, for sweeps over a model zoo."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..capture import capture, normalize_inputs
from ..errors import NoSitesError
from ..passes.ops import GraphView
from ..passes.sites import analyze
from ..report import Report, Site
from ..schedules import decay_constants
from .affine import affine_free_copy
from .identities import IDENTITY_OF, as_module, run_identities
from .structure import StructuralCheck, structural_check


@dataclass
class OracleResult:
    """The verdict of :func:`check_sites` on one model.

    ``pre_gap`` / ``post_gap``: relative output change under the Pre-Norm / Post-Norm identity (None
    when the model has no such site); ``j`` / ``scale_residuals``: per site of ``report``, the measured
    stream position and ``|x' - c x| / |x'|`` (None where the Pre-Norm identity does not apply);
    ``structural``: the module-tree check; ``disagreements``: every failed check in words (the
    structural ones included); ``agree``: no oracle disagrees with the detector.
    """

    report: Report
    pre_gap: float | None
    post_gap: float | None
    j: list
    scale_residuals: list
    structural: StructuralCheck
    disagreements: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tolerance: float = 1e-3

    @property
    def agree(self) -> bool:
        return not self.disagreements

    def __str__(self) -> str:
        fmt = lambda g: "-" if g is None else f"{g:.2e}"  # noqa: E731
        lines = [f"{len(self.report.sites)} site(s): pre gap {fmt(self.pre_gap)}, post gap {fmt(self.post_gap)}, "
                 f"{'agree' if self.agree else 'DISAGREE'} (tolerance {self.tolerance:g})"]
        lines += [f"  ! {d}" for d in self.disagreements] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def check_sites(model, args=(), kwargs=None, *, tracer: str = "auto", tolerance: float = 1e-3) -> OracleResult:
    """Run the detector on an affine-free, tiny-eps copy of ``model`` and judge its sites by the
    Pre-Norm and Post-Norm identities (each on its own capture when the model has both kinds) and by the
    structural cross-check. Raises :class:`NoSitesError` when no site is found."""
    args, kwargs = normalize_inputs(args, kwargs)
    module = as_module(model)
    free = affine_free_copy(module)

    def detect():
        gm = capture(free.model, args, kwargs, tracer=tracer, modes=("eval",)).graphs["eval"]
        return gm, analyze(GraphView(gm))

    gm, analysis = detect()
    if not analysis.sites:
        raise NoSitesError("check_sites found no residual site in the model")
    report = report_of(analysis)   # read before any rewrite changes the graph
    n = len(analysis.sites)
    j, residuals = [None] * n, [None] * n
    gaps: dict[str, float | None] = {"pre": None, "post": None}
    disagreements, notes = [], [f"not affine-free: {u}" for u in free.unrecognised]
    wanted = [c for c in ("pre", "post") if any(IDENTITY_OF.get(s.kind) == c for s in analysis.sites)]
    for k, check in enumerate(wanted):
        if k:
            gm, analysis = detect()
        outcome = run_identities(gm, analysis.sites, args, kwargs, checks=(check,))
        gaps[check] = outcome.gap
        if outcome.gap > tolerance:
            disagreements.append(_gap_message(check, outcome.gap, outcome.probe_gap, tolerance))
        for i, rec in enumerate(outcome.sites):
            if rec.identity == "pre":
                j[i], residuals[i] = rec.j, rec.scale_residual
                if not (rec.scale_residual <= tolerance):
                    site = report.sites[i]
                    disagreements.append(
                        f"site {i} ({site.kind} at {site.node}): its x is not the stream rescaled uniformly "
                        f"(|x' - c x| / |x'| = {rec.scale_residual:.2e}, j = {rec.j:.4g})")
    unchecked = sorted({s.kind for s in report.sites if IDENTITY_OF.get(s.kind) is None})
    if unchecked:
        notes.append(f"no numeric identity for {', '.join(unchecked)} sites: judged by the module tree only")
    structural = structural_check(module, report)
    disagreements += structural.disagreements
    notes += structural.notes
    return OracleResult(report, gaps["pre"], gaps["post"], j, residuals, structural, disagreements, notes,
                        tolerance)


def _gap_message(check: str, gap: float, probe_gap: float, tolerance: float) -> str:
    name = {"pre": "Pre-Norm", "post": "Post-Norm"}[check]
    why = (f"; already the plain rewrite x + s changes it by {probe_gap:.2e}, so some site's x + s is not the "
           "residual sum" if probe_gap > tolerance else "")
    hint = (" (or the model does not meet its precondition: every read of the stream through a "
            "scale-invariant norm, and a final norm)" if check == "pre" else "")
    text = "inf" if math.isinf(gap) else f"{gap:.2e}"
    return f"the {name} identity changes the output by {text} > {tolerance:g}{why}{hint}"


def report_of(analysis) -> Report:
    """A :class:`Report` of an analysis with the default (harmonic) decays, as ``inspect`` makes it."""
    decays = [decay_constants("harmonic", n) for n in analysis.blocks_per_stream]
    sites = [Site(kind=s.kind, norm=s.norm.kind, block=s.block, decay=decays[s.stream][s.block], path=s.path,
                  node=s.sum.name, stream=s.stream, norm_path=s.norm.path) for s in analysis.sites]
    return Report(sites=sites, skipped=list(analysis.skipped), n_blocks=analysis.n_blocks,
                  blocks_per_stream=list(analysis.blocks_per_stream))
