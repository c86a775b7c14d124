"""The numeric oracles of GEONORM.md section 6: the Pre-Norm and the Post-Norm identity.

Both take a captured graph and a site list (the detector's, or any other) and judge it by running the
graph: each site is rewritten, with :func:`geonorm_fx.passes.rewrite.rewrite_sites`, into a module
that leaves the model's output unchanged exactly when the site's ``x``, ``s`` and norm are right.

**Pre-Norm identity** (``pre``, ``sandwich``, ``parallel`` sites: every branch reads ``x`` through a
scale-invariant norm, so rescaling ``x`` leaves ``s`` unchanged). The site position ``j`` is *measured*,
not counted: the detector's stream and block numbering is never read. A probe run records each
site's ``x`` with every site computing exactly ``x + s``; in the rescaled run each site measures the
scale of its incoming state, ``c = <x', x> / <x, x>``, sets ``j = 1 / c**2`` and returns
``sqrt(j/(j+1)) x' + (1/sqrt(j+1)) s'``, which is ``(x + s) / sqrt(j+1)`` when ``x`` really is the
stream (``x' = c x``) and ``s`` really is read through norms (``s' = s``). ``c`` is 1 at a stream start
and after any scale-invariant boundary (a norm, a patch merger ``Linear(LN(x))``), so ``j`` restarts
there by itself and continues along forks. ``|x' - c x| / |x'|`` is recorded per site: a state that is
not uniformly rescaled is not the stream. ``respost`` (``x + N(f(x))``) and ``deepnorm`` sites have no
identity and are left as they are.

**Post-Norm identity** (``post`` sites). For an affine-free norm with ``eps -> 0``,
``RMSNorm(x + s) = sqrt(d) (x + s) / |x + s|``, and the unclamped geodesic step with
``th* = atan2(|v|, |x| + <x/|x|, s>)`` (``v`` the tangent part of ``s``) is
``Geo*(x, s) = |x| (x + s) / |x + s|``; so ``N(x + s) = (sqrt(d) / |x|) Geo*(x, s)``, with ``x`` and ``s``
centred over the feature dim for LayerNorm. ``Geo*`` is written out here (not taken from
:mod:`geonorm_fx.geodesic`) and replaces the site's output, i.e. the removed norm: if the detector got
``x + s`` or the norm's kind or dimension wrong, the output changes. (It cannot tell a post norm from a
final norm: that is the structural check's job, :mod:`geonorm_fx.oracles.structure`.)

``sqrt(d)`` is the magnitude of an RMS-scaled output; a norm that is RMSNorm up to a constant (nGPT's
L2 normalization ``x / |x|``, x-transformers' ScaleNorm) has another one. So the magnitude ``K`` is
*measured*: the reference run (the original graph) records each post site's sum ``x + s`` and norm
output ``N``; ``|N_t|`` over the feature dim, per token ``t``, is ``K`` for every token of a
scale-invariant normalization without affine, and the identity uses ``(K / |x|) Geo*(x, s)``.
``SiteCheck.norm_gain`` is ``K / sqrt(d)`` (1 for RMS scaling) and ``gain_spread`` the relative spread of
``|N_t|`` over the tokens: when it is not ~0 the removed norm is not a scale-invariant normalization of
``x + s``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from ..api import _free_name
from ..capture import capture, normalize_inputs
from ..errors import GeoNormError, InvalidInputError, NoSitesError
from ..passes.ops import GraphView
from ..passes.rewrite import rewrite_sites
from ..passes.sites import analyze
from .affine import affine_free_copy, tiny_eps_graph
from .graphs import run_tapped, same_randomness

#: which identity checks a site of each kind (None: no identity of section 6 applies)
IDENTITY_OF = {"pre": "pre", "parallel": "pre", "sandwich": "pre", "post": "post",
               "respost": None, "deepnorm": None}
CHECKS = ("pre", "post")


# --------------------------------------------------------------------------------------------- the math
def geodesic_star(x: torch.Tensor, s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The geodesic step through ``x`` along the tangent part of ``s`` with the unclamped angle
    ``atan2(|v|, |x| + <x/|x|, s>)``: equals ``|x| (x + s) / |x + s|`` (computed in float64)."""
    x, s = x.double(), s.double()
    radius = x.norm(dim=dim, keepdim=True).clamp_min(1e-30)
    u = x / radius
    radial = (u * s).sum(dim, keepdim=True)
    v = s - radial * u
    v_norm = v.norm(dim=dim, keepdim=True)
    angle = torch.atan2(v_norm, radius + radial)
    return torch.cos(angle) * x + torch.sin(angle) * radius * v / v_norm.clamp_min(1e-30)


def post_identity(x: torch.Tensor, s: torch.Tensor, norm: str, dim: int = -1,
                  magnitude: float | None = None) -> torch.Tensor:
    """``N(x + s)`` for an affine-free, eps-free ``norm`` (``"rms_norm"`` / ``"layer_norm"``) over
    ``dim``, written as ``(K / |x|) Geo*(x, s)``; ``K`` = ``magnitude``, the norm's output magnitude per
    token (``sqrt(d)`` by default: RMS scaling; 1 for an L2 normalization)."""
    x, s = x.double(), s.double()
    if norm == "layer_norm":
        x, s = x - x.mean(dim, keepdim=True), s - s.mean(dim, keepdim=True)
    radius = x.norm(dim=dim, keepdim=True).clamp_min(1e-30)
    k = math.sqrt(x.shape[dim]) if magnitude is None else magnitude
    return k / radius * geodesic_star(x, s, dim)


def norm_magnitude(total: torch.Tensor, out: torch.Tensor, norm: str, dim: int = -1):
    """Measure ``K`` for ``out = N(total)``: ``(median |out_t|, spread, n_tokens)`` over the tokens ``t`` of
    ``total`` (feature dim ``dim``) whose (centred, for LayerNorm) state is not ~0; ``spread`` is
    ``(max - min) / median`` of ``|out_t|``. ``out`` may be a view of the sum's layout (``(B*T, d)``).
    None when no token can be measured."""
    d = total.shape[dim]
    t = total.detach().double().movedim(dim, -1).reshape(-1, d)
    if norm == "layer_norm":
        t = t - t.mean(-1, keepdim=True)
    if out.shape == total.shape:
        odim = dim
    elif out.dim() and out.shape[-1] == d:
        odim = -1
    else:
        sizes = [k for k, n in enumerate(out.shape) if n == d]
        if len(sizes) != 1:
            return None
        odim = sizes[0]
    o = out.detach().double().movedim(odim, -1).reshape(-1, d)
    t_norm, o_norm = t.norm(dim=-1), o.norm(dim=-1)
    if o.shape[0] == t.shape[0] and t.shape[0]:
        valid = (t_norm > 1e-3 * t_norm.median()) & (t_norm * t_norm > d * 1e-8)
    else:
        valid = o_norm > 0
    k = o_norm[valid]
    if not k.numel():
        return None
    median = float(k.median())
    if not median > 0:
        return None
    return median, float(k.max() - k.min()) / median, int(k.numel())


# ------------------------------------------------------------------------------------------ the modules
class _State:
    """Shared by the identity modules of one run: ``mode`` is ``"probe"`` or ``"rescale"``."""

    def __init__(self):
        self.mode = "probe"
        self.x: dict[int, torch.Tensor] = {}
        self.j: dict[int, float] = {}
        self.residual: dict[int, float] = {}


class PreIdentity(nn.Module):
    """Site ``index`` of the Pre-Norm identity: ``x + s`` while probing (recording ``x``), the rescaled
    update with the measured ``j`` afterwards."""

    def __init__(self, index: int, state: _State):
        super().__init__()
        self.index = index
        self._state = state

    def forward(self, x, s):
        state = self._state
        if state.mode == "probe":
            state.x[self.index] = x.detach().clone()
            return x + s
        x0 = state.x.get(self.index)
        if x0 is None or x0.shape != x.shape:
            state.j[self.index], state.residual[self.index] = math.nan, math.inf
            return x + s
        a, b = x.detach().double(), x0.double()
        b2 = float((b * b).sum())
        c = float((a * b).sum()) / b2 if b2 > 0 else 1.0
        a_norm = float(a.norm())
        state.residual[self.index] = float((a - c * b).norm()) / a_norm if a_norm > 0 else 0.0
        if not c > 0:  # the state flipped or vanished: no scale to measure
            state.j[self.index] = math.nan
            return x + s
        j = 1.0 / (c * c)
        state.j[self.index] = j
        return math.sqrt(j / (j + 1)) * x + (1.0 / math.sqrt(j + 1)) * s


class PostIdentity(nn.Module):
    """A post site's norm written through the geodesic step: ``(K/|x|) Geo*(x, s)``, ``K`` the norm's
    measured output magnitude (``sqrt(d)`` when not measured)."""

    def __init__(self, norm: str, dim: int, magnitude: float | None = None):
        super().__init__()
        self.norm, self.dim, self.magnitude = norm, dim, magnitude

    def forward(self, x, s):
        return post_identity(x, s, self.norm, self.dim, self.magnitude).to(x.dtype)


# ----------------------------------------------------------------------------------------- the oracle
@dataclass
class SiteCheck:
    """What the identities saw at one site: ``identity`` is ``"pre"``, ``"post"`` or None (not checked);
    ``j`` the measured position in its stream (pre); ``scale_residual`` ``|x' - c x| / |x'|`` (pre);
    ``norm_gain`` the removed norm's output magnitude over ``sqrt(d)`` (post: 1 for an RMS scaling,
    ``1/sqrt(d)`` for an L2 normalization; None when it could not be measured) and ``gain_spread`` its
    relative spread over the tokens (post: ~0 for a scale-invariant normalization of ``x + s``)."""

    kind: str
    identity: str | None
    j: float | None = None
    scale_residual: float | None = None
    norm_gain: float | None = None
    gain_spread: float | None = None


@dataclass
class IdentityOutcome:
    """``gap``: relative output change with the identities applied; ``probe_gap``: the same with every
    checked site computing plain ``x + s`` (post sites: their identity), nonzero when ``x + s`` is not
    what the model's sum computed; ``sites``: one :class:`SiteCheck` per input site."""

    gap: float
    probe_gap: float
    sites: list[SiteCheck] = field(default_factory=list)


def run_identities(gm: fx.GraphModule, sites: list, args=(), kwargs=None, *,
                   checks=CHECKS) -> IdentityOutcome:
    """Apply the identities named in ``checks`` to ``sites`` (any list of ``SiteMatch`` of ``gm``, e.g.
    ``analyze(GraphView(gm)).sites``, possibly tampered with) and measure the output change.

    ``gm`` is rewritten in place (use a fresh capture for another run). Sites whose kind has no identity
    in ``checks`` are left as they are. Raises :class:`GeoNormError` if no site can be checked.
    """
    args, kwargs = normalize_inputs(args, kwargs)
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise InvalidInputError(f"unknown identity check(s) {sorted(unknown)}: use {list(CHECKS)}")
    records = [SiteCheck(s.kind, IDENTITY_OF.get(s.kind) if IDENTITY_OF.get(s.kind) in checks else None)
               for s in sites]
    chosen = [i for i, r in enumerate(records) if r.identity is not None]
    if not chosen:
        raise GeoNormError(f"no site to check with the {'/'.join(checks)} identity (site kinds: "
                           f"{', '.join(sorted({s.kind for s in sites})) or 'none'}); section 6 of GEONORM.md "
                           "has identities for pre/sandwich/parallel and post sites only")
    posts = [i for i in chosen if records[i].identity == "post"]
    reference, values = run_tapped(gm, [n for i in posts for n in (sites[i].sum, sites[i].output)], args, kwargs)
    magnitudes: dict[int, float] = {}
    for i in posts:
        site = sites[i]
        total, out = values.get(site.sum), values.get(site.output)
        measured = (norm_magnitude(total, out, site.norm.kind, site.dim)
                    if isinstance(total, torch.Tensor) and isinstance(out, torch.Tensor) else None)
        if measured is not None:
            magnitudes[i] = measured[0]
            records[i].norm_gain = measured[0] / math.sqrt(total.shape[site.dim])
            records[i].gain_spread = measured[1]
    state = _State()
    modules = nn.ModuleList(PreIdentity(i, state) if records[i].identity == "pre"
                            else PostIdentity(sites[i].norm.kind, sites[i].dim, magnitudes.get(i)) for i in chosen)
    name = _free_name(gm, "_geonorm_oracle")
    gm.add_module(name, modules)
    rewrite_sites(gm, [sites[i] for i in chosen], [f"{name}.{k}" for k in range(len(chosen))])
    with torch.no_grad():
        with same_randomness():
            probed = gm(*args, **kwargs)
        state.mode = "rescale"
        with same_randomness():
            rescaled = gm(*args, **kwargs)
    for i in chosen:
        if records[i].identity == "pre":
            records[i].j = state.j.get(i, math.nan)
            records[i].scale_residual = state.residual.get(i, math.inf)
    return IdentityOutcome(relative_change(reference, rescaled), relative_change(reference, probed), records)


def relative_change(reference, changed) -> float:
    """``max|y - y'| / max|y|`` over the floating-point tensors of two output pytrees."""
    pairs = [(a, b) for a, b in zip(pytree.tree_leaves(reference), pytree.tree_leaves(changed))
             if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if not pairs:
        raise GeoNormError("the model has no floating-point output to compare")
    if any(not isinstance(b, torch.Tensor) or a.shape != b.shape for a, b in pairs):
        return math.inf
    gap = max(float((a.double() - b.double()).abs().max()) for a, b in pairs)
    scale = max(float(a.double().abs().max()) for a, _ in pairs)
    gap = gap / scale if scale > 0 else gap
    return gap if gap == gap else math.inf  # NaN: the identity broke the model


# ----------------------------------------------------------------------------------------- public API
def identity_gap(model, args=(), kwargs=None, *, tracer: str = "auto") -> float:
    """Apply GEONORM.md section 6 to every detected site and return the relative output change.

    On a copy of ``model`` whose norms are affine-free with eps 1e-12 (see
    :func:`geonorm_fx.oracles.affine.affine_free_copy`; functional norms without a module keep their
    default eps), every ``pre``/``sandwich``/``parallel`` site gets the Pre-Norm identity (with its
    position measured numerically) and every ``post`` site the Post-Norm identity; ``respost`` and
    ``deepnorm`` sites are left as they are. Returns ``max|y - y'| / max|y|`` over the floating outputs,
    ``y`` being the copy's own output: about 1e-6 when detection is right. Raises
    :class:`NoSitesError` when no site is found, :class:`GeoNormError` when none can be checked.
    """
    gm, sites = detect_on_affine_free_copy(model, args, kwargs, tracer=tracer)
    return run_identities(gm, sites, args, kwargs).gap


def prenorm_identity_gap(model, args=(), kwargs=None, *, tracer: str = "auto") -> float:
    """The Pre-Norm identity alone, for a pure Pre-Norm model: :func:`identity_gap` restricted to
    ``pre`` sites. Raises :class:`GeoNormError` if the model has sites of another kind."""
    gm, sites = detect_on_affine_free_copy(model, args, kwargs, tracer=tracer, who="prenorm_identity_gap")
    others = sorted({s.kind for s in sites if s.kind != "pre"})
    if others:
        raise GeoNormError(f"prenorm_identity_gap needs a pure Pre-Norm model, but it has {', '.join(others)} "
                           "sites: the identity of GEONORM.md section 6 holds only for Pre-Norm")
    return run_identities(gm, sites, args, kwargs, checks=("pre",)).gap


def detect_on_affine_free_copy(model, args=(), kwargs=None, *, tracer: str = "auto", who: str = "identity_gap"):
    """Capture an affine-free, tiny-eps copy of ``model`` and run the detector on it: ``(gm, sites)``."""
    args, kwargs = normalize_inputs(args, kwargs)
    gm = tiny_eps_graph(capture(affine_free_copy(as_module(model)).model, args, kwargs, tracer=tracer,
                                modes=("eval",)).graphs["eval"])
    sites = analyze(GraphView(gm)).sites
    if not sites:
        raise NoSitesError(f"{who} found no residual site in the model")
    return gm, sites


def as_module(model) -> nn.Module:
    if isinstance(model, ExportedProgram):
        return model.module()
    if not isinstance(model, nn.Module):
        raise InvalidInputError(
            f"expected a torch.nn.Module, fx.GraphModule or ExportedProgram, got {type(model).__name__}")
    return model
