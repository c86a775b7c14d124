"""Class 3: sums split by dataflow (GEONORM.md section 4, "Decision (soundness)": a sum with more than two
terms is split by dataflow, not by association: ``h[-1] + h[-2]``, dense and U-Net skips, or input
injection ``block(h) + e`` keep every block's own site, and an extra term never becomes the stream)."""
from __future__ import annotations

import torch
from torch import nn

from . import D, VOCAB, Kept, S, SHAPES, case, geo, token_inputs, tokens
from .blocks import LN, MLP, Mix, Pre, Pre1, Stepped, Stepped2, stack


class LastStates(Stepped):
    """Three one-site Pre-Norm blocks; the head reads the sum of the last ``n`` states."""

    def __init__(self, n=2):
        super().__init__()
        self.n = n
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Pre1(branch=MLP), Pre1(branch=Mix), Pre1(branch=MLP)])
        self.final = LN()
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, step):
        h = [self.embed(t)]
        for k, b in enumerate(self.blocks):
            h.append(step(b, h[-1], k))
        out = h[-1] + h[-2]
        if self.n == 3:
            out = out + h[-3]
        return self.head(self.final(out))


@case("sum-last-two-states", sites=S("pre", 0, 0, 1, 2), inputs=token_inputs(), ref=lambda m, t: m.geonorm(t),
      kept=[Kept("final", why="final norm")])
def last_two():
    """Three pre blocks, then ``final(h[-1] + h[-2])``: ``h[-1] = h[-2] + f(N(h[-2]))`` so the head's sum
    has three terms; split by dataflow every block keeps its own site: 3 pre sites, blocks 0, 1, 2."""
    return LastStates(2)


class Injection(Stepped):
    """``h = LN(e)``; each block: ``h = block(h) + e`` (or ``e + block(h)``)."""

    def __init__(self, order="after"):
        super().__init__()
        self.order = order
        self.embed = nn.Embedding(VOCAB, D)
        self.emb_norm = LN()
        self.blocks = nn.ModuleList([Pre(), Pre()])
        self.final = LN()
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, step):
        e = self.embed(t)
        h = self.emb_norm(e)
        for k, b in enumerate(self.blocks):
            h = step(b, h, k) + e if self.order == "after" else e + step(b, h, k)
        return self.head(self.final(h))


_INJ_KEPT = [Kept("emb_norm", why="embedding norm"), Kept("final", why="final norm")]


@case("input-injection-after", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t), kept=_INJ_KEPT)
def injection_after():
    """Input injection ``h = block(h) + e`` after ``h0 = LN(e)``: the blocks' own pre sites (4); ``e``
    never becomes the stream; ``LN(e)`` is an embedding norm (skipped)."""
    return Injection("after")


class InjectBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.n, self.f = LN(), MLP()

    def forward(self, x, e):
        return x + (self.f(self.n(x)) + e)

    def geonorm(self, x, e, k):
        return geo(x, self.f(self.n(x)), k) + e


class InjectInside(Stepped):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([InjectBlock(), InjectBlock(), InjectBlock()])
        self.final = LN()
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, step):
        e = self.embed(t)
        return self.head(self.final(stack(self.blocks, e, step, e)))


@case("input-injection-inside-right-assoc", sites=S("pre", 0, 0, 1, 2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("final", why="final norm")], abstain=True,
      abstain_kept=[Kept(f"blocks.{i}.n", why="skipped when abstaining") for i in range(3)])
def injection_inside():
    """Abstain allowed. Inside the block, ``x + (f(N(x)) + e)``: split by dataflow (not by association)
    the site is ``x + f(N(x))`` and ``e`` is an extra term: ``Geo(x, f(N(x))) + e``; since the spec
    only names ``block(h) + e`` explicitly, abstaining (norms skipped, nothing rewritten) is accepted,
    but folding ``e`` into the stream or the update is not."""
    return InjectInside()


class Dense(Stepped):
    """DenseNet-style: each block reads the sum of all earlier states."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Pre1(), Pre1(branch=Mix), Pre1()])
        self.final = LN()
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, step):
        hs = [self.embed(t)]
        for k, b in enumerate(self.blocks):
            u = hs[0]
            for h in hs[1:]:
                u = u + h
            hs.append(step(b, u, k))
        return self.head(self.final(hs[-1]))


@case("densenet-sum-of-states", sites=S("pre", 0, 0, 1, 2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("final", why="final norm")])
def densenet():
    """DenseNet-style sums ``u_k = h_0 + ... + h_k`` feeding one-site pre blocks: dense skips keep every
    block's own site (3 pre sites, blocks 0, 1, 2); the sums of states are not sites."""
    return Dense()


class UNet(Stepped):
    """A U-Net of pre blocks at one width: down stack, up stack, skips added before each up block."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.down = nn.ModuleList([Pre(), Pre()])
        self.up = nn.ModuleList([Pre(), Pre(), Pre()])
        self.final = LN()
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, step):
        x = self.embed(t)
        skips = []
        for k, b in enumerate(self.down):
            x = step(b, x, k)
            skips.append(x)
        for k, b in enumerate(self.up):  # the first up block has no skip (it would be x + x)
            x = step(b, x + skips.pop() if k else x, len(self.down) + k)
        return self.head(self.final(x))


@case("unet-skips", sites=S("pre", 0, 0, 1, 2, 3, 4, per=2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("final", why="final norm")])
def unet():
    """U-Net skips (``up_j(x + skip)``) between a down and an up stack of one width: every block keeps its
    own two pre sites; no norm-only boundary separates the stacks, so one stream whose blocks are
    numbered in order of application: down 0, 1, up 2, 3, 4."""
    return UNet()


class Towers(Stepped2):
    def __init__(self):
        super().__init__()
        self.emb_a, self.emb_b = nn.Embedding(VOCAB, D), nn.Embedding(VOCAB, D)
        self.tower_a = nn.ModuleList([Pre(), Pre()])
        self.tower_b = nn.ModuleList([Pre(norm=lambda d: nn.RMSNorm(d, eps=1e-6)), Pre()])
        self.final = LN()
        self.head = nn.Linear(D, VOCAB)

    def _run(self, a, b, step):
        x = stack(self.tower_a, self.emb_a(a), step)
        return self.head(self.final(x + stack(self.tower_b, self.emb_b(b), step)))


@case("two-towers-merge", sites=S("pre", 0, 0, 1, per=2) + S("pre", 1, 0, 1, per=2),
      inputs=lambda: [(tokens(b, t), tokens(b, t, seed=1)) for b, t in SHAPES],
      ref=lambda m, a, b: m.geonorm(a, b), kept=[Kept("final", why="final norm")])
def towers():
    """Two towers on two inputs that merge (``towerA(x) + towerB(y)``): two residual streams (no path from
    one to the other), each numbered from 0 (A first, in stream order); the merge sum is not a site and
    the norm after it is a final norm."""
    return Towers()


class BreakBetweenBlocks(Stepped):
    """Pre blocks with ``torch._dynamo.graph_break()`` between them (a logging call, a ``.item()``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Pre(), Pre(), Pre()])
        self.final = LN()
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, step):
        x = self.embed(t)
        for k, block in enumerate(self.blocks):
            x = step(block, x, k)
            torch._dynamo.graph_break()
        return self.head(self.final(x))


@case("graph-break-between-blocks", sites=S("pre", 0, 0, 1, 2, per=2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("final", why="final norm")])
def break_between_blocks():
    """Graph breaks between blocks do not change the model: 6 pre sites, blocks 0, 1, 2 (torch.export ignores the
    break). ``gf.install`` with ``fullgraph=False`` compiles each block as a frame of its own that Dynamo shares
    between the blocks: it must refuse (tests/test_install_corpus.py), never run a block with another's updates."""
    return BreakBetweenBlocks()


class ConstantBranch(Stepped):
    """``x + f(N(table))``: a normed branch that reads a parameter table, not the stream."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.table = nn.Parameter(torch.randn(D))
        self.tnorm = LN()
        self.f = MLP(D)
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, step):
        x = self.embed(t)
        x = x + self.f(self.tnorm(self.table))
        x = x + self.f(self.tnorm(self.table * 2))
        return self.head(x)


@case("normed-constant-branch", sites=[], inputs=token_inputs(), kept=[Kept("tnorm", why="norm of a constant")])
def constant_branch():
    """Abstain: a branch ``f(N(table))`` computed from a parameter, not from the stream, is a learned bias added to
    the stream: no path from ``x`` through a norm, so no site, twice over (no repeated block either); ``tnorm``
    stays."""
    return ConstantBranch()
