"""Class 11 (continued): shapes of real code: PyTorch's own nn.TransformerEncoderLayer (both placements),
Hugging Face GPT-2's Conv1D (``addmm`` bias adds inside the branches), a Perceiver latent stream that
starts from a parameter, towers joined by a concatenation, residual writes through ``x[:] = ...``, and a
float16 model that adds the residual in float32."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import D, SHAPES, VOCAB, Kept, S, case, geo, token_inputs, tokens
from .blocks import LM, LN, MLP, RMS, Attn, Mix, Pre, Stepped, Stepped2, lm_ref, stack


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder`` of two ``nn.TransformerEncoderLayer`` (batch_first, dropout 0)."""

    def __init__(self, norm_first):
        super().__init__()
        self.norm_first = norm_first
        self.embed = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=2 * D, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=LN() if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, t):
        return self.head(self.encoder(self.embed(t)))

    def geonorm(self, t):
        x = self.embed(t)
        for k, layer in enumerate(self.encoder.layers):
            if self.norm_first:
                x = geo(x, layer._sa_block(layer.norm1(x), None, None), k)
                x = geo(x, layer._ff_block(layer.norm2(x)), k)
            else:
                x = geo(x, layer._sa_block(x, None, None), k)
                x = geo(x, layer._ff_block(x), k)
        if self.encoder.norm is not None:
            x = self.encoder.norm(x)
        return self.head(x)


@case("torch-transformer-encoder-norm-first", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("encoder.norm", why="final norm")])
def torch_encoder_pre():
    """PyTorch's ``nn.TransformerEncoderLayer(norm_first=True)`` in an ``nn.TransformerEncoder`` with a final
    norm: 4 pre sites (``x + _sa_block(norm1(x))``, ``x + _ff_block(norm2(x))``), the final norm skipped
    (the eval-mode fast path of the source gives the same function)."""
    return TorchEncoder(True)


@case("torch-transformer-encoder-post", sites=S("post", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref)
def torch_encoder_post():
    """PyTorch's ``nn.TransformerEncoderLayer(norm_first=False)``: ``norm1(x + _sa_block(x))``,
    ``norm2(x + _ff_block(x))``: 4 post sites, the norms removed."""
    return TorchEncoder(False)


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: ``addmm(bias, x.view(-1, nx), weight)`` then a view back."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(0.2 * torch.randn(nx, nf))
        self.bias = nn.Parameter(0.1 * torch.randn(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(4 * D, D), Conv1D(D, 4 * D)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = LN(), Mix(), LN(), GPT2MLP()

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.attn(self.ln_1(hidden_states))
        hidden_states = hidden_states + residual
        residual = hidden_states
        feed_forward_hidden_states = self.mlp(self.ln_2(hidden_states))
        return residual + feed_forward_hidden_states

    def geonorm(self, x, k):
        x = geo(x, self.attn(self.ln_1(x)), k)
        return geo(x, self.mlp(self.ln_2(x)), k)


@case("gpt2-conv1d-addmm", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="ln_f")])
def gpt2():
    """Hugging Face GPT-2's block (``residual`` variables, Conv1D = ``addmm(bias, x, W)``): the bias adds
    inside ``addmm`` are not residual adds; 4 pre sites."""
    return LM([GPT2Block(), GPT2Block()])


class PerceiverBlock(nn.Module):
    """Latent block: ``q = q + cross(N1(q), N_kv(x))``, ``q = q + mlp(N2(q))``."""

    def __init__(self):
        super().__init__()
        self.n1, self.n_kv, self.cross, self.n2, self.mlp = LN(), LN(), Attn(), RMS(), MLP()

    def forward(self, q, x):
        q = q + self.cross(self.n1(q), self.n_kv(x))
        return q + self.mlp(self.n2(q))

    def geonorm(self, q, x, k):
        q = geo(q, self.cross(self.n1(q), self.n_kv(x)), k)
        return geo(q, self.mlp(self.n2(q)), k)


class Perceiver(Stepped):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.latents = nn.Parameter(torch.randn(1, 3, D))
        self.blocks = nn.ModuleList([PerceiverBlock(), PerceiverBlock()])
        self.final = LN()
        self.head = nn.Linear(D, 5)

    def _run(self, t, step):
        x = self.embed(t)
        q = stack(self.blocks, self.latents.expand(t.shape[0], -1, -1), step, x)
        return self.head(self.final(q).mean(1))


@case("perceiver-latent-stream", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("blocks.0.n_kv", why="norm of the cross-attention context"),
            Kept("blocks.1.n_kv", why="norm of the cross-attention context"), Kept("final", why="final norm")])
def perceiver():
    """A Perceiver-style latent stream that starts from a learned parameter (``latents.expand``) and
    cross-attends to the input: the latent stream has 4 pre sites; the norms of the cross-attention
    context (the input tokens, never written by the blocks) are not sites."""
    return Perceiver()


class ConcatTowers(Stepped2):
    """Two towers, ``cat([a, b], -1)`` -> Linear(2d -> d) -> a trunk of blocks."""

    def __init__(self):
        super().__init__()
        self.emb_a, self.emb_b = nn.Embedding(VOCAB, D), nn.Embedding(VOCAB, D)
        self.tower_a, self.tower_b = nn.ModuleList([Pre()]), nn.ModuleList([Pre()])
        self.join = nn.Linear(2 * D, D)
        self.trunk = nn.ModuleList([Pre(), Pre()])
        self.final = LN()
        self.head = nn.Linear(D, VOCAB)

    def _run(self, a, b, step):
        x = stack(self.tower_a, self.emb_a(a), step)
        y = stack(self.tower_b, self.emb_b(b), step)
        return self.head(self.final(stack(self.trunk, self.join(torch.cat([x, y], dim=-1)), step)))


@case("towers-concat-then-trunk", sites=S("pre", 0, 0, per=2) + S("pre", 1, 0, per=2) + S("pre", 2, 0, 1, per=2),
      inputs=lambda: [(tokens(b, t), tokens(b, t, seed=1)) for b, t in SHAPES],
      ref=lambda m, a, b: m.geonorm(a, b), kept=[Kept("final", why="final norm")])
def concat_towers():
    """Two one-block towers joined by ``Linear(cat([a, b]))`` (feature size d -> 2d -> d) feeding a trunk:
    three streams (A, B, and the trunk, which starts at a feature-size change), each numbered from 0."""
    return ConcatTowers()


class SetItem(Pre):
    """``x[:] = x + f(N(x))`` (the new state written into the old tensor), twice."""

    def __init__(self):
        super().__init__(norm2=RMS)

    def forward(self, x):
        x[:] = x + self.mix(self.n1(x))
        x[:] = x + self.mlp(self.n2(x))
        return x


@case("inplace-setitem-export", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")], tracers=("export",))
def setitem_export():
    """Residual writes through ``x[:] = x + f(N(x))`` (captured with torch.export, which functionalizes the
    copy; fx cannot trace item assignment on a proxy): the copy into the old tensor is an alias of the
    new state, not a stream boundary: 4 pre sites on one stream, blocks 0, 0, 1, 1."""
    return LM([SetItem(), SetItem()])


class Float32Residual(Pre):
    """A float16 block that adds the residual in float32: ``(x.float() + f(N(x)).float()).to(x.dtype)``."""

    def forward(self, x):
        x = (x.float() + self.mix(self.n1(x)).float()).to(x.dtype)
        return (x.float() + self.mlp(self.n2(x)).float()).to(x.dtype)


@case("fp16-float32-residual-add", sites=S("pre", 0, 0, 1, per=2), inputs=token_inputs(), ref=lm_ref,
      kept=[Kept("final", why="final norm")], dtype=torch.float16, rel_tol=1e-2)
def fp16_residual():
    """A float16 model whose residual adds run in float32 (casts on both operands and on the sum): casts
    are seen through: 4 pre sites."""
    return LM([Float32Residual(), Float32Residual()])
