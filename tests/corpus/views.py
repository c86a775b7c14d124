"""Class 7: streams that are views (GEONORM.md section 4: views that keep the last dim are seen through;
a site is a step of the stream whatever layout the stream is stored in between the steps, and the
geodesic acts over the feature dim of the site's ``x``)."""
from __future__ import annotations

import torch
from torch import nn

from . import D, EVEN_SHAPES, VOCAB, Kept, S, case, geo, randn, token_inputs
from .blocks import LN, MLP, RMS, Mix, Post, Pre, Stepped, stack


class CFBlock(Pre):
    """Channels-first ``(B, C, N)`` state, permuted to ``(B, N, C)`` inside the block and back."""

    def __init__(self):
        super().__init__(norm2=RMS)

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)

    def geonorm(self, x, k):
        return super().geonorm(x.transpose(1, 2), k).transpose(1, 2)


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's LayerNorm2d on a channels-first state: permute, LayerNorm over C, permute back."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class CFPostBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.n1 = nn.Conv1d(D, D, 3, padding=1), LayerNorm2d(D)
        self.conv2, self.n2 = nn.Conv1d(D, D, 1), LayerNorm2d(D)

    def forward(self, x):
        x = self.n1(x + self.conv1(x))
        return self.n2(x + torch.tanh(self.conv2(x)))

    def geonorm(self, x, k):
        def g(a, s):
            return geo(a.transpose(1, 2), s.transpose(1, 2), k).transpose(1, 2)
        x = g(x, self.conv1(x))
        return g(x, torch.tanh(self.conv2(x)))


class ChannelsFirst(Stepped):
    """Tokens -> embedding -> ``(B, C, N)`` -> channels-first blocks -> back to ``(B, N, C)`` -> head."""

    def __init__(self, blocks, final=True):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(blocks)
        self.final = LN() if final else None
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, step):
        x = stack(self.blocks, self.embed(t).transpose(1, 2), step).transpose(1, 2)
        if self.final is not None:
            x = self.final(x)
        return self.head(x)


@case("channels-first-transpose-blocks", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("final", why="final norm")])
def channels_first():
    """The stream is stored channels-first ``(B, C, N)`` and each block transposes it to ``(B, N, C)``, runs
    two Pre-Norm sites, and transposes back: 4 pre sites, the geodesic over C."""
    return ChannelsFirst([CFBlock(), CFBlock()])


@case("channels-first-post-layernorm2d", sites=S("post", 0, 0, 1, per=2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t), abstain=True,
      abstain_kept=[Kept(f"blocks.{i}.{n}", why="skipped when abstaining") for i in range(2) for n in ("n1", "n2")], kept=[Kept("final", why="final norm")])
def channels_first_post():
    """Abstain allowed. A channels-first ``(B, C, N)`` stream with ConvNeXt-style LayerNorm2d post norms
    ``N2d(x + conv(x))`` (permute, LayerNorm over C, permute back): the norm is over the stream's dim 1
    through a permute, which the spec does not list as seen through. Either 4 post sites with the
    geodesic over C (dim 1) or every such norm skipped; never a geodesic over the wrong dim."""
    return ChannelsFirst([CFPostBlock(), CFPostBlock()])


class NHWCBlock(nn.Module):
    """timm MaxViT/DaViT/TinyViT style: NCHW in, NHWC inside, pre attention (over the flattened H*W) and
    pre MLP, NCHW out. ``style="permute"`` uses permutes, ``"flatten"`` uses flatten/transpose."""

    def __init__(self, style="permute"):
        super().__init__()
        self.style = style
        self.n1, self.attn, self.n2, self.mlp = LN(), Mix(), LN(), MLP()

    def _in(self, x):
        B, C, H, W = x.shape
        if self.style == "permute":
            return x.permute(0, 2, 3, 1), (B, C, H, W)
        return x.flatten(2).transpose(1, 2), (B, C, H, W)

    def _out(self, x, shape):
        B, C, H, W = shape
        if self.style == "permute":
            return x.permute(0, 3, 1, 2)
        return x.transpose(1, 2).reshape(B, C, H, W)

    def _attn(self, h, shape):
        B, C, H, W = shape
        return self.attn(h.reshape(B, H * W, C)).reshape(h.shape)

    def forward(self, x):
        h, shape = self._in(x)
        h = h + self._attn(self.n1(h), shape)
        h = h + self.mlp(self.n2(h))
        return self._out(h, shape)

    def geonorm(self, x, k):
        h, shape = self._in(x)
        h = geo(h, self._attn(self.n1(h), shape), k)
        h = geo(h, self.mlp(self.n2(h)), k)
        return self._out(h, shape)


class ImageModel(Stepped):
    """Tokens ``(B, T)`` -> embedding -> an NCHW grid ``(B, C, 2, T/2)`` -> NCHW blocks -> mean pool -> head."""

    def __init__(self, style):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([NHWCBlock(style), NHWCBlock(style)])
        self.norm = LN()
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, step):
        B, T = t.shape
        x = self.embed(t).reshape(B, 2, T // 2, D).permute(0, 3, 1, 2)
        return self.head(self.norm(stack(self.blocks, x, step).mean((2, 3))))


@case("maxvit-nchw-nhwc-permute", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(EVEN_SHAPES),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("norm", why="head norm after pooling")])
def maxvit():
    """timm MaxViT-style blocks on an NCHW stream: permute to NHWC, pre-norm attention + MLP, permute back:
    4 pre sites over C; the norm after the global pool is a head norm."""
    return ImageModel("permute")


@case("tinyvit-nchw-flatten-transpose", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(EVEN_SHAPES),
      ref=lambda m, t: m.geonorm(t), kept=[Kept("norm", why="head norm after pooling")])
def tinyvit():
    """DaViT/TinyViT-style blocks: ``x.flatten(2).transpose(1, 2)`` to tokens, two pre sites,
    ``transpose(1, 2).reshape(B, C, H, W)`` back: 4 pre sites."""
    return ImageModel("flatten")


class Rearranged(Stepped):
    """T2T-ViT-like: the input ``(B, 2T, D/2)`` is rearranged ``b (t p) c -> b t (p c)`` to ``(B, T, D)``,
    which is the stream: no embedding layer between the reshape and the blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Pre(), Pre()])
        self.final = LN()
        self.head = nn.Linear(D, 5)

    def _run(self, inp, step):
        B = inp.shape[0]
        return self.head(self.final(stack(self.blocks, inp.reshape(B, -1, D), step)))


@case("t2t-rearrange-before-blocks", sites=S("pre", 0, 0, 1, per=2),
      inputs=lambda: [(randn(2, 10, D // 2),), (randn(3, 14, D // 2),)],
      ref=lambda m, x: m.geonorm(x), kept=[Kept("final", why="final norm")])
def t2t():
    """A Rearrange-like reshape of the input before the blocks (T2T-ViT): the reshaped input is the
    stream: 4 pre sites."""
    return Rearranged()


class FlatPost(Post):
    """Post-Norm block that reshapes the sum to ``(B*T, d)`` before each norm."""

    def __init__(self, out_2d=False):
        super().__init__()
        self.out_2d = out_2d

    def forward(self, x):
        B, T, d = x.shape
        x = self.n1((x + self.mix(x)).reshape(B * T, d)).reshape(B, T, d)
        h = (x + self.mlp(x)).view(-1, d)
        return self.n2(h) if self.out_2d else self.n2(h).view(B, T, d)

    def geonorm(self, x, k):
        x = super().geonorm(x, k)
        return x.reshape(-1, x.shape[-1]) if self.out_2d else x


class FlatPostModel(Stepped):
    def __init__(self, out_2d):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([FlatPost(out_2d), FlatPost(out_2d)])
        self.head = nn.Linear(D, VOCAB)

    def _run(self, t, step):
        B, T = t.shape
        x = self.embed(t)
        for k, b in enumerate(self.blocks):
            x = step(b, x.reshape(B, T, D), k)
        return self.head(x)


@case("post-flatten-bt-reshape-back", sites=S("post", 0, 0, 1, per=2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t))
def post_flatten_back():
    """Post norms applied to ``(x + f(x)).reshape(B*T, d)`` and reshaped back: views that keep the last
    dim are seen through: 4 post sites."""
    return FlatPostModel(False)


@case("post-flatten-bt-output-2d", sites=S("post", 0, 0, 1, per=2), inputs=token_inputs(),
      ref=lambda m, t: m.geonorm(t))
def post_flatten_2d():
    """As post-flatten-bt-reshape-back, but each block returns the ``(B*T, d)`` norm output and the model
    returns ``(B*T, vocab)``: 4 post sites, and the converted output keeps the source's 2-d shape."""
    return FlatPostModel(True)
