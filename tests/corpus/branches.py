"""Class 2: a norm inside a branch is part of the branch (GEONORM.md section 4, "Decision (soundness)":
a residual nested inside a branch is not a site of the outer stream and never removes a norm the branch
needs; a site's output is the stream state that leaves the step)."""
from __future__ import annotations

from torch import nn

from . import D, Kept, S, case, token_inputs
from .blocks import LM, LN, MLP, RMS, Mix, Post, Pre, lm_ref


class InnerSumBranch(nn.Module):
    """``x + f(N(x + t(x)))``: the norm reads a sum of the stream and a branch, inside the outer branch."""

    def __init__(self, d=D, norm=LN, f=MLP, t=Mix):
        super().__init__()
        self.t, self.n, self.f = t(d), norm(d), f(d)

    def forward(self, x):
        return x + self.f(self.n(x + self.t(x)))


@case("branch-norm-reads-inner-sum", sites=[], inputs=token_inputs(),
      kept=[Kept("blocks.0.n", why="inside a branch"), Kept("blocks.1.n", why="inside a branch"),
            Kept("final", why="final norm")])
def inner_sum():
    """Blocks ``x + f(N(x + t(x)))``: ``N(x + t(x))`` looks like a post site on the stream, but its output
    is not the state leaving the step (it feeds the branch ``f``), and the outer add has no norm reading
    ``x``: 0 sites, every norm kept (the branch needs it)."""
    return LM([InnerSumBranch(), InnerSumBranch()], final=LN)


class InnerSumSeq(nn.Module):
    def __init__(self):
        super().__init__()
        from . import VOCAB
        self.embed = nn.Embedding(VOCAB, D)
        self.body = nn.Sequential(InnerSumBranch(norm=RMS, f=Mix, t=MLP), InnerSumBranch(norm=RMS, f=Mix, t=MLP))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, t):
        return self.head(self.body(self.embed(t)))


class InnerPostMLP(nn.Module):
    """``proj(N(u + g(u)))``: a post-norm residual nested inside an MLP branch."""

    def __init__(self, d=D, project=True):
        super().__init__()
        self.g, self.n = MLP(d), LN(d)
        self.proj = nn.Linear(d, d) if project else None

    def forward(self, u):
        h = self.n(u + self.g(u))
        return self.proj(h) if self.proj is not None else h


class PreInnerPost(Pre):
    def __init__(self, project=True):
        super().__init__()
        self.mlp = InnerPostMLP(project=project)


def _inner(n, name="mlp.n", listed=True):
    return [Kept(f"blocks.{i}.{name}", why="norm inside a branch", listed=listed) for i in range(n)]


@case("pre-mlp-inner-post", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=_inner(2) + [Kept("final", why="final norm")])
def pre_inner_post():
    """Pre-Norm blocks whose MLP branch is ``proj(N(u + g(u)))``: the outer pre sites only (2 per block);
    the inner norm is part of the branch (kept, skipped), never a post site."""
    return LM([PreInnerPost(), PreInnerPost()])


@case("pre-mlp-inner-post-literal", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      alt_sites=[[("pre", 0, 0), (kind, 0, 0), ("pre", 0, 1), (kind, 0, 1)] for kind in ("sandwich", "respost")],
      kept=_inner(2, listed=False) + [Kept("final", why="final norm")])
def pre_inner_post_literal():
    """Pre-Norm blocks whose MLP is literally ``N(u + g(u))`` (the inner norm is the branch's last op):
    the outer sites only. The MLP site may be reported as ``pre``, as ``sandwich`` (``x + N2(f(N1(x)))``
    with ``f(u) = u + g(u)``) or as ``respost``: all rewrite to ``Geo(x, branch)`` and keep every norm.
    The inner norm must never be removed (its weights must stay; it may be a sandwich's N2, so it need
    not be listed as skipped)."""
    return LM([PreInnerPost(project=False), PreInnerPost(project=False)])


class InnerPreMLP(nn.Module):
    """``proj(u + g(N(u)))``: a pre-norm residual nested inside an MLP branch."""

    def __init__(self, d=D):
        super().__init__()
        self.n, self.g, self.proj = RMS(d), MLP(d), nn.Linear(d, d)

    def forward(self, u):
        return self.proj(u + self.g(self.n(u)))


class PreInnerPre(Pre):
    def __init__(self):
        super().__init__()
        self.mlp = InnerPreMLP()


@case("pre-mlp-inner-pre", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=_inner(2) + [Kept("final", why="final norm")])
def pre_inner_pre():
    """Pre-Norm blocks whose MLP branch is ``proj(u + g(N(u)))``: the nested residual is not a site of
    the outer stream (it is inside ``f``): the outer 4 pre sites only, the inner norm kept."""
    return LM([PreInnerPre(), PreInnerPre()])


class InnerResPostMixer(nn.Module):
    """``o(h + N(g(h)))`` with ``h = a(u)``: a res-post-norm residual inside an attention-like branch."""

    def __init__(self, d=D):
        super().__init__()
        self.a, self.g, self.n, self.o = Mix(d), MLP(d), LN(d), nn.Linear(d, d)

    def forward(self, u):
        h = self.a(u)
        return self.o(h + self.n(self.g(h)))


class PreInnerResPost(Pre):
    def __init__(self):
        super().__init__(mixer=lambda d: InnerResPostMixer(d))


@case("pre-attn-inner-respost", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=_inner(2, "mix.n") + [Kept("final", why="final norm")])
def pre_inner_respost():
    """Pre-Norm blocks whose mixer branch contains ``h + N(g(h))``: a respost-looking residual inside a
    branch is not a site; the outer 4 pre sites only, the inner norm kept."""
    return LM([PreInnerResPost(), PreInnerResPost()])


class PostInnerPost(Post):
    def __init__(self):
        super().__init__()
        self.mlp = InnerPostMLP(project=True)


@case("post-mlp-inner-post-reads-stream", sites=S("post", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=_inner(2, "mlp.n"))
def post_inner_post():
    """Post-Norm blocks whose MLP branch is ``proj(Nin(x + g(x)))``: the inner norm reads the stream
    plus a branch, exactly like a post site, but its output feeds the outer branch (not the next state):
    only the outer post sites (4), ``Nin`` kept; the outer post norms are removed."""
    return LM([PostInnerPost(), PostInnerPost()], final=None)
