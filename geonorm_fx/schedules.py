"""Layer-wise update decay (GEONORM.md section 3).

``k`` is the 0-based block index along the residual stream and ``L`` the number of blocks.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Union

from .errors import ScheduleError

Schedule = Union[str, Sequence[float], Callable[[int, int], float]]

_NAMED: dict[str, Callable[[int, int], float]] = {
    "harmonic": lambda k, n: 1.0 / (k + 1),
    "sqrt": lambda k, n: 1.0 / math.sqrt(k + 1),
    "linear": lambda k, n: (n - k) / n,
    "none": lambda k, n: 1.0,
}

SCHEDULE_NAMES = tuple(_NAMED)


def decay_constants(schedule: Schedule, n_blocks: int) -> list[float]:
    """Return ``[decay_0, ..., decay_{L-1}]`` for ``L = n_blocks``.

    - ``"harmonic"``: ``1/(k+1)`` (default, best in the paper); ``"sqrt"``: ``1/sqrt(k+1)``;
      ``"linear"``: ``(L-k)/L``; ``"none"``: ``1``.
    - a sequence of exactly ``L`` floats is used as given;
    - a callable ``f(k, L) -> float`` is evaluated per block.

    Every constant must be a finite real number; anything else raises :class:`ScheduleError`.
    """
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 0:
        raise ScheduleError(f"n_blocks must be a non-negative int, got {n_blocks!r}")
    if isinstance(schedule, str):
        try:
            fn = _NAMED[schedule]
        except KeyError:
            raise ScheduleError(
                f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULE_NAMES)}, "
                "a sequence of per-block floats, or a callable (k, L) -> float") from None
        values = [fn(k, n_blocks) for k in range(n_blocks)]
    elif callable(schedule):
        values = [_call(schedule, k, n_blocks) for k in range(n_blocks)]
    elif isinstance(schedule, Sequence):
        values = list(schedule)
        if len(values) != n_blocks:
            raise ScheduleError(
                f"the schedule sequence has {len(values)} values but the model has {n_blocks} blocks: "
                "give exactly one decay constant per block")
    else:
        raise ScheduleError(
            f"schedule must be a name, a sequence of floats or a callable, got {type(schedule).__name__}")
    out = []
    for k, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ScheduleError(f"decay constant for block {k} is not a number: {v!r}") from None
        if not math.isfinite(f):
            raise ScheduleError(f"decay constant for block {k} is not finite: {f}")
        out.append(f)
    return out


def _call(schedule: Callable, k: int, n: int):
    try:
        return schedule(k, n)
    except Exception as e:  # noqa: BLE001 - the user's function: its error, said in our terms
        raise ScheduleError(f"the schedule callable raised {type(e).__name__} for block k={k} of L={n}: {e}. "
                            "A schedule callable takes (k, L) (0-based block index, number of blocks) and "
                            "returns a finite float") from e


def validate_schedule(schedule: Schedule) -> None:
    """Check ``schedule`` before any model is captured: a known name, a sequence of finite numbers (its length is
    checked against the model's blocks later), or a callable that takes ``(k, L)`` and returns a finite number
    (it is called for a few small ``(k, L)``). Raises :class:`ScheduleError` saying what is wrong."""
    if isinstance(schedule, str):
        if schedule not in _NAMED:
            decay_constants(schedule, 0)  # the unknown-name error with the list of names
        return
    if callable(schedule):
        import inspect

        try:
            inspect.signature(schedule).bind(0, 1)
        except TypeError:
            raise ScheduleError(f"the schedule callable {getattr(schedule, '__name__', schedule)!r} does not take "
                                "two arguments (k, L): give a function f(k, L) -> float") from None
        except ValueError:  # no signature to inspect (a builtin): calling it below decides
            pass
        for n in (1, 2, 3):
            decay_constants(schedule, n)
        return
    if isinstance(schedule, Sequence) and not isinstance(schedule, (bytes, bytearray)):
        decay_constants(list(schedule), len(schedule))
        return
    raise ScheduleError(
        f"schedule must be a name ({', '.join(SCHEDULE_NAMES)}), a sequence of floats or a callable (k, L) -> float, "
        f"got {type(schedule).__name__}")
