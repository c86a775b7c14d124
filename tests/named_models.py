"""Small hand-written equivalents of the third-party models named in issue 13 (x-transformers, vit-pytorch
MaxViT and T2T-ViT, timm DaViT / TinyViT / SAM-ViT / EdgeNeXt / XCiT / CAFormer / SwinV2), for
tests/test_named_models.py. Neither timm nor vit-pytorch nor x-transformers nor einops is installable here,
so each class mirrors the named file of the named library: the same module tree (so the same module paths),
the same residual / norm / view structure in ``forward``; only sizes are tiny and options the tests do not
need are left out (they are listed in each docstring).

Each ``build_*`` function returns ``(model, inputs)``: the model seeded, norm-like parameters jittered (so
that no norm, gain or residual scale is the identity) and in eval mode unless said otherwise; ``inputs`` is a
list of two argument tuples at different shapes (the first is the conversion example).

Models with a float64 reference have a ``geonorm(*args, ...)`` method: the model after the rewrite that
GEONORM.md prescribes, written by hand with :func:`tests.reference.reference_geodesic` and harmonic decays
``1 / (k + 1)`` (run it on a ``deepcopy(model).double()``).
"""
from __future__ import annotations

import itertools
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .reference import reference_geodesic

VOCAB = 23


def geo(x, s, k, dim=-1):
    """The rewritten residual step of block ``k`` (harmonic decay), over ``dim``, in float64."""
    if dim in (-1, x.ndim - 1):
        return reference_geodesic(x, s, 1.0 / (k + 1))
    return reference_geodesic(x.movedim(dim, -1), s.movedim(dim, -1), 1.0 / (k + 1)).movedim(-1, dim)


_GAIN_NAMES = {"g", "scale", "gamma", "gamma1", "gamma2", "gamma3", "gamma_xca"}
_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def jitter(model: nn.Module, amount: float = 0.2) -> nn.Module:
    """Perturb, deterministically, the affine parameters of every norm, every gain / layer scale / residual
    scale (parameters named ``g``, ``scale``, ``gamma*``) and BatchNorm running statistics."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in model.modules():
            own = dict(m.named_parameters(recurse=False))
            for name, p in own.items():
                if isinstance(m, _NORM_TYPES) or getattr(m, "_norm_like", False) or name in _GAIN_NAMES:
                    p.add_(amount * torch.randn(p.shape, generator=g, dtype=p.dtype))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + sum(31 ** i * s for i, s in enumerate(shape)))
    return torch.randn(*shape, generator=g)


def _tokens(b, t, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + 31 * b + t)
    return torch.randint(0, VOCAB, (b, t), generator=g)


def _images(c=3, hw=32):
    return [(_randn(2, c, hw, hw),), (_randn(3, c, hw, hw, seed=1),)]


def _built(model, inputs, train=False):
    return jitter(model).train(train), inputs


class LayerNorm2d(nn.LayerNorm):
    """timm ``timm/layers/norm.py`` LayerNorm2d: permute NCHW -> NHWC, ``F.layer_norm`` over C, permute back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class TimmMlp(nn.Module):
    """timm ``timm/layers/mlp.py`` Mlp (``use_conv`` for 1x1 convolutions on NCHW; dropout 0, norm Identity)."""

    def __init__(self, dim, hidden, out=None, act=nn.GELU, bias=True, use_conv=False):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1, bias=bias)) if use_conv else (lambda i, o: nn.Linear(i, o, bias=bias))
        self.fc1, self.act, self.fc2 = layer(dim, hidden), act(), layer(hidden, out or dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """timm ``timm/layers/drop.py`` DropPath: a random per-sample keep mask, rescaled, in train mode only."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


def window_partition(x, ws):
    """``(B, H, W, C)`` -> ``(B * nW, ws, ws, C)`` (timm swin / davit / sam)."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, C)


def window_reverse(windows, ws, H, W):
    C = windows.shape[-1]
    x = windows.view(-1, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


# =================================================================================================
# x-transformers (lucidrains/x-transformers, x_transformers/x_transformers.py)

class XNorm(nn.Module):
    """x_transformers.py RMSNorm, ScaleNorm and SimpleRMSNorm: ``F.normalize(x, dim=-1) * sqrt(d) * g`` with
    ``g`` per channel (``gain="channel"``, RMSNorm), a scalar (``"scalar"``, ScaleNorm) or none (``None``,
    SimpleRMSNorm: no parameter)."""

    def __init__(self, dim, gain="channel"):
        super().__init__()
        self.scale = dim ** 0.5
        self.g = nn.Parameter(torch.ones(dim if gain == "channel" else 1)) if gain else None

    def forward(self, x):
        x = F.normalize(x, dim=-1) * self.scale
        return x * self.g if self.g is not None else x


X_NORMS = {"use_rmsnorm": XNorm, "use_scalenorm": lambda dim: XNorm(dim, "scalar"),
           "use_simple_rmsnorm": lambda dim: XNorm(dim, None)}


class XAttention(nn.Module):
    """x_transformers.py Attention + Attend (causal softmax attention; no rotary, no memory kv, no flash)."""

    def __init__(self, dim, dim_head=8, heads=2, causal=True):
        super().__init__()
        self.heads, self.scale, self.causal = heads, dim_head ** -0.5, causal
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_k = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_v = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x):
        b, n, h = x.shape[0], x.shape[1], self.heads
        q, k, v = (t(x).reshape(b, n, h, -1).transpose(1, 2) for t in (self.to_q, self.to_k, self.to_v))
        sim = (q @ k.transpose(-1, -2)) * self.scale
        if self.causal:
            i, j = sim.shape[-2:]
            mask = torch.ones((i, j), dtype=torch.bool, device=x.device).triu(j - i + 1)
            sim = sim.masked_fill(mask, -torch.finfo(sim.dtype).max)
        out = sim.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class XFeedForward(nn.Module):
    """x_transformers.py FeedForward: ``Sequential(Sequential(Linear, GELU), Dropout, Linear)``."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU()), nn.Dropout(0.0),
                                nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.ff(x)


class XResidual(nn.Module):
    """x_transformers.py Residual: ``x + residual`` (``x`` is the branch output), no residual scale."""

    def forward(self, x, residual):
        return x + residual


class XAttentionLayers(nn.Module):
    """x_transformers.py AttentionLayers (as ``Decoder``: causal, pre-norm): ``self.layers`` holds one
    ``ModuleList([norms, block, residual])`` per sub-layer ('a', 'f', 'a', 'f'), ``norms`` being
    ``ModuleList([pre_branch_norm, post_branch_norm=None, post_main_norm=None])``; ``final_norm`` after
    the last sub-layer. The forward loop is the library's, with the options off."""

    def __init__(self, dim, depth, heads, norm_class):
        super().__init__()
        self.layer_types = ("a", "f") * depth
        self.layers = nn.ModuleList()
        for t in self.layer_types:
            block = XAttention(dim, dim_head=dim // heads, heads=heads) if t == "a" else XFeedForward(dim)
            norms = nn.ModuleList([norm_class(dim), None, None])
            self.layers.append(nn.ModuleList([norms, block, XResidual()]))
        self.final_norm = norm_class(dim)

    def _run(self, x, geonorm):
        for k, (norms, block, residual_fn) in enumerate(self.layers):
            residual = x
            pre_norm, post_branch_norm, post_main_norm = norms
            x = pre_norm(x)
            out = block(x)
            x = geo(residual, out, k) if geonorm else residual_fn(out, residual)
        return self.final_norm(x)

    def forward(self, x):
        return self._run(x, False)


class XTransformerWrapper(nn.Module):
    """x_transformers.py TransformerWrapper: token embedding + AbsolutePositionalEmbedding (scaled by
    ``dim ** -0.5``), the attention layers, ``to_logits``."""

    def __init__(self, norm, dim=16, depth=2, heads=2, max_seq_len=32):
        super().__init__()
        self.token_emb = nn.Embedding(VOCAB, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.pos_scale = dim ** -0.5
        self.attn_layers = XAttentionLayers(dim, depth, heads, X_NORMS[norm])
        self.to_logits = nn.Linear(dim, VOCAB, bias=False)

    def _embed(self, t):
        pos = torch.arange(t.shape[1], device=t.device)
        return self.token_emb(t) + self.pos_emb(pos) * self.pos_scale

    def forward(self, t):
        return self.to_logits(self.attn_layers(self._embed(t)))

    def geonorm(self, t):
        """The GeoNorm model: each of the 4 sub-layers is an element of ``attn_layers.layers`` hence its own
        block (decays 1, 1/2, 1/3, 1/4); the pre-branch norms and the final norm stay."""
        return self.to_logits(self.attn_layers._run(self._embed(t), True))


def build_x_transformers(norm):
    torch.manual_seed(0)
    return _built(XTransformerWrapper(norm), [(_tokens(2, 5),), (_tokens(3, 7, seed=1),)])


# =================================================================================================
# vit-pytorch MaxViT (lucidrains/vit-pytorch, vit_pytorch/max_vit.py), einops Rearrange/Reduce by hand

class RearrangeWindows(nn.Module):
    """``Rearrange('b d (x w1) (y w2) -> b x y w1 w2 d')`` (block-like windows) or, with ``grid``,
    ``Rearrange('b d (w1 x) (w2 y) -> b x y w1 w2 d')`` (grid-like windows)."""

    def __init__(self, w, grid=False):
        super().__init__()
        self.w, self.grid = w, grid

    def forward(self, t):
        b, d, H, W = t.shape
        if self.grid:
            return t.reshape(b, d, self.w, H // self.w, self.w, W // self.w).permute(0, 3, 5, 2, 4, 1)
        return t.reshape(b, d, H // self.w, self.w, W // self.w, self.w).permute(0, 2, 4, 3, 5, 1)


class UnrearrangeWindows(nn.Module):
    """``Rearrange('b x y w1 w2 d -> b d (x w1) (y w2)')`` or, with ``grid``,
    ``Rearrange('b x y w1 w2 d -> b d (w1 x) (w2 y)')``."""

    def __init__(self, grid=False):
        super().__init__()
        self.grid = grid

    def forward(self, t):
        b, x, y, w1, w2, d = t.shape
        if self.grid:
            return t.permute(0, 5, 3, 1, 4, 2).reshape(b, d, w1 * x, w2 * y)
        return t.permute(0, 5, 1, 3, 2, 4).reshape(b, d, x * w1, y * w2)


class ReduceMean(nn.Module):
    """``Reduce('b c h w -> b c', 'mean')``."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


class PreNormResidual(nn.Module):
    """max_vit.py PreNormResidual: ``fn(norm(x)) + x``, LayerNorm over the last (channel) dim."""

    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x)) + x


class MaxFeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(dim * mult, dim), nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class SqueezeExcitation(nn.Module):
    def __init__(self, dim, shrinkage_rate=0.25):
        super().__init__()
        hidden = int(dim * shrinkage_rate)
        self.gate = nn.Sequential(ReduceMean(), nn.Linear(dim, hidden, bias=False), nn.SiLU(),
                                  nn.Linear(hidden, dim, bias=False), nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)[:, :, None, None]


class MBConvResidual(nn.Module):
    """max_vit.py MBConvResidual: ``dropsample(fn(x)) + x`` (dropsample 0: identity)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def MBConv(dim_in, dim_out, *, downsample, expansion_rate=4):
    hidden = int(expansion_rate * dim_out)
    net = nn.Sequential(
        nn.Conv2d(dim_in, hidden, 1), nn.BatchNorm2d(hidden), nn.GELU(),
        nn.Conv2d(hidden, hidden, 3, stride=2 if downsample else 1, padding=1, groups=hidden),
        nn.BatchNorm2d(hidden), nn.GELU(), SqueezeExcitation(hidden),
        nn.Conv2d(hidden, dim_out, 1), nn.BatchNorm2d(dim_out))
    if dim_in == dim_out and not downsample:
        net = MBConvResidual(net)
    return net


class MaxAttention(nn.Module):
    """max_vit.py Attention on ``(b, x, y, w1, w2, d)`` windows, with the learned relative position bias."""

    def __init__(self, dim, dim_head=8, window_size=2):
        super().__init__()
        self.heads = dim // dim_head
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.Dropout(0.0))
        self.rel_pos_bias = nn.Embedding((2 * window_size - 1) ** 2, self.heads)
        pos = torch.arange(window_size)
        grid = torch.stack(torch.meshgrid(pos, pos, indexing="ij")).flatten(1).t()
        rel = grid[:, None, :] - grid[None, :, :] + window_size - 1
        self.register_buffer("rel_pos_indices", (rel * torch.tensor([2 * window_size - 1, 1])).sum(-1),
                             persistent=False)

    def forward(self, x):
        batch, height, width, wh, ww, _ = x.shape
        h = self.heads
        x = x.reshape(batch * height * width, wh * ww, -1)
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        sim = (q * self.scale) @ k.transpose(-1, -2)
        sim = sim + self.rel_pos_bias(self.rel_pos_indices).permute(2, 0, 1)
        out = sim.softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(-1, wh, ww, out.shape[1] * out.shape[-1])
        out = self.to_out(out)
        return out.reshape(batch, height, width, wh, ww, -1)


class MaxViT(nn.Module):
    """vit_pytorch/max_vit.py MaxViT: conv stem; per stage, blocks ``Sequential(MBConv, Rearrange (block
    windows), PreNormResidual(Attention), PreNormResidual(FeedForward), Rearrange back, Rearrange (grid
    windows), PreNormResidual(Attention), PreNormResidual(FeedForward), Rearrange back)``, in a flat
    ``self.layers`` ModuleList; head ``Sequential(Reduce mean, LayerNorm, Linear)``. dim 16, depth (1, 2),
    window 2, dim_head 8: 3 blocks, 12 PreNormResidual sites."""

    def __init__(self, dim=16, depth=(1, 2), dim_conv_stem=8, window_size=2, dim_head=8, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim_conv_stem, 3, stride=2, padding=1),
                                  nn.Conv2d(dim_conv_stem, dim_conv_stem, 3, padding=1))
        dims = (dim_conv_stem,) + tuple(2 ** i * dim for i in range(len(depth)))
        w = window_size
        self.layers = nn.ModuleList()
        for (d_in, d), layer_depth in zip(zip(dims[:-1], dims[1:]), depth):
            for i in range(layer_depth):
                self.layers.append(nn.Sequential(
                    MBConv(d_in if i == 0 else d, d, downsample=i == 0),
                    RearrangeWindows(w),
                    PreNormResidual(d, MaxAttention(d, dim_head, w)),
                    PreNormResidual(d, MaxFeedForward(d)),
                    UnrearrangeWindows(),
                    RearrangeWindows(w, grid=True),
                    PreNormResidual(d, MaxAttention(d, dim_head, w)),
                    PreNormResidual(d, MaxFeedForward(d)),
                    UnrearrangeWindows(grid=True),
                ))
        self.mlp_head = nn.Sequential(ReduceMean(), nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], num_classes))

    def forward(self, x):
        x = self.stem(x)
        for stage in self.layers:
            x = stage(x)
        return self.mlp_head(x)


def build_maxvit():
    torch.manual_seed(0)
    return _built(MaxViT(), _images())


# =================================================================================================
# vit-pytorch T2T-ViT (vit_pytorch/t2t.py, with Transformer / Attention / FeedForward of vit_pytorch/vit.py)

class VitFeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class VitAttention(nn.Module):
    """vit.py Attention: its own LayerNorm first; ``to_out`` is Identity when ``heads == 1 and
    dim_head == dim`` (T2T's token transformers)."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        inner = dim_head * heads
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        project_out = not (heads == 1 and dim_head == dim)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0)) if project_out else nn.Identity()

    def forward(self, x):
        x = self.norm(x)
        b, n = x.shape[0], x.shape[1]
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        out = self.attend((q @ k.transpose(-1, -2)) * self.scale) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class VitTransformer(nn.Module):
    """vit.py Transformer: ``x = attn(x) + x; x = ff(x) + x`` per layer, then ``self.norm(x)``."""

    def __init__(self, dim, depth, heads, dim_head, mlp_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([nn.ModuleList([VitAttention(dim, heads, dim_head), VitFeedForward(dim, mlp_dim)])
                                     for _ in range(depth)])

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class RearrangeImage(nn.Module):
    """t2t.py RearrangeImage: ``rearrange(x, 'b (h w) c -> b c h w', h=int(sqrt(n)))``."""

    def forward(self, x):
        b, n, c = x.shape
        h = int(math.sqrt(n))
        return x.transpose(1, 2).reshape(b, c, h, n // h)


class Transpose12(nn.Module):
    """``Rearrange('b c n -> b n c')``."""

    def forward(self, x):
        return x.transpose(1, 2)


class T2TViT(nn.Module):
    """vit_pytorch/t2t.py T2TViT: ``to_patch_embedding`` is a Sequential of [RearrangeImage or Identity,
    Unfold, Rearrange('b c n -> b n c'), Transformer(depth 1, heads 1) or Identity] per t2t layer, then a
    Linear; the token transformers read the stream straight out of the Rearrange. Then cls token, position
    add (in place), the main Transformer, cls pooling, ``mlp_head = Sequential(LayerNorm, Linear)``.
    channels 2, t2t_layers ((3, 2),) * 3 (token dims 18, 162), dim 16, depth 2, image 16."""

    def __init__(self, image_size=16, channels=2, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32,
                 num_classes=5, t2t_layers=((3, 2), (3, 2), (3, 2))):
        super().__init__()
        layers = []
        layer_dim = channels
        out_size = image_size
        for i, (kernel, stride) in enumerate(t2t_layers):
            layer_dim *= kernel ** 2
            is_first, is_last = i == 0, i == len(t2t_layers) - 1
            out_size = int((out_size - kernel + 2 * (stride // 2)) / stride + 1)
            layers.extend([
                nn.Identity() if is_first else RearrangeImage(),
                nn.Unfold(kernel_size=kernel, stride=stride, padding=stride // 2),
                Transpose12(),
                nn.Identity() if is_last else VitTransformer(layer_dim, 1, 1, layer_dim, layer_dim),
            ])
        layers.append(nn.Linear(layer_dim, dim))
        self.to_patch_embedding = nn.Sequential(*layers)
        self.pos_embedding = nn.Parameter(torch.randn(1, out_size ** 2 + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = VitTransformer(dim, depth, heads, dim_head, mlp_dim)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img):
        x = self.to_patch_embedding(img)
        b, n, _ = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x += self.pos_embedding[:, :n + 1]
        x = self.transformer(x)
        return self.mlp_head(x[:, 0])


def build_t2t():
    torch.manual_seed(0)
    return _built(T2TViT(), _images(c=2, hw=16))


# =================================================================================================
# timm DaViT (timm/models/davit.py)

class ConvPosEnc(nn.Module):
    """davit.py ConvPosEnc: ``x + act(dwconv(x))`` on NCHW (a norm-free residual on the stream)."""

    def __init__(self, dim, k=3):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim)

    def forward(self, x):
        return x + self.proj(x)


class QkvAttention(nn.Module):
    """The parameters shared by timm's fused-qkv attentions (DaViT window and channel attention, SAM):
    ``qkv`` (dim -> 3 dim), ``proj``, the heads and the scale; each subclass writes its ``forward``."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)


class DavitWindowAttention(QkvAttention):
    def forward(self, x):
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B_, N, C))


class ChannelAttention(QkvAttention):
    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((k * self.scale).transpose(-1, -2) @ v).softmax(dim=-1)
        x = (attn @ q.transpose(-1, -2)).transpose(-1, -2)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DavitBlock(nn.Module):
    """What davit.py's SpatialBlock and ChannelBlock share: ``cpe1``, ``norm1``, ``attn`` (built by
    ``attn()``), ``cpe2``, ``norm2``, ``mlp``, and the second half of the forward (``cpe2`` on the NCHW view,
    the MLP site on the flattened view, back to NCHW)."""

    def __init__(self, dim, attn):
        super().__init__()
        self.cpe1 = ConvPosEnc(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn()
        self.cpe2 = ConvPosEnc(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TimmMlp(dim, 4 * dim)

    def _mlp_half(self, x, B, C, H, W):
        x = self.cpe2(x.transpose(1, 2).view(B, C, H, W))
        x = x.flatten(2).transpose(1, 2)
        x = x + self.mlp(self.norm2(x))
        return x.transpose(1, 2).view(B, C, H, W)


class SpatialBlock(DavitBlock):
    """davit.py SpatialBlock: NCHW in; ``shortcut = cpe1(x).flatten(2).transpose(1, 2)``; windowed attention
    on ``norm1(shortcut)``; ``x = shortcut + attn``; ``cpe2`` on the NCHW view; MLP site on the flattened
    view; back to NCHW."""

    def __init__(self, dim, num_heads, window_size):
        super().__init__(dim, lambda: DavitWindowAttention(dim, num_heads))
        self.window_size = window_size

    def forward(self, x):
        B, C, H, W = x.shape
        shortcut = self.cpe1(x).flatten(2).transpose(1, 2)
        x = self.norm1(shortcut).view(B, H, W, C)
        windows = window_partition(x, self.window_size).view(-1, self.window_size ** 2, C)
        windows = self.attn(windows).view(-1, self.window_size, self.window_size, C)
        x = window_reverse(windows, self.window_size, H, W).reshape(B, H * W, C)
        return self._mlp_half(shortcut + x, B, C, H, W)


class ChannelBlock(DavitBlock):
    """davit.py ChannelBlock: as SpatialBlock with channel attention over all tokens."""

    def __init__(self, dim, num_heads):
        super().__init__(dim, lambda: ChannelAttention(dim, num_heads))

    def forward(self, x):
        B, C, H, W = x.shape
        x = self.cpe1(x).flatten(2).transpose(1, 2)
        return self._mlp_half(x + self.attn(self.norm1(x)), B, C, H, W)


class Downsampling(nn.Module):
    """metaformer.py Downsampling: ``norm`` then a conv changing the channels; davit.py's Downsample is
    ``Downsampling(in, out, 2, 2, norm_layer=LayerNorm2d)``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, norm_layer=None):
        super().__init__()
        self.norm = norm_layer(in_channels) if norm_layer else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)

    def forward(self, x):
        return self.conv(self.norm(x))


class ConvStem(nn.Module):
    """The stem of davit.py (``padding=3``, LayerNorm2d) and metaformer.py (``padding=2``,
    LayerNorm2dNoBias): a 7x7 stride-4 conv, then ``norm``."""

    def __init__(self, in_chs, out_chs, padding=3, norm_layer=LayerNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 7, stride=4, padding=padding)
        self.norm = norm_layer(out_chs)

    def forward(self, x):
        return self.norm(self.conv(x))


class DavitStage(nn.Module):
    def __init__(self, in_chs, out_chs, depth, downsample, num_heads, window_size):
        super().__init__()
        self.downsample = Downsampling(in_chs, out_chs, 2, 2, norm_layer=LayerNorm2d) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[nn.Sequential(SpatialBlock(out_chs, num_heads, window_size),
                                                    ChannelBlock(out_chs, num_heads)) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class NormMlpClassifierHead(nn.Module):
    """timm/layers/classifier.py NormMlpClassifierHead: global avg pool (keepdim), LayerNorm2d, flatten, fc."""

    def __init__(self, dim, num_classes=5):
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(self.norm(x.mean((2, 3), keepdim=True)).flatten(1))


class DaViT(nn.Module):
    """timm/models/davit.py DaVit: Stem (conv stride 4 + LayerNorm2d), stages of ``Sequential(
    Sequential(SpatialBlock, ChannelBlock), ...)`` on an NCHW stream (each block flattens to tokens with
    ``flatten(2).transpose(1, 2)`` and goes back with ``transpose(1, 2).view``), stage 1 behind a
    Downsample (LayerNorm2d + conv 16 -> 32), NormMlpClassifierHead. depths (1, 1), window 4, image 32."""

    def __init__(self, dims=(16, 32), depths=(1, 1), heads=(2, 4), window_size=4):
        super().__init__()
        self.stem = ConvStem(3, dims[0])
        self.stages = nn.Sequential(*[DavitStage(dims[max(i - 1, 0)], dims[i], depths[i], i > 0, heads[i], window_size)
                                      for i in range(len(dims))])
        self.head = NormMlpClassifierHead(dims[-1])

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def build_davit():
    torch.manual_seed(0)
    return _built(DaViT(), _images())


# =================================================================================================
# timm TinyViT (timm/models/tiny_vit.py)

class ConvNorm(nn.Sequential):
    """tiny_vit.py ConvNorm: conv (no bias) + BatchNorm2d."""

    def __init__(self, in_chs, out_chs, ks=1, stride=1, pad=0, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, ks, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)


class TinyPatchEmbed(nn.Module):
    def __init__(self, in_chs, out_chs):
        super().__init__()
        self.conv1 = ConvNorm(in_chs, out_chs // 2, 3, 2, 1)
        self.act = nn.GELU()
        self.conv2 = ConvNorm(out_chs // 2, out_chs, 3, 2, 1)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


class NormMlp(nn.Module):
    """tiny_vit.py NormMlp: its own LayerNorm first, then fc1, act, fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyAttention(nn.Module):
    """tiny_vit.py Attention: its own LayerNorm first; attention biases indexed by relative offsets."""

    def __init__(self, dim, key_dim, num_heads, attn_ratio=1, resolution=(4, 4)):
        super().__init__()
        self.num_heads, self.scale, self.key_dim = num_heads, key_dim ** -0.5, key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.out_dim = self.val_dim * num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, num_heads * (self.val_dim + 2 * key_dim))
        self.proj = nn.Linear(self.out_dim, dim)
        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets, idxs = {}, []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(0.1 * torch.randn(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(len(points), len(points)),
                             persistent=False)

    def forward(self, x):
        bias = self.attention_biases[:, self.attention_bias_idxs]
        B, N, _ = x.shape
        x = self.norm(x)
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale + bias).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.out_dim))


class TinyVitBlock(nn.Module):
    """tiny_vit.py TinyVitBlock on NHWC: ``x = shortcut + attn(x)`` (one window: H == W == window);
    ``local_conv`` (depthwise ConvNorm) on the NCHW permute; ``reshape(B, C, L).transpose(1, 2)``;
    ``x = x + mlp(x)`` (NormMlp); back to NHWC with ``view``."""

    def __init__(self, dim, num_heads, window_size):
        super().__init__()
        self.window_size = window_size
        self.attn = TinyAttention(dim, dim // num_heads, num_heads, resolution=(window_size, window_size))
        self.mlp = NormMlp(dim, 4 * dim)
        self.local_conv = ConvNorm(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x):
        B, H, W, C = x.shape
        L = H * W
        shortcut = x
        x = self.attn(x.reshape(B, L, C)).view(B, H, W, C)
        x = shortcut + x
        x = x.permute(0, 3, 1, 2)
        x = self.local_conv(x)
        x = x.reshape(B, C, L).transpose(1, 2)
        x = x + self.mlp(x)
        return x.view(B, H, W, C)


class TinyVitStage(nn.Module):
    def __init__(self, dim, depth, num_heads, window_size):
        super().__init__()
        self.blocks = nn.Sequential(*[TinyVitBlock(dim, num_heads, window_size) for _ in range(depth)])

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


class TinyViT(nn.Module):
    """timm/models/tiny_vit.py TinyVit (one attention stage, no MBConv stage, no PatchMerging): conv stem,
    TinyVitStage (NCHW -> NHWC permute, blocks, permute back), NormMlpClassifierHead. dim 16, depth 2,
    image 16 (a 4x4 grid = one window)."""

    def __init__(self, dim=16, depth=2, num_heads=2, window_size=4):
        super().__init__()
        self.patch_embed = TinyPatchEmbed(3, dim)
        self.stages = nn.Sequential(TinyVitStage(dim, depth, num_heads, window_size))
        self.head = NormMlpClassifierHead(dim)

    def forward(self, x):
        return self.head(self.stages(self.patch_embed(x)))


def build_tinyvit():
    torch.manual_seed(0)
    return _built(TinyViT(), _images(hw=16))


# =================================================================================================
# timm SAM ViT (timm/models/vision_transformer_sam.py; segment-anything image_encoder.py)

class SamAttention(QkvAttention):
    """vision_transformer_sam.py Attention on ``(B, H, W, C)`` (relative position terms left out)."""

    def forward(self, x):
        B, H, W, _ = x.shape
        N = H * W
        x = x.reshape(B, N, -1)
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, N, -1).unbind(0)
        x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        x = x.view(B, self.num_heads, N, -1).transpose(1, 2).reshape(B, N, -1)
        return self.proj(x).view(B, H, W, -1)


def sam_window_partition(x, ws):
    B, H, W, C = x.shape
    pad_h, pad_w = (ws - H % ws) % ws, (ws - W % ws) % ws
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    return window_partition(x, ws), (Hp, Wp)


def sam_window_unpartition(windows, ws, pad_hw, hw):
    Hp, Wp = pad_hw
    H, W = hw
    x = window_reverse(windows, ws, Hp, Wp)
    return x[:, :H, :W, :].contiguous()


class SamBlock(nn.Module):
    """vision_transformer_sam.py Block: ``shortcut = x``; ``norm1``; window partition (window_size > 0);
    attention; unpartition; ``x = shortcut + x``; ``reshape(B, H*W, C)``; ``x = x + mlp(norm2(x))``;
    ``reshape(B, H, W, C)`` (LayerScale / DropPath Identity)."""

    def __init__(self, dim, num_heads, window_size):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SamAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TimmMlp(dim, 4 * dim)

    def forward(self, x):
        B, H, W, _ = x.shape
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            x, pad_hw = sam_window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = sam_window_unpartition(x, self.window_size, pad_hw, (H, W))
        x = shortcut + x
        x = x.reshape(B, H * W, -1)
        x = x + self.mlp(self.norm2(x))
        return x.reshape(B, H, W, -1)


class SamViT(nn.Module):
    """vision_transformer_sam.py VisionTransformerSAM (features, no classifier head): patch conv to NHWC,
    absolute position add, blocks (block 0 windowed with window 2, block 1 global), then the neck
    ``Sequential(Conv2d 1x1, LayerNorm2d, Conv2d 3x3, LayerNorm2d)`` on the NCHW permute."""

    def __init__(self, dim=16, depth=2, num_heads=2, out_chans=8, img_size=16, patch=4, windows=(2, 0)):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        g = img_size // patch
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, g, g, dim))
        self.blocks = nn.Sequential(*[SamBlock(dim, num_heads, windows[i]) for i in range(depth)])
        self.neck = nn.Sequential(nn.Conv2d(dim, out_chans, 1, bias=False), LayerNorm2d(out_chans),
                                  nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans))

    def forward(self, x):
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        x = x + self.pos_embed
        x = self.blocks(x)
        return self.neck(x.permute(0, 3, 1, 2))


def build_samvit():
    torch.manual_seed(0)
    return _built(SamViT(), _images(hw=16))


# =================================================================================================
# timm EdgeNeXt (timm/models/edgenext.py)

class PositionalEncodingFourier(nn.Module):
    """edgenext.py PositionalEncodingFourier (forward takes ``(B, H, W)``)."""

    def __init__(self, hidden_dim=32, dim=768, temperature=10000):
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.scale, self.temperature, self.hidden_dim = 2 * math.pi, temperature, hidden_dim

    def forward(self, shape):
        device, dtype = self.token_projection.weight.device, self.token_projection.weight.dtype
        inv_mask = ~torch.zeros(shape).to(device=device, dtype=torch.bool)
        y_embed = inv_mask.cumsum(1, dtype=dtype)
        x_embed = inv_mask.cumsum(2, dtype=dtype)
        y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * self.scale
        dim_t = torch.arange(self.hidden_dim, dtype=dtype, device=device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return self.token_projection(torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2))


class EdgeConvBlock(nn.Module):
    """edgenext.py ConvBlock: ``shortcut + gamma * mlp(norm(dwconv(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)``:
    the norm reads ``dwconv(x)``, not the stream: not a site (ConvNeXt-like)."""

    def __init__(self, dim, kernel_size=3, ls_init_value=1.0):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, 4 * dim)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        x = x.permute(0, 2, 3, 1)
        x = self.gamma * self.mlp(self.norm(x))
        return shortcut + x.permute(0, 3, 1, 2)


class SplitTransposeBlock(nn.Module):
    """edgenext.py SplitTransposeBlock (SDTA): split/depthwise-conv the channels, flatten to ``(B, N, C)``,
    position add, ``x = x + gamma_xca * xca(norm_xca(x))``, reshape to NHWC, ``norm``, MLP, ``gamma``,
    permute back, ``shortcut + x``. The XCA residual is nested inside the branch of the block's own
    residual (its ``x`` is ``convs(shortcut) + pos``, not the stream state)."""

    def __init__(self, dim, num_scales=2, num_heads=4, use_pos_emb=True, ls_init_value=1.0):
        super().__init__()
        width = max(int(math.ceil(dim / num_scales)), int(math.floor(dim // num_scales)))
        self.width = width
        self.num_scales = max(1, num_scales - 1)
        self.convs = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1, groups=width)
                                    for _ in range(self.num_scales)])
        self.pos_embd = PositionalEncodingFourier(dim=dim) if use_pos_emb else None
        self.norm_xca = nn.LayerNorm(dim, eps=1e-6)
        self.gamma_xca = nn.Parameter(ls_init_value * torch.ones(dim))
        self.xca = XCA(dim, num_heads)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, 4 * dim)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        spx = x.chunk(len(self.convs) + 1, dim=1)
        spo = []
        sp = spx[0]
        for i, conv in enumerate(self.convs):
            if i > 0:
                sp = sp + spx[i]
            sp = conv(sp)
            spo.append(sp)
        spo.append(spx[-1])
        x = torch.cat(spo, 1)
        B, C, H, W = x.shape
        x = x.reshape(B, C, H * W).permute(0, 2, 1)
        if self.pos_embd is not None:
            x = x + self.pos_embd((B, H, W)).reshape(B, -1, x.shape[1]).permute(0, 2, 1)
        x = x + self.gamma_xca * self.xca(self.norm_xca(x))
        x = x.reshape(B, H, W, C)
        x = self.gamma * self.mlp(self.norm(x))
        return shortcut + x.permute(0, 3, 1, 2)


class EdgeNeXtStage(nn.Module):
    def __init__(self, in_chs, out_chs, stride, depth, num_global_blocks, num_heads, kernel_size, use_pos_emb):
        super().__init__()
        if stride == 1:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(LayerNorm2d(in_chs, eps=1e-6), nn.Conv2d(in_chs, out_chs, 2, stride=2))
        blocks = []
        for i in range(depth):
            if i < depth - num_global_blocks:
                blocks.append(EdgeConvBlock(out_chs, kernel_size))
            else:
                blocks.append(SplitTransposeBlock(out_chs, num_heads=num_heads, use_pos_emb=use_pos_emb))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(self.downsample(x))


class EdgeNeXt(nn.Module):
    """timm/models/edgenext.py EdgeNeXt: patch stem (conv 4x4 stride 4 + LayerNorm2d), stage 0 = one
    ConvBlock, stage 1 = Downsample (LayerNorm2d + conv) then [ConvBlock, SDTA with Fourier position
    encoding], head ``global_pool, norm (LayerNorm2d), flatten, fc``. dims (16, 32), image 32."""

    def __init__(self, dims=(16, 32), depths=(1, 2), global_block_counts=(0, 1), kernel_sizes=(3, 5),
                 heads=(4, 4), use_pos_emb=(False, True), num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        stages, in_chs = [], dims[0]
        for i in range(len(dims)):
            stages.append(EdgeNeXtStage(in_chs, dims[i], 1 if i == 0 else 2, depths[i], global_block_counts[i],
                                        heads[i], kernel_sizes[i], use_pos_emb[i]))
            in_chs = dims[i]
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(OrderedDict([("norm", LayerNorm2d(dims[-1], eps=1e-6)),
                                               ("fc", nn.Linear(dims[-1], num_classes))]))

    def forward(self, x):
        x = self.stages(self.stem(x))
        x = self.head.norm(x.mean((2, 3), keepdim=True)).flatten(1)
        return self.head.fc(x)


def build_edgenext():
    torch.manual_seed(0)
    return _built(EdgeNeXt(), _images())


# =================================================================================================
# timm XCiT (timm/models/xcit.py, ClassAttn of timm/models/cait.py)

class XcitPositionalEncodingFourier(nn.Module):
    def __init__(self, hidden_dim=32, dim=768, temperature=10000):
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.scale, self.temperature, self.hidden_dim, self.eps = 2 * math.pi, temperature, hidden_dim, 1e-6

    def forward(self, B: int, H: int, W: int):
        device, dtype = self.token_projection.weight.device, self.token_projection.weight.dtype
        y_embed = torch.arange(1, H + 1, device=device).to(torch.float32).unsqueeze(1).repeat(1, 1, W)
        x_embed = torch.arange(1, W + 1, device=device).to(torch.float32).repeat(1, H, 1)
        y_embed = y_embed / (y_embed[:, -1:, :] + self.eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.hidden_dim, device=device).to(torch.float32)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack([pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()], dim=4).flatten(3)
        pos_y = torch.stack([pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()], dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        return self.token_projection(pos.to(dtype)).repeat(B, 1, 1, 1)


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False), nn.BatchNorm2d(out_planes))


class ConvPatchEmbed(nn.Module):
    """xcit.py ConvPatchEmbed, patch size 8: three conv3x3 + BatchNorm, stride 2, GELU between."""

    def __init__(self, in_chans=3, embed_dim=16):
        super().__init__()
        self.proj = nn.Sequential(conv3x3(in_chans, embed_dim // 4, 2), nn.GELU(),
                                  conv3x3(embed_dim // 4, embed_dim // 2, 2), nn.GELU(),
                                  conv3x3(embed_dim // 2, embed_dim, 2))

    def forward(self, x):
        x = self.proj(x)
        Hp, Wp = x.shape[2], x.shape[3]
        return x.flatten(2).transpose(1, 2), (Hp, Wp)


class LPI(nn.Module):
    """xcit.py LPI: tokens to NCHW, depthwise conv, GELU, BatchNorm2d, depthwise conv, back to tokens."""

    def __init__(self, dim):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, H: int, W: int):
        B, N, C = x.shape
        x = x.permute(0, 2, 1).reshape(B, C, H, W)
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(B, C, N).permute(0, 2, 1)


class XCA(nn.Module):
    """xcit.py XCA (the non-fused branch): l2-normalized q, k over the tokens, temperature. edgenext.py's
    CrossCovarianceAttn is the same module."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 4, 1).unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        x = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1) @ v
        return self.proj(x.permute(0, 3, 1, 2).reshape(B, N, C))


class XCABlock(nn.Module):
    """xcit.py XCABlock: three pre sites, in the order norm1/attn, norm3/LPI, norm2/MLP, each scaled by a
    per-channel gamma (LayerScale)."""

    def __init__(self, dim, num_heads, eta=1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = XCA(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.local_mp = LPI(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, 4 * dim)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma3 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x, H: int, W: int):
        x = x + self.gamma1 * self.attn(self.norm1(x))
        x = x + self.gamma3 * self.local_mp(self.norm3(x), H, W)
        x = x + self.gamma2 * self.mlp(self.norm2(x))
        return x


class ClassAttn(nn.Module):
    """cait.py ClassAttn: the class token attends to all tokens; returns the class token only."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x[:, 0]).unsqueeze(1).reshape(B, 1, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, 1, C))


class ClassAttentionBlock(nn.Module):
    """xcit.py ClassAttentionBlock (tokens_norm=False): ``x + gamma1 * cat(attn(N1(x)), N1(x)[:, 1:])``, then
    ``norm2`` on the class token only (writing the stream), then the class-token MLP residual."""

    def __init__(self, dim, num_heads, eta=1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttn(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, 4 * dim)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x):
        x_norm1 = self.norm1(x)
        x_attn = torch.cat([self.attn(x_norm1), x_norm1[:, 1:]], dim=1)
        x = x + self.gamma1 * x_attn
        x = torch.cat([self.norm2(x[:, 0:1]), x[:, 1:]], dim=1)
        x_res = x
        cls_token = self.gamma2 * self.mlp(x[:, 0:1])
        x = torch.cat([cls_token, x[:, 1:]], dim=1)
        return x_res + x


class Xcit(nn.Module):
    """timm/models/xcit.py Xcit: ConvPatchEmbed, Fourier position add, XCABlocks (ModuleList, called with
    ``H, W``), cls token concatenated, ClassAttentionBlocks, final ``norm``, cls pooling, ``head``.
    embed 16, depth 2, 2 class-attention layers, image 32 (4x4 patches)."""

    def __init__(self, embed_dim=16, depth=2, num_heads=2, cls_attn_layers=2, num_classes=5):
        super().__init__()
        self.patch_embed = ConvPatchEmbed(3, embed_dim)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, embed_dim))
        self.pos_embed = XcitPositionalEncodingFourier(dim=embed_dim)
        self.blocks = nn.ModuleList([XCABlock(embed_dim, num_heads) for _ in range(depth)])
        self.cls_attn_blocks = nn.ModuleList([ClassAttentionBlock(embed_dim, num_heads)
                                              for _ in range(cls_attn_layers)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        B = x.shape[0]
        x, (Hp, Wp) = self.patch_embed(x)
        x = x + self.pos_embed(B, Hp, Wp).reshape(B, -1, x.shape[1]).permute(0, 2, 1)
        for blk in self.blocks:
            x = blk(x, Hp, Wp)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        for blk in self.cls_attn_blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def build_xcit():
    torch.manual_seed(0)
    return _built(Xcit(), _images())


# =================================================================================================
# timm CAFormer / MetaFormer (timm/models/metaformer.py)

class LayerNorm2dNoBias(LayerNorm2d):
    def __init__(self, num_channels, **kwargs):
        super().__init__(num_channels, **kwargs)
        self.eps = kwargs.get("eps", 1e-6)
        self.bias = None


class LayerNormNoBias(nn.LayerNorm):
    def __init__(self, num_channels, **kwargs):
        super().__init__(num_channels, **kwargs)
        self.eps = kwargs.get("eps", 1e-6)
        self.bias = None


class Scale(nn.Module):
    """metaformer.py Scale: ``x * scale.view(shape)``, a learned per-channel vector (NCHW or channels-last)."""

    def __init__(self, dim, init_value=1.0, use_nchw=True):
        super().__init__()
        self.shape = (dim, 1, 1) if use_nchw else (dim,)
        self.scale = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x):
        return x * self.scale.view(self.shape)


class StarReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.scale * self.relu(x) ** 2 + self.bias


class SquaredReLU(nn.Module):
    def forward(self, x):
        return torch.square(F.relu(x))


class SepConv(nn.Module):
    def __init__(self, dim, expansion_ratio=2, kernel_size=7, padding=3):
        super().__init__()
        mid = int(expansion_ratio * dim)
        self.pwconv1 = nn.Conv2d(dim, mid, 1, bias=False)
        self.act1 = StarReLU()
        self.dwconv = nn.Conv2d(mid, mid, kernel_size, padding=padding, groups=mid, bias=False)
        self.pwconv2 = nn.Conv2d(mid, dim, 1, bias=False)

    def forward(self, x):
        return self.pwconv2(self.dwconv(self.act1(self.pwconv1(x))))


class MetaAttention(nn.Module):
    """metaformer.py Attention (the non-fused branch), on ``(B, N, C)``."""

    def __init__(self, dim, head_dim=16):
        super().__init__()
        self.head_dim, self.scale = head_dim, head_dim ** -0.5
        self.num_heads = max(dim // head_dim, 1)
        self.qkv = nn.Linear(dim, self.num_heads * head_dim * 3, bias=False)
        self.proj = nn.Linear(self.num_heads * head_dim, dim, bias=False)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class MetaFormerBlock(nn.Module):
    """metaformer.py MetaFormerBlock: ``x = res_scale1(x) + layer_scale1(token_mixer(norm1(x)))``, same with
    ``norm2`` / ``mlp`` (DropPath 0: Identity; layer scale None: Identity; res scale: Scale or Identity)."""

    def __init__(self, dim, token_mixer, norm_layer, use_nchw, res_scale_init_value=None):
        super().__init__()
        rs = (lambda: Scale(dim, res_scale_init_value, use_nchw)) if res_scale_init_value is not None else nn.Identity
        self.norm1 = norm_layer(dim)
        self.token_mixer = token_mixer(dim)
        self.layer_scale1 = nn.Identity()
        self.res_scale1 = rs()
        self.norm2 = norm_layer(dim)
        self.mlp = TimmMlp(dim, 4 * dim, act=StarReLU, bias=False, use_conv=use_nchw)
        self.layer_scale2 = nn.Identity()
        self.res_scale2 = rs()

    def forward(self, x):
        x = self.res_scale1(x) + self.layer_scale1(self.token_mixer(self.norm1(x)))
        x = self.res_scale2(x) + self.layer_scale2(self.mlp(self.norm2(x)))
        return x

    def geonorm(self, x, k, dim):
        x = geo(self.res_scale1(x), self.layer_scale1(self.token_mixer(self.norm1(x))), k, dim)
        return geo(self.res_scale2(x), self.layer_scale2(self.mlp(self.norm2(x))), k, dim)


class MetaFormerStage(nn.Module):
    """metaformer.py MetaFormerStage: Downsampling when the width changes; attention stages run their
    blocks on ``x.reshape(B, C, -1).transpose(1, 2)`` and go back with ``transpose(1, 2).reshape``."""

    def __init__(self, in_chs, out_chs, depth, token_mixer, norm_layer, res_scale_init_value):
        super().__init__()
        self.use_nchw = token_mixer is not MetaAttention
        self.downsample = nn.Identity() if in_chs == out_chs else Downsampling(
            in_chs, out_chs, 3, 2, 1, norm_layer=LayerNorm2dNoBias)
        self.blocks = nn.Sequential(*[MetaFormerBlock(out_chs, token_mixer, norm_layer, self.use_nchw,
                                                      res_scale_init_value) for _ in range(depth)])

    def _run(self, x, step):
        x = self.downsample(x)
        B, C, H, W = x.shape
        if not self.use_nchw:
            x = x.reshape(B, C, -1).transpose(1, 2)
        x = step(x)
        if not self.use_nchw:
            x = x.transpose(1, 2).reshape(B, C, H, W)
        return x

    def forward(self, x):
        return self._run(x, self.blocks)

    def geonorm(self, x, rewrite):
        def step(h):
            for k, blk in enumerate(self.blocks):
                h = blk.geonorm(h, k, 1 if self.use_nchw else -1) if rewrite else blk(h)
            return h
        return self._run(x, step)


class MlpHead(nn.Module):
    def __init__(self, dim, num_classes, mlp_ratio=4):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.fc1, self.act = nn.Linear(dim, hidden), SquaredReLU()
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x))))


class CAFormer(nn.Module):
    """timm/models/metaformer.py MetaFormer as ``caformer_s18`` (SepConv stages with LayerNorm2dNoBias and
    no residual scale, then Attention stages with LayerNormNoBias and a per-channel ``res_scale`` 1.0),
    shrunk to one SepConv stage of depth 1 (dim 16) and one Attention stage of depth 2 (dim 32); head
    ``global_pool, norm (LayerNorm2d), flatten, fc = MlpHead (with its own LayerNorm)``."""

    def __init__(self, dims=(16, 32), depths=(1, 2), num_classes=5):
        super().__init__()
        self.stem = ConvStem(3, dims[0], padding=2, norm_layer=LayerNorm2dNoBias)
        mixers, norms, res_scales = (SepConv, MetaAttention), (LayerNorm2dNoBias, LayerNormNoBias), (None, 1.0)
        self.stages = nn.Sequential(*[MetaFormerStage(dims[max(i - 1, 0)], dims[i], depths[i], mixers[i], norms[i],
                                                      res_scales[i]) for i in range(len(dims))])
        self.head = nn.Sequential(OrderedDict([("norm", LayerNorm2d(dims[-1])),
                                               ("fc", MlpHead(dims[-1], num_classes))]))

    def _head(self, x):
        return self.head.fc(self.head.norm(x.mean((2, 3), keepdim=True)).flatten(1))

    def forward(self, x):
        return self._head(self.stages(self.stem(x)))

    def geonorm(self, x, conv_stage_rewritten: bool):
        """GeoNorm model: the attention stage's 4 pre sites with ``x = res_scale(x)`` (kept); the SepConv
        stage's sites (norm over C of an NCHW stream, through LayerNorm2d's permutes) rewritten over dim 1
        when ``conv_stage_rewritten``, else left as they are."""
        x = self.stem(x)
        x = self.stages[0].geonorm(x, conv_stage_rewritten)
        x = self.stages[1].geonorm(x, True)
        return self._head(x)


def build_caformer():
    torch.manual_seed(0)
    return _built(CAFormer(), _images())


# =================================================================================================
# timm SwinV2 (timm/models/swin_transformer_v2.py), with stochastic depth

class WindowAttentionV2(nn.Module):
    """swin_transformer_v2.py WindowAttention: cosine attention (``F.normalize`` of q and k), clamped
    learned logit scale, continuous relative position bias from a small MLP (``16 * sigmoid``)."""

    def __init__(self, dim, window_size, num_heads, cpb_hidden=32):
        super().__init__()
        self.window_size, self.num_heads = window_size, num_heads
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_hidden), nn.ReLU(), nn.Linear(cpb_hidden, num_heads, bias=False))
        ws = window_size
        rel = torch.arange(-(ws - 1), ws, dtype=torch.float32)
        table = torch.stack(torch.meshgrid(rel, rel, indexing="ij")).permute(1, 2, 0).unsqueeze(0)
        table = table / (ws - 1) * 8
        table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)
        self.register_buffer("relative_coords_table", table, persistent=False)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rc = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("relative_position_index", rc[..., 0] * (2 * ws - 1) + rc[..., 1], persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        bias = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = bias[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        attn = attn + 16 * torch.sigmoid(bias).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B_, N, -1))


class SwinTransformerV2Block(nn.Module):
    """swin_transformer_v2.py SwinTransformerV2Block (res-post-norm) on NHWC:
    ``x = x + drop_path1(norm1(_attn(x)))``; ``reshape(B, -1, C)``; ``x = x + drop_path2(norm2(mlp(x)))``;
    ``reshape(B, H, W, C)``. DropPath is ``nn.Identity`` at rate 0 (timm's rule)."""

    def __init__(self, dim, feat_size, num_heads, window_size, shift_size, drop_path):
        super().__init__()
        self.window_size = min(window_size, feat_size)
        self.shift_size = 0 if feat_size <= window_size else shift_size
        self.attn = WindowAttentionV2(dim, self.window_size, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = TimmMlp(dim, 4 * dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if self.shift_size:
            img = torch.zeros(1, feat_size, feat_size, 1)
            cnt = 0
            ws, ss = self.window_size, self.shift_size
            slices = (slice(0, -ws), slice(-ws, -ss), slice(-ss, None))
            for h in slices:
                for w in slices:
                    img[:, h, w, :] = cnt
                    cnt += 1
            mw = window_partition(img, self.window_size).view(-1, self.window_size ** 2)
            mask = mw.unsqueeze(1) - mw.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        else:
            mask = None
        self.register_buffer("attn_mask", mask, persistent=False)

    def _attn(self, x):
        B, H, W, C = x.shape
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_size ** 2, C)
        windows = self.attn(windows, mask=self.attn_mask).view(-1, self.window_size, self.window_size, C)
        x = window_reverse(windows, self.window_size, H, W)
        if self.shift_size:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return x

    def forward(self, x):
        B, H, W, C = x.shape
        x = x + self.drop_path1(self.norm1(self._attn(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return x.reshape(B, H, W, C)


class PatchMergingV2(nn.Module):
    """swin_transformer_v2.py PatchMerging: 2x2 neighbours to 4C features, ``reduction`` (4C -> 2C), then
    ``norm`` (v2 order)."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x):
        B, H, W, C = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.norm(self.reduction(x))


class SwinV2Stage(nn.Module):
    def __init__(self, dim, out_dim, feat_size, depth, downsample, num_heads, window_size, dprs):
        super().__init__()
        self.downsample = PatchMergingV2(dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[SwinTransformerV2Block(out_dim, feat_size, num_heads, window_size,
                                                             0 if i % 2 == 0 else window_size // 2, dprs[i])
                                      for i in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class PatchEmbedNHWC(nn.Module):
    """timm PatchEmbed with ``output_fmt='NHWC'`` and a LayerNorm (Swin's ``patch_norm``)."""

    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinV2(nn.Module):
    """timm/models/swin_transformer_v2.py SwinTransformerV2 at timm's default ``drop_path_rate=0.1``
    (linearly spread over the 4 blocks: 0, .033, .067, .1): patch embed (+ LayerNorm) to NHWC, stage 0
    (2 blocks, window 4, shift 0 / 2), stage 1 behind PatchMerging (16 -> 32), final ``norm``, average
    pool over H, W, ``head``. image 16, patch 2."""

    def __init__(self, embed_dim=16, depths=(2, 2), heads=(2, 4), window_size=4, img=16, patch=2,
                 drop_path_rate=0.1, num_classes=5):
        super().__init__()
        self.patch_embed = PatchEmbedNHWC(patch, 3, embed_dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        layers, dim, feat = [], embed_dim, img // patch
        for i, depth in enumerate(depths):
            out_dim = embed_dim * 2 ** i
            feat = feat // 2 if i > 0 else feat
            layers.append(SwinV2Stage(dim, out_dim, feat, depth, i > 0, heads[i], window_size,
                                      dpr[sum(depths[:i]):sum(depths[:i + 1])]))
            dim = out_dim
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.norm(self.layers(self.patch_embed(x)))
        return self.head(x.mean((1, 2)))


def build_swinv2_train():
    torch.manual_seed(0)
    return _built(SwinV2(), _images(hw=16), train=True)
