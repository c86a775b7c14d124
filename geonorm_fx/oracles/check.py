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
from .affine import affine_free_copy, tiny_eps_graph
from .identities import IDENTITY_OF, as_module, run_identities
from .local import ALPHA, local_checks

#: the least relative change of a pre-type site's branch sum when its stream is perturbed elementwise
DEPENDENCE = 1e-3
from .structure import StructuralCheck, structural_check


@dataclass
class OracleResult:
    """The verdict of :func:`check_sites` on one model.

    ``pre_gap`` / ``post_gap``: relative output change under the Pre-Norm / Post-Norm identity (None
    when the model has no such site); ``j`` / ``scale_residuals``: per site of ``report``, the measured
    stream position and ``|x' - c x| / |x'|`` (None where the Pre-Norm identity does not apply);
    ``structural``: the module-tree check; ``local_gaps`` / ``local_dependence``: per site, the local
    branch-invariance gap and the branch sum's change under an elementwise perturbation of the stream
    (:mod:`geonorm_fx.oracles.local`; None where it does not apply); ``norm_gains``: per site, a post
    site's measured norm magnitude over ``sqrt(d)`` (1 for RMS scaling; None elsewhere);
    ``disagreements``: every failed check in words (the structural ones included); ``agree``: no oracle
    disagrees with the detector.

    The global Pre-Norm identity needs every read of the stream to go through a scale-invariant norm and
    a final norm. When it fails only for want of that precondition (``x + s`` is each site's sum, and
    every pre-type site passes the local check) its failure is a note, not a disagreement. A site that
    fails the local check is always a disagreement.
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
    local_gaps: list = field(default_factory=list)
    norm_gains: list = field(default_factory=list)
    local_dependence: list = field(default_factory=list)

    @property
    def agree(self) -> bool:
        return not self.disagreements

    def __str__(self) -> str:
        fmt = lambda g: "-" if g is None else f"{g:.2e}"  # noqa: E731
        local = [g for g in self.local_gaps if g is not None]
        lines = [f"{len(self.report.sites)} site(s): pre gap {fmt(self.pre_gap)}, post gap {fmt(self.post_gap)}, "
                 f"local gap {fmt(max(local) if local else None)}, "
                 f"{'agree' if self.agree else 'DISAGREE'} (tolerance {self.tolerance:g})"]
        lines += [f"  ! {d}" for d in self.disagreements] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def check_sites(model, args=(), kwargs=None, *, tracer: str = "auto", tolerance: float = 1e-3) -> OracleResult:
    """Run the detector on an affine-free, tiny-eps copy of ``model`` and judge its sites by the local
    branch-invariance check, the Pre-Norm and Post-Norm identities (each on its own capture when the
    model has both kinds) and the structural cross-check. Raises :class:`NoSitesError` when no site is
    found."""
    args, kwargs = normalize_inputs(args, kwargs)
    module = as_module(model)
    free = affine_free_copy(module)

    def detect():
        gm = tiny_eps_graph(capture(free.model, args, kwargs, tracer=tracer, modes=("eval",)).graphs["eval"])
        return gm, analyze(GraphView(gm))

    gm, analysis = detect()
    if not analysis.sites:
        raise NoSitesError("check_sites found no residual site in the model")
    report = report_of(analysis)   # read before any rewrite changes the graph
    n = len(analysis.sites)
    j, residuals, gains = [None] * n, [None] * n, [None] * n
    gaps: dict[str, float | None] = {"pre": None, "post": None}
    disagreements, notes = [], [f"not affine-free: {u}" for u in free.unrecognised]

    # the local check first: it copies the graph per site and leaves this capture as it was
    checks = local_checks(gm, analysis.sites, args, kwargs)
    local = [None if c is None else c.gap for c in checks]
    local_ok = True
    for i, c in enumerate(checks):
        if c is None:
            continue
        if c.error is not None:
            local_ok = False
            notes.append(f"{_who(report, i)}: the local branch-invariance check could not run ({c.error})")
            continue
        if not c.gap <= tolerance:
            local_ok = False
            disagreements.append(
                f"{_who(report, i)}: a branch reads its x other than through a scale-invariant norm: rescaling "
                f"the stream by {ALPHA:g} on every read but the skip changes the branch sum by {c.gap:.2e} "
                "(local branch-invariance check)")
        if c.dependence is not None and not c.dependence > DEPENDENCE:
            local_ok = False
            disagreements.append(
                f"{_who(report, i)}: its branches do not read its x: perturbing the stream elementwise on every "
                f"read but the skip changes the branch sum by only {c.dependence:.2e} (local branch-invariance "
                "check)")

    wanted = [c for c in ("pre", "post") if any(IDENTITY_OF.get(s.kind) == c for s in analysis.sites)]
    for k, check in enumerate(wanted):
        if k:
            gm, analysis = detect()
        outcome = run_identities(gm, analysis.sites, args, kwargs, checks=(check,))
        gaps[check] = outcome.gap
        failures = ([_gap_message(check, outcome.gap, outcome.probe_gap, tolerance, hint=False)]
                    if outcome.gap > tolerance else [])
        for i, rec in enumerate(outcome.sites):
            if rec.identity == "pre":
                j[i], residuals[i] = rec.j, rec.scale_residual
                if not (rec.scale_residual <= tolerance):
                    failures.append(
                        f"{_who(report, i)}: its x is not the stream rescaled uniformly "
                        f"(|x' - c x| / |x'| = {rec.scale_residual:.2e}, j = {rec.j:.4g})")
            elif rec.identity == "post":
                gains[i] = rec.norm_gain
                if rec.gain_spread is not None and not rec.gain_spread <= tolerance:
                    disagreements.append(
                        f"{_who(report, i)}: the removed norm is not a scale-invariant normalization of x + s: "
                        f"its output magnitude varies over the tokens by {rec.gain_spread:.2e} (relative)")
        if check == "pre" and failures:
            plain_sum_ok = outcome.probe_gap <= tolerance
            checked = [g for g in local if g is not None]
            if plain_sum_ok and local_ok and checked:
                notes.append(
                    "global Pre-Norm identity not applicable: the model does not meet its precondition (every read "
                    "of the stream through a scale-invariant norm, and a final norm): " + "; ".join(failures)
                    + f"; every site passes the local branch-invariance check (largest local gap {max(checked):.2e})")
                continue
            if outcome.gap > tolerance:
                failures[0] = _gap_message(check, outcome.gap, outcome.probe_gap, tolerance)
        disagreements += failures
    odd_gains = [(i, g) for i, g in enumerate(gains) if g is not None and abs(g - 1.0) > tolerance]
    if odd_gains:
        notes.append("post site(s) " + ", ".join(str(i) for i, _ in odd_gains) + ": the removed norm's output "
                     "magnitude is " + ", ".join(sorted({f"{g:.4g}" for _, g in odd_gains})) + " x sqrt(d), not "
                     "sqrt(d) (RMSNorm up to a constant, e.g. an L2 normalization): the Post-Norm identity uses "
                     "the measured magnitude")
    unchecked = sorted({s.kind for s in report.sites if IDENTITY_OF.get(s.kind) is None})
    if unchecked:
        notes.append(f"no numeric identity for {', '.join(unchecked)} sites: judged by the module tree only")
    structural = structural_check(module, report)
    disagreements += structural.disagreements
    notes += structural.notes
    return OracleResult(report, gaps["pre"], gaps["post"], j, residuals, structural, disagreements, notes,
                        tolerance, local, gains, [None if c is None else c.dependence for c in checks])


def _who(report: Report, i: int) -> str:
    site = report.sites[i]
    return f"site {i} ({site.kind} at {site.node})"


def _gap_message(check: str, gap: float, probe_gap: float, tolerance: float, hint: bool = True) -> str:
    name = {"pre": "Pre-Norm", "post": "Post-Norm"}[check]
    why = (f"; already the plain rewrite x + s changes it by {probe_gap:.2e}, so some site's x + s is not the "
           "residual sum" if probe_gap > tolerance else "")
    hint = (" (or the model does not meet its precondition: every read of the stream through a "
            "scale-invariant norm, and a final norm)" if check == "pre" and hint else "")
    text = "inf" if math.isinf(gap) else f"{gap:.2e}"
    return f"the {name} identity changes the output by {text} > {tolerance:g}{why}{hint}"


def report_of(analysis) -> Report:
    """A :class:`Report` of an analysis with the default (harmonic) decays, as ``inspect`` makes it."""
    decays = [decay_constants("harmonic", n) for n in analysis.blocks_per_stream]
    sites = [Site(kind=s.kind, norm=s.norm.kind, block=s.block, decay=decays[s.stream][s.block], path=s.path,
                  node=s.sum.name, stream=s.stream, norm_path=s.norm.path) for s in analysis.sites]
    return Report(sites=sites, skipped=list(analysis.skipped), n_blocks=analysis.n_blocks,
                  blocks_per_stream=list(analysis.blocks_per_stream))
