"""The geodesic residual update of GEONORM.md section 2, as ordinary PyTorch.

The same code runs in eager mode, is traced by torch.export, fused by Inductor and translated to ONNX.
"""
from __future__ import annotations

import math
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

_SQUARE_FLOOR = 1e-30  # below V_FLOOR ** 2: flooring a square here changes no guard's outcome

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
    parallel to ``x``) returns ``x``. Only the tangent part of ``s`` moves the state. Gradients stay
    finite at both guards because every divisor and square root is floored.
    """
    if x.shape != s.shape:
        raise InvalidInputError(
            f"geodesic_step needs x and s of the same shape, got {tuple(x.shape)} and {tuple(s.shape)}")
    out_dtype = torch.promote_types(x.dtype, s.dtype)  # (torch.result_type breaks a dynamo graph)
    xf = x.float()
    sf = s.float()
    # Eager inference allocates one full-size tensor, as the source's add did; with autograd on, the tangent
    # and the output are separate tensors. Inductor fuses the whole step into one loop.
    # The tangent is formed explicitly, not through |v|^2 = <s,s> - <x,s>^2/<x,x>: that difference cancels
    # catastrophically when s is nearly parallel to x and would break the norm invariant.
    radius_raw = _norm(xf, dim)
    r2 = radius_raw * radius_raw
    r2_safe = r2.clamp_min(R2_FLOOR)
    radius = radius_raw.clamp_min(math.sqrt(R2_FLOOR))
    overwrite = _overwritable()
    if overwrite:  # one full-size buffer, as the source's x + s: the products x*s, then v, then the output
        v = torch.mul(xf, sf)
        along = v.sum(dim, keepdim=True) / r2_safe
        torch.addcmul(sf, along, xf, value=-1.0, out=v)
    else:
        along = torch.linalg.vecdot(xf, sf, dim=dim).unsqueeze(dim) / r2_safe
        v = torch.addcmul(sf, along, xf, value=-1.0)
    v_raw = _norm(v, dim)
    v_norm = v_raw.clamp_min(V_FLOOR)
    theta0 = torch.clamp(v_norm / radius, max=clamp)
    theta = ((scale * theta0 + bias) * decay).clamp(-clamp, clamp)
    # out = a*x + b*v with per-token scalars; the guards only select other scalars:
    # R < 1e-6 gives x + s = (1 + along) x + v, |v| < 1e-8 gives x.
    parallel = v_raw < V_FLOOR
    empty = radius_raw < R_FLOOR
    a = torch.where(empty, 1.0 + along, torch.where(parallel, 1.0, torch.cos(theta)))
    b = torch.where(empty, 1.0, torch.where(parallel, 0.0, torch.sin(theta) * radius / v_norm))
    if overwrite:
        out = v.mul_(b).addcmul_(a, xf)
    else:
        out = torch.addcmul(a * xf, b, v)
    return out.to(out_dtype)


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
        decay = float(decay)
        clamp = float(clamp)
        if not math.isfinite(decay):
            raise InvalidInputError(f"decay must be finite, got {decay}")
        if not (0.0 < clamp <= math.pi):
            raise InvalidInputError(f"clamp must be an angle in (0, pi], got {clamp}")
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
