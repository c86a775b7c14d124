"""What a conversion found: :class:`Site` (rewritten or rewritable), :class:`Skip` (a norm left alone)."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

SITE_KINDS = ("pre", "post", "deepnorm", "sandwich", "respost", "parallel")
NORM_KINDS = ("layer_norm", "rms_norm")


@dataclass(frozen=True)
class Site:
    """One residual-plus-normalization site.

    ``kind``: one of :data:`SITE_KINDS`; ``norm``: ``"layer_norm"`` or ``"rms_norm"``; ``block``:
    0-based block index along its residual stream; ``decay``: the block's decay constant; ``path``:
    module path of the block (``""`` when the graph carries none); ``node``: the graph node of the
    residual add; ``stream``: which residual stream (0 unless the model has several);
    ``norm_path``: module path of the site's named norm (``""`` when the graph carries none);
    ``update``: the module path of the site's :class:`GeodesicUpdate` in the result (``"geonorm.3"`` in a
    converted module, ``"geonorm.model.layers.1.site0"`` in an installed model; ``""`` if not rewritten).
    """

    kind: str
    norm: str
    block: int
    decay: float
    path: str = ""
    node: str = ""
    stream: int = 0
    norm_path: str = ""
    update: str = ""


@dataclass(frozen=True)
class Skip:
    """A normalization that is not part of a rewritten site, with the reason in words."""

    reason: str
    node: str
    path: str = ""


@dataclass
class Report:
    """The result of :func:`geonorm_fx.inspect` / :func:`geonorm_fx.convert`.

    Shapes: with ``dynamic=True`` the capture asks torch.export to keep the batch and sequence dims of
    every tensor input dynamic (dims 0 and 1; dim 0 alone for inputs of 4 or more dims, whose dim 1 is
    channels or heads; for a converted module, the dims its capture kept). torch.export may fix some of
    them anyway (a shape check, a fixed-size table, a size-1 example) without failing. The last dim of
    a floating-point input is a feature dim (a ``(batch, features)`` input, a bias vector): it is asked
    for too, but its being fixed by the weights it meets is expected, so it does not count below.

    - ``dynamic_dims``: ``{input name: dims that are dynamic in the captured graph}`` for every tensor
      input, read back from the graph (names are forward arguments, with a path for nested inputs:
      ``"x"``, ``"pair[0]"``, ``"batch['ids']"``). Empty with ``tracer="fx"``, whose graphs do not
      record shapes (they are traced symbolically and not specialised to the example).
    - ``fixed_dims``: ``{input name: {dim: size}}``, the counted dims (batch and sequence, not feature
      dims) asked to be dynamic that the capture fixed to the example's size (a
      :class:`GeoNormWarning` names them at capture time).
    - ``dynamic``: True exactly when a dynamic capture was asked for, it succeeded, and every counted
      dim stayed dynamic (``fixed_dims`` is empty): then the result accepts other batch sizes and
      sequence lengths. False for a static capture (``dynamic=False``, a failed dynamic capture)
      and for ``tracer="fx"``. For a given ``ExportedProgram`` / GraphModule (nothing asked for): True
      when some input dim is dynamic.
    """

    sites: list[Site] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    n_blocks: int = 0
    schedule: str = "harmonic"
    tracer: str = ""
    dynamic: bool = True
    removed_parameters: list[str] = field(default_factory=list)
    blocks_per_stream: list[int] = field(default_factory=list)
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)
    fixed_dims: dict[str, dict[int, int]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Number of sites by kind, e.g. ``{"pre": 8}``."""
        return dict(Counter(site.kind for site in self.sites))

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of everything in the report."""
        return {
            "sites": [asdict(s) for s in self.sites],
            "skipped": [asdict(s) for s in self.skipped],
            "counts": self.counts(),
            "n_blocks": self.n_blocks,
            "schedule": self.schedule,
            "tracer": self.tracer,
            "dynamic": self.dynamic,
            "removed_parameters": list(self.removed_parameters),
            "blocks_per_stream": list(self.blocks_per_stream),
            "dynamic_dims": {name: list(dims) for name, dims in self.dynamic_dims.items()},
            "fixed_dims": {name: {str(d): n for d, n in dims.items()} for name, dims in self.fixed_dims.items()},
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        streams = f" on {len(self.blocks_per_stream)} residual streams" if len(self.blocks_per_stream) > 1 else ""
        lines = [f"{len(self.sites)} site(s) in {self.n_blocks} block(s){streams} "
                 f"[{', '.join(f'{k}={v}' for k, v in sorted(self.counts().items())) or 'none'}], "
                 f"schedule={self.schedule}, tracer={self.tracer}, dynamic={self.dynamic}"]
        if self.sites:
            rows = [("kind", "norm", "stream", "block", "decay", "path", "node")]
            rows += [(s.kind, s.norm, str(s.stream), str(s.block), f"{s.decay:.4g}", s.path or "-", s.node)
                     for s in self.sites]
            lines += _table(rows)
        if self.skipped:
            lines.append(f"{len(self.skipped)} norm(s) skipped:")
            lines += _table([("node", "path", "reason")]
                            + [(s.node, s.path or "-", s.reason) for s in self.skipped])
        if self.fixed_dims:
            lines.append("input dims fixed by the capture (asked to be dynamic): " + ", ".join(
                f"{name}[{d}]={n}" for name, dims in self.fixed_dims.items() for d, n in dims.items()))
        if self.removed_parameters:
            lines.append("removed parameters (post-norms): " + ", ".join(self.removed_parameters))
        return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, row in enumerate(rows):
        out.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out
