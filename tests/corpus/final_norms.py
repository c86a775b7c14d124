"""Class 1: a norm after the last residual is not a site (GEONORM.md section 4, "Decision (soundness)":
a norm outside the blocks is never a post site, even when it literally reads ``x + f(x)``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import D, VOCAB, Kept, S, case, float_inputs, token_inputs
from .blocks import LM, LN, MLP, RMS, NormFree, Pre, ResPost, Stepped, stack


class ReZero(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.f = MLP(d)
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return x + self.alpha * self.f(x)


@case("rezero-final-layernorm", sites=[], inputs=token_inputs(), kept=[Kept("final", why="final norm")])
def rezero_final_layernorm():
    """Two ReZero blocks ``x + a*f(x)`` in a ModuleList, then nn.LayerNorm: the final norm reads
    ``x + a*f(x)`` of the last block but is outside the blocks, so it is a final norm (skipped), never a
    post site; the blocks have no norm: 0 sites."""
    return LM([ReZero(), ReZero()], final=LN)


class NormFreeSeq(nn.Module):
    def __init__(self, final_spelling="module"):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.body = nn.Sequential(NormFree(), NormFree(), NormFree())
        self.spelling = final_spelling
        if final_spelling == "module":
            self.final = RMS()
        else:
            self.final_w = nn.Parameter(torch.ones(D) + 0.2 * torch.randn(D))
            self.final_b = nn.Parameter(0.2 * torch.randn(D))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, t):
        x = self.body(self.embed(t))
        if self.spelling == "module":
            x = self.final(x)
        elif self.spelling == "F.rms_norm":
            x = F.rms_norm(x, (D,), self.final_w, 1e-6)
        else:
            x = F.layer_norm(x, (D,), self.final_w, self.final_b, 1e-5)
        return self.head(x)


@case("normfree-final-rmsnorm", sites=[], inputs=token_inputs(), kept=[Kept("final", why="final norm")])
def normfree_final_rmsnorm():
    """Norm-free blocks (``x + mix(x)``, ``x + mlp(x)``) in an nn.Sequential, then nn.RMSNorm: 0 sites,
    the final norm skipped (a norm outside the blocks is never a post site)."""
    return NormFreeSeq("module")


@case("normfree-final-functional-rms", sites=[], inputs=token_inputs(),
      kept=[Kept("", params=("final_w",), why="final norm")])
def normfree_final_functional_rms():
    """As normfree-final-rmsnorm, with the final norm spelled ``F.rms_norm`` in the root's forward
    (parameters on the root): 0 sites, the norm skipped (path "")."""
    return NormFreeSeq("F.rms_norm")


class TailResidual(Stepped):
    """Blocks, then ``final(x + tail(x))`` written in the root's forward (the tail is not a block)."""

    def __init__(self, blocks):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(blocks)
        self.tail = MLP()
        self.final = LN()
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, step):
        x = stack(self.blocks, self.embed(t), step)
        return self.head(self.final(x + self.tail(x)))


@case("rezero-final-norm-reads-tail-residual", sites=[], inputs=token_inputs(),
      kept=[Kept("final", why="final norm outside the blocks")])
def rezero_tail():
    """ReZero blocks, then ``final(x + tail(x))`` in the root's forward: the norm literally reads
    ``x + f(x)`` but is outside the blocks: never a post site. 0 sites, the norm skipped."""
    return TailResidual([ReZero(), ReZero()])


@case("pre-final-norm-reads-tail-residual", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("final", why="final norm outside the blocks")])
def pre_tail():
    """Pre-Norm blocks, then ``final(x + tail(x))`` in the root's forward: the blocks' 4 pre sites;
    the final norm reads ``x + f(x)`` outside the blocks: not a post site (skipped), and the tail add
    (no norm in it) stays as it is."""
    return TailResidual([Pre(), Pre()])


class Swin2SRLike(Stepped):
    """``x0 = conv_first(inp)``; ``out = conv_after_body(norm(layers(x0))) + x0``; ``upsample(out)``."""

    def __init__(self, blocks):
        super().__init__()
        self.conv_first = nn.Linear(D, D)
        self.layers = nn.ModuleList(blocks)
        self.norm = LN()
        self.conv_after_body = nn.Linear(D, D)
        self.upsample = nn.Linear(D, 6)

    def _run(self, inp, step):
        x0 = self.conv_first(inp)
        return self.upsample(self.conv_after_body(self.norm(stack(self.layers, x0, step))) + x0)


@case("swin2sr-respost-tail", sites=S("respost", 0, 0, 1, per=2), inputs=float_inputs(),
      ref=lambda m, x: m.geonorm(x), kept=[Kept("norm", why="final norm of the body")])
def swin2sr_respost():
    """Swin2SR-like ``conv(norm(stack(x))) + x`` with res-post-norm blocks: the blocks' respost sites;
    ``norm`` is the final norm of the stack (skipped), and the outer add ``x + conv(norm(..))`` is a
    residual around the whole stack whose branch contains the norm: not a site."""
    return Swin2SRLike([ResPost(), ResPost()])


@case("swin2sr-normfree-tail", sites=[], inputs=float_inputs(), kept=[Kept("norm", why="final norm")])
def swin2sr_normfree():
    """Swin2SR's last residual ``conv(norm(stack(x))) + x`` after norm-free blocks: the norm reads the
    last block's ``x + f(x)`` but is outside the blocks; 0 sites, the norm skipped."""
    return Swin2SRLike([NormFree(), NormFree()])

