"""Class 5: in-place residual adds, captured with tracer="fx" (which sees the mutating calls) and
tracer="export" (which functionalizes them). A site written ``x.add_(f(N(x)))`` is still
``x + f(N(x))`` (section 4): its value is the state that leaves the step, whatever name it is read by."""
from __future__ import annotations

from . import Kept, S, case, token_inputs
from .blocks import LM, RMS, Pre, lm_ref


class AddUnderscore(Pre):
    """``x.add_(mix(n1(x)))`` and ``x.add_(mlp(n2(x)))``; the results are not rebound."""

    def __init__(self):
        super().__init__(norm2=RMS)

    def forward(self, x):
        x.add_(self.mix(self.n1(x)))
        x.add_(self.mlp(self.n2(x)))
        return x


class IAdd(AddUnderscore):
    """``x += mix(n1(x))``; ``x += mlp(n2(x))``."""

    def forward(self, x):
        x += self.mix(self.n1(x))
        x += self.mlp(self.n2(x))
        return x


class AliasReturn(AddUnderscore):
    """The state is mutated through an alias and returned by its original name:
    ``y = x; y += mix(n1(x)); z = x; z.add_(mlp(n2(x))); return x``."""

    def forward(self, x):
        y = x
        y += self.mix(self.n1(x))
        z = x
        z.add_(self.mlp(self.n2(x)))
        return x


_SITES = S("pre", 0, 0, 1, per=2)
_TRACERS = ("fx", "export")


@case("inplace-add_-unbound", sites=_SITES, inputs=token_inputs(), ref=lm_ref, kept=[Kept("final", why="final norm")],
      tracers=_TRACERS)
def add_unbound():
    """Pre-Norm blocks written ``x.add_(f(N(x)))`` without rebinding the result: the same 4 pre sites as
    ``x = x + f(N(x))``; the converted model must read the updated state at every later use."""
    return LM([AddUnderscore(), AddUnderscore()])


@case("inplace-iadd", sites=_SITES, inputs=token_inputs(), ref=lm_ref, kept=[Kept("final", why="final norm")], tracers=_TRACERS)
def iadd():
    """Pre-Norm blocks written ``x += f(N(x))``: 4 pre sites."""
    return LM([IAdd(), IAdd()])


@case("inplace-alias-return", sites=_SITES, inputs=token_inputs(), ref=lm_ref, kept=[Kept("final", why="final norm")],
      tracers=("export",))
def alias_return():
    """The residual add is done in place through an alias (``y = x; y += f(N(x))``) and the block returns
    ``x``: the aliases are seen through (section 4), 4 pre sites, and the returned value is the updated
    state (a rewrite that replaces the in-place add by an out-of-place op and returns the stale ``x``
    computes the wrong function). Export only: symbolic_trace records ``y += t`` as ``y = y + t`` and loses
    the mutation of ``x``, so ``tracer="fx"`` refuses the model (tests/test_capture.py)."""
    return LM([AliasReturn(), AliasReturn()])
