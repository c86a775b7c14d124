"""Class 8: the report's ``dynamic`` flag tells the truth (CONTRACT.md: ``dynamic=True``: the result accepts
other batch sizes and sequence lengths than the example; every error raised on purpose derives from
``gf.GeoNormError``). A converted module called at a size its capture fixed must raise a GeoNormError
that names the dim, and its report must then say ``dynamic=False``.

``dynamic["maybe"]``: inputs the source model runs: the converted module either matches the reference or
raises a GeoNormError naming the dim (and then ``report.dynamic`` is False). ``dynamic["bad"]``: inputs the
source model itself cannot run (its size is fixed): a GeoNormError naming the dim, ``report.dynamic``
False, never a raw AssertionError / RuntimeError."""
from __future__ import annotations

from . import D, Kept, S, case, randn, tokens
from .blocks import LM, Pre, lm_ref, stack


@case("batch1-example", sites=S("pre", 0, 0, 1, per=2), inputs=lambda: [(tokens(1, 5),)], ref=lm_ref,
      kept=[Kept("final", why="final norm")],
      dynamic={"maybe": [((tokens(3, 5),), 0), ((tokens(1, 7),), 1), ((tokens(2, 6),), 0)], "bad": []})
def batch1():
    """A batch-1 example (export specializes a size-1 dim): the sites are found as usual; at batch 3 the
    converted module either works (matching the reference) or raises a GeoNormError naming dim 0, and
    then the report must not claim ``dynamic=True``."""
    return LM([Pre(), Pre()])


@case("seq1-example", sites=S("pre", 0, 0, 1, per=2), inputs=lambda: [(tokens(2, 1),)], ref=lm_ref,
      kept=[Kept("final", why="final norm")], dynamic={"maybe": [((tokens(2, 5),), 1), ((tokens(3, 1),), 0)], "bad": []})
def seq1():
    """A sequence-1 example (export specializes a size-1 dim): the sites are found as usual; at sequence 5
    the converted module either works (matching the reference) or raises a GeoNormError naming dim 1,
    and then the report must not claim ``dynamic=True``."""
    return LM([Pre(), Pre()])


class AssertSeq(LM):
    def forward(self, t):
        assert t.shape[1] == 8, "this model needs 8 tokens"
        return super().forward(t)


@case("seq-fixed-by-assert", sites=S("pre", 0, 0, 1, per=2), inputs=lambda: [(tokens(2, 8),)], ref=lm_ref,
      kept=[Kept("final", why="final norm")], dynamic={"maybe": [((tokens(3, 8),), 0)], "bad": [((tokens(2, 6),), 1)]})
def assert_seq():
    """``assert t.shape[1] == 8`` in the forward fixes the sequence length at capture: ``report.dynamic``
    must be False, and calling at sequence 6 must raise a GeoNormError naming dim 1 (not the raw
    AssertionError / guard error); batch 3 at sequence 8 works or raises naming dim 0."""
    return AssertSeq([Pre(), Pre()])


class PosBuffer(LM):
    def __init__(self):
        super().__init__([Pre(), Pre()])
        self.register_buffer("pos", randn(1, 8, D, seed=7))

    def _run(self, t, step):
        return self.head(self.final(stack(self.blocks, self.embed(t) + self.pos, step)))


@case("seq-fixed-by-buffer", sites=S("pre", 0, 0, 1, per=2), inputs=lambda: [(tokens(2, 8),)], ref=lm_ref,
      kept=[Kept("final", why="final norm")], dynamic={"maybe": [((tokens(3, 8),), 0)], "bad": [((tokens(2, 6),), 1)]})
def buffer_seq():
    """A fixed-size position buffer ``(1, 8, d)`` added to the embeddings fixes the sequence length (the
    position add is not a site): ``report.dynamic`` False, sequence 6 raises a GeoNormError naming dim 1."""
    return PosBuffer()

