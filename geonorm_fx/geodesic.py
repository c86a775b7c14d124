"""The geodesic residual update of GEONORM.md section 2, as ordinary PyTorch.

The same code runs in eager mode, is traced by torch.export, fused by Inductor and translated to ONNX.
"""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from typing import Iterator, Union

import torch
from torch import Tensor, nn

from .errors import InvalidInputError, ScheduleError

#: ``R`` is floored here; a token whose state norm is below it falls back to ``x + s``.
R_FLOOR = 1e-6
#: ``|v|`` is floored here; a token whose tangent norm is below it keeps ``x`` unchanged.
V_FLOOR = 1e-8
#: ``r2 = <x, x>`` is floored here before dividing by it.
R2_FLOOR = 1e-12

_SQUARE_FLOOR = 1e-30  # below _SCALED_V_FLOOR ** 2: flooring a square here changes no guard's outcome
#: the tangent floor in units of ``a_s = max(max|s|, 1)``: ``V_FLOOR / a_s``, but not below this (a tangent
#: under 1e-12 of ``max|s|`` is beneath float32's resolution of ``s``; the floored quotients stay finite)
_SCALED_V_FLOOR = 1e-12

Scalar = Union[float, Tensor]


def geodesic_step(x: Tensor, s: Tensor, *, scale: Scalar = 1.0, bias: Scalar = 0.0,
                  decay: Scalar = 1.0, clamp: float = math.pi / 4, dim: int = -1) -> Tensor:
    """Move ``x`` along the great circle of radius ``|x|`` towards the tangent part of ``s``.

    Per token, over the feature dimension ``dim`` (the last one by default; ``-2`` for a channels-first
    ``(N, C, L)`` stream); all arithmetic in float32, the result cast to the promoted dtype of ``x`` and
    ``s``::

        r2  = <x, x>,  R = sqrt(max(r2, 1e-12))
        v   = s - (<x, s> / max(r2, 1e-12)) x          # tangent projection, <v, x> = 0
        th0 = min(|v| / R, clamp)
        th  = clip((scale * th0 + bias) * decay, -clamp, clamp)
        out = cos(th) x + sin(th) R v / max(|v|, 1e-8)  # exp map, |out| == |x|

    Fallbacks: a token with ``R < 1e-6`` returns ``x + s``; a token with ``|v| < 1e-8`` (``s``
    parallel to ``x``) returns ``x``, as does one whose tangent is below ``1e-12 * max|s|`` (under float32's
    resolution of ``s``). Only the tangent part of ``s`` moves the state. Gradients stay finite at both guards
    because every divisor and square root is floored.

    No overflow: the norms and dot products are taken of ``x / a_x`` and ``s / a_s`` with ``a`` a power of two
    near ``max(max|.|, 1)`` per token (the update is scale-equivariant), so the squares never overflow float32:
    values and gradients stay finite for states and branch outputs up to ``~1e30`` per element (the unscaled
    squares overflowed from ``~1.8e19``). Scaling by a power of two is exact, so every token is computed bit
    for bit as by the formula above wherever that formula did not overflow.

    Raises :class:`InvalidInputError` for non-floating ``x`` / ``s``, different shapes, a ``dim`` out of range
    or a ``clamp`` outside ``(0, pi]``.
    """
    _check_step_args(x, s, clamp, dim)
    out_dtype = torch.promote_types(x.dtype, s.dtype)  # (torch.result_type breaks a dynamo graph)
    xf = x.float()
    sf = s.float()
    # Per-token scales, constants for autograd (for any fixed a_x, a_s the steps below compute the same function
    # of x and s, so the gradient is exact). a_x > 1 implies |x / a_x| >= 1: the R floors and the R < 1e-6 guard
    # then act only on tokens with a_x == 1, as in the unscaled formula.
    ax = _power_of_two_scale(xf, dim)
    as_ = _power_of_two_scale(sf, dim)
    # Eager inference allocates one full-size tensor, as the source's add did; with autograd on, x / a_x, the
    # tangent and the output are separate tensors. Inductor fuses the whole step into one loop.
    # The tangent is formed explicitly, not through |v|^2 = <s,s> - <x,s>^2/<x,x>: that difference cancels
    # catastrophically when s is nearly parallel to x and would break the norm invariant.
    # Units: with x' = x / a_x, the tangent is v = s - c x' where c = <x', s> / <x', x'> (= a_x <x,s>/<x,x>);
    # it is stored as v' = v / a_s. With a_x == a_s == 1 every step below is the formula's, bit for bit.
    overwrite = _overwritable()
    if overwrite:  # one full-size buffer: x', then x' * s, then x' again, then v', then the output
        v = torch.div(xf, ax)
        radius_raw = _norm(v, dim)                          # |x'|
        dot = v.mul_(sf).sum(dim, keepdim=True)             # <x', s>
    else:
        xs = xf / ax
        radius_raw = _norm(xs, dim)
        dot = torch.linalg.vecdot(xs, sf, dim=dim).unsqueeze(dim)
    r2 = radius_raw * radius_raw
    c = dot / r2.clamp_min(R2_FLOOR)
    radius = radius_raw.clamp_min(math.sqrt(R2_FLOOR))
    if overwrite:
        torch.div(xf, ax, out=v)
        torch.addcmul(sf, c, v, value=-1.0, out=v).div_(as_)
    else:
        v = torch.addcmul(sf, c, xs, value=-1.0).div_(as_)  # (addcmul's result is not saved for backward)
    v_raw = _norm(v, dim)                                  # |v'| = |v| / a_s
    v_floor = (V_FLOOR / as_).clamp_min(_SCALED_V_FLOOR)   # V_FLOOR in units of a_s
    v_norm = v_raw.clamp_min(v_floor)
    theta0 = torch.clamp(v_norm / radius * (as_ / ax), max=clamp)   # |v| / R
    theta = ((scale * theta0 + bias) * decay).clamp(-clamp, clamp)
    # out = a*x + b*v' with per-token scalars; the guards only select other scalars:
    # R < 1e-6 gives x + s = (1 + c / a_x) x + a_s v', |v| < 1e-8 gives x.
    parallel = v_raw < v_floor
    empty = radius_raw < R_FLOOR                            # a_x > 1 implies |x'| >= 1: only a_x == 1 tokens
    a = torch.where(empty, 1.0 + c / ax, torch.where(parallel, 1.0, torch.cos(theta)))
    b = torch.where(empty, as_, torch.where(parallel, 0.0, torch.sin(theta) * radius / v_norm * ax))
    if overwrite:
        out = v.mul_(b).addcmul_(a, xf)
    else:
        out = torch.addcmul(a * xf, b, v)
    return out.to(out_dtype)


def _check_step_args(x, s, clamp, dim) -> None:
    """The checks of :func:`geodesic_step` (plain Python on constants: nothing is traced)."""
    for name, t in (("x", x), ("s", s)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            kind = f"a {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise InvalidInputError(f"geodesic_step needs floating-point tensors, got {kind} for {name}: "
                                    "pass the residual stream and the branch output as float tensors")
    if x.shape != s.shape:
        raise InvalidInputError(
            f"geodesic_step needs x and s of the same shape, got {tuple(x.shape)} and {tuple(s.shape)}")
    if x.dim() == 0:
        raise InvalidInputError("geodesic_step needs tensors with a feature dimension, got 0-d x and s")
    if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise InvalidInputError(f"dim must be an int in [{-x.dim()}, {x.dim() - 1}] (the feature dimension of "
                                f"the {x.dim()}-d inputs), got {dim!r}")
    check_clamp(clamp)


def check_clamp(clamp) -> float:
    """``clamp`` as a float; :class:`InvalidInputError` unless it is a real number in ``(0, pi]``."""
    if isinstance(clamp, bool) or not isinstance(clamp, numbers.Real) or not 0.0 < float(clamp) <= math.pi:
        raise InvalidInputError(f"clamp must be an angle in (0, pi] (radians; default pi/4), got {clamp!r}")
    return float(clamp)


def _power_of_two_scale(t: Tensor, dim: int) -> Tensor:
    """Per token, a power of two ``a >= 1`` near ``max |t|`` (``1`` when every ``|t| <= 1``). Dividing and
    multiplying by a power of two is exact in floating point, so every step of :func:`geodesic_step` on the
    scaled values is the unscaled formula's result scaled exactly: the output is bit for bit the unscaled
    formula's wherever that did not overflow (rankings by norm, ties and guards come out the same), and finite
    where it did."""
    return torch.exp2(torch.ceil(torch.log2(_amax_abs(t, dim).clamp_min(1.0))))


def _amax_abs(t: Tensor, dim: int) -> Tensor:
    """``max |t|`` over ``dim`` (kept), without a gradient (a per-token scale). Traced (torch.compile,
    torch.export, hence ONNX ReduceMax): ``amax(abs(t))``, which the compilers fuse; eager: ``max(amax(t),
    -amin(t))``, two fast reductions with no full-size temporary (``vector_norm(t, inf)`` is ~20x slower)."""
    t = t.detach()
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return t.abs().amax(dim, keepdim=True)
    return torch.maximum(t.amax(dim, keepdim=True), t.amin(dim, keepdim=True).neg_())


def _overwritable() -> bool:
    """True when an intermediate of the step may be overwritten in place: eager code with autograd off (no
    graph saved it). Traced code (torch.compile, torch.export) keeps the functional form, which the
    compilers fuse or translate as they see fit."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _norm(t: Tensor, dim: int) -> Tensor:
    """``|t|`` over ``dim`` (kept). Eager and torch.compile: one ``vector_norm``. Under torch.export (hence
    ONNX and AOTInductor): ``sqrt(<t, t>)``, which ONNX Runtime's CPU provider runs as Mul + ReduceSum, about
    3x faster than its ReduceL2; the square is floored far below every guard so that the square root's
    gradient stays finite at ``t = 0``."""
    if torch.compiler.is_exporting():
        return torch.linalg.vecdot(t, t, dim=dim).unsqueeze(dim).clamp_min(_SQUARE_FLOOR).sqrt()
    return torch.linalg.vector_norm(t, dim=dim, keepdim=True)


class GeodesicUpdate(nn.Module):
    """``forward(x, s) = geodesic_step(x, s, scale, bias, decay, clamp, dim)`` for one residual site.

    ``scale`` (init 1) and ``bias`` (init 0) are 1-element parameters when ``learnable`` is true (not 0-dim:
    FSDP2 shards no 0-dim parameter) and plain constants otherwise; ``decay`` is the site's layer-wise decay
    constant (GEONORM.md section 3); ``dim`` the stream's feature dimension (negative: counted from the end).

    ``decay`` is also a persistent buffer ``decay_constant`` (float64), so a ``state_dict`` records the
    schedule it was trained with: loading it into an update with another decay raises :class:`ScheduleError`
    (a model converted or installed with another schedule) instead of silently changing the model.
    """

    def __init__(self, decay: float = 1.0, clamp: float = math.pi / 4, learnable: bool = True, dim: int = -1):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim >= 0:
            raise InvalidInputError(f"dim must be a negative int (counted from the end), got {dim!r}")
        self.dim = dim
        try:
            decay = float(decay)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidInputError(f"decay must be a finite real number, got {decay!r}") from None
        if not math.isfinite(decay):
            raise InvalidInputError(f"decay must be finite, got {decay}")
        clamp = check_clamp(clamp)
        self.decay = decay
        self.clamp = clamp
        self.learnable = bool(learnable)
        if self.learnable:
            self.scale = nn.Parameter(torch.ones(1))
            self.bias = nn.Parameter(torch.zeros(1))
        else:
            self.scale = 1.0
            self.bias = 0.0
        self.register_buffer("decay_constant", torch.tensor([decay], dtype=torch.float64))
        self._register_load_state_dict_pre_hook(_check_decay_on_load, with_module=True)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return geodesic_step(x, s, scale=self.scale, bias=self.bias, decay=self.decay, clamp=self.clamp,
                             dim=self.dim)

    def extra_repr(self) -> str:
        feature = "" if self.dim == -1 else f", dim={self.dim}"
        return f"decay={self.decay:.6g}, clamp={self.clamp:.6g}, learnable={self.learnable}{feature}"


def _check_decay_on_load(module: GeodesicUpdate, state_dict, prefix, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs) -> None:
    _check_decay(module, state_dict, prefix)


def check_decays_before_load(root: nn.Module, state_dict, prefix, *_rest) -> None:
    """A ``load_state_dict`` pre-hook for a model holding updates: every update's decay is compared before
    any tensor is loaded, so a refused ``state_dict`` changes nothing."""
    for name, module in root.named_modules():
        if isinstance(module, GeodesicUpdate):
            _check_decay(module, state_dict, prefix + (name + "." if name else ""))


def _check_decay(module: GeodesicUpdate, state_dict, prefix: str) -> None:
    """Refuse a ``state_dict`` whose decay constant differs from this update's (compared at the coarser of
    the two precisions: a model cast to bfloat16 holds its decays in bfloat16)."""
    saved = state_dict.get(prefix + "decay_constant")
    if saved is None or not isinstance(saved, torch.Tensor) or saved.numel() != 1:
        return
    mine = module.decay_constant
    coarse = saved.dtype if torch.finfo(saved.dtype).eps > torch.finfo(mine.dtype).eps else mine.dtype
    a, b = float(saved.reshape(())), float(mine.reshape(()))
    if abs(a - b) > 2 * torch.finfo(coarse).eps * max(abs(a), abs(b), 1e-12):
        raise ScheduleError(
            f"the state_dict was saved with decay {a:.6g} at {prefix}decay_constant, but this model's update "
            f"there has decay {b:.6g}: it was converted or installed with another schedule (or another block "
            "numbering). Load it into a model converted/installed with the schedule the state_dict was "
            "trained with")


@contextmanager
def record_norm_changes(module: nn.Module) -> Iterator[list[float]]:
    """While active, every :class:`GeodesicUpdate` call inside ``module`` appends its worst relative state-norm
    change ``max | |out| - |x| | / |x|`` over tokens with ``|x| >= R_FLOOR`` (the section 2 invariant) to the
    yielded list."""
    changes: list[float] = []

    def hook(mod, inputs, out):
        radius = inputs[0].float().norm(dim=mod.dim)
        ok = radius >= R_FLOOR
        gap = (out.float().norm(dim=mod.dim) - radius).abs()[ok] / radius[ok]
        changes.append(float(gap.max()) if gap.numel() else 0.0)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, GeodesicUpdate)]
    try:
        yield changes
    finally:
        for h in handles:
            h.remove()
