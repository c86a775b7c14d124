"""Shared pieces of the training study: a small GPT in plain PyTorch, byte-level data, the optimiser.

Used by ``train_lm.py``, ``convert_trained.py`` and ``tests/test_training.py``. Nothing here knows
about GeoNorm: the variants are made by ``geonorm_fx.convert`` on these models.
"""
from __future__ import annotations

import hashlib
import math
import pathlib
import sysconfig
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256  # byte-level tokens


@dataclass
class GPTConfig:
    """Size and layout of :class:`GPT`. ``norm_position`` is ``"pre"`` or ``"post"``."""
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128
    norm_position: str = "pre"
    tie_head: bool = False
    mlp_ratio: int = 4
    embed_norm: bool = False  # LayerNorm on the embedding sum (BERT-style; the default for Post-Norm)

    def to_dict(self) -> dict:
        """The config as a JSON-serialisable dict."""
        return asdict(self)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention via ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """Linear - GELU - Linear."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """One transformer block: Pre-Norm ``x + f(N(x))`` or Post-Norm ``N(x + f(x))``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.post = cfg.norm_position == "post"
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post:
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.mlp(x))
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only LM: token + position embedding (optionally normed), ``n_layers`` blocks, final norm
    (Pre-Norm only), head.

    ``forward(idx)`` maps int64 tokens ``(B, T)`` to logits ``(B, T, 256)``.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {cfg.norm_position!r}")
        self.cfg = cfg
        self.tok = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.ln_e = nn.LayerNorm(cfg.d_model) if cfg.embed_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.norm_position == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.d_model, VOCAB, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_head:
            self.head.weight = self.tok.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.ln_e(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def expected_counts(cfg: GPTConfig) -> dict[str, int]:
    """The site counts ``gf.convert`` must report for this model: two per block, of its placement."""
    return {cfg.norm_position: 2 * cfg.n_layers}


# ----------------------------------------------------------------------------------------------- data

def stdlib_files() -> list[pathlib.Path]:
    """Every ``*.py`` of the running interpreter's standard library (no site-packages), sorted."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    return sorted(p for p in root.rglob("*.py") if p.is_file() and not skip & set(p.relative_to(root).parts))


@dataclass
class ByteData:
    """Train and validation byte streams (uint8 tensors) and where they came from."""
    train: torch.Tensor
    val: torch.Tensor
    source: str
    n_files: int
    sha256: str

    def describe(self) -> dict:
        """A JSON-serialisable summary for ``summary.json``."""
        return {"source": self.source, "files": self.n_files, "train_bytes": int(self.train.numel()),
                "val_bytes": int(self.val.numel()), "sha256": self.sha256}


def load_data(path: str | None = None, val_every: int = 20, val_fraction: float = 0.1) -> ByteData:
    """Load text as bytes with a fixed train/validation split.

    ``path`` is a file or a folder (every file below it, sorted by path), default the standard library's
    sources. With at least ``val_every`` files, every ``val_every``-th file (index % val_every ==
    val_every // 2) is validation; with fewer (e.g. one file), the last ``val_fraction`` of the bytes is.
    """
    if path is None:
        files, source = stdlib_files(), f"stdlib:{sysconfig.get_paths()['stdlib']}"
    else:
        p = pathlib.Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        source = str(p)
    if not files:
        raise ValueError(f"no files found under {path!r}")
    blobs = [f.read_bytes() for f in files]
    digest = hashlib.sha256()
    for b in blobs:
        digest.update(b)
    if len(blobs) >= val_every:
        train = b"\n".join(b for i, b in enumerate(blobs) if i % val_every != val_every // 2)
        val = b"\n".join(b for i, b in enumerate(blobs) if i % val_every == val_every // 2)
    else:
        allb = b"\n".join(blobs)
        cut = int(len(allb) * (1 - val_fraction))
        train, val = allb[:cut], allb[cut:]
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return ByteData(as_tensor(train), as_tensor(val), source, len(files), digest.hexdigest()[:16])


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    """``batch`` random windows of ``seq_len + 1`` bytes -> (inputs, targets), int64, drawn with ``gen``."""
    if stream.numel() < seq_len + 2:
        raise ValueError(f"data stream of {stream.numel()} bytes is shorter than seq_len + 2")
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=gen)
    win = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()]).long()
    return win[:, :-1], win[:, 1:]


def eval_batches(stream: torch.Tensor, n_batches: int, batch: int, seq_len: int) -> list:
    """A fixed validation set: ``n_batches * batch`` windows evenly spaced over ``stream``."""
    n = n_batches * batch
    last = stream.numel() - seq_len - 1
    if last < 1:
        raise ValueError(f"validation stream of {stream.numel()} bytes is shorter than seq_len + 2")
    starts = torch.linspace(0, last - 1, n).long().tolist()
    win = torch.stack([stream[s:s + seq_len + 1] for s in starts]).long()
    return [(win[i:i + batch, :-1], win[i:i + batch, 1:]) for i in range(0, n, batch)]


@torch.no_grad()
def evaluate(model: nn.Module, batches: list) -> float:
    """Mean cross-entropy (nats per byte) of ``model`` over ``batches``, in eval mode."""
    was_training = model.training
    model.eval()
    total = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches)
    model.train(was_training)
    return total / len(batches)


# ------------------------------------------------------------------------------------------ optimiser

def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.95); weight decay on matrices only (not on biases, norms, geodesic scale/bias)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio * lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
