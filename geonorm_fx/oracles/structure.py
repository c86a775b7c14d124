"""The structural cross-check: judge a :class:`~geonorm_fx.report.Report` by the model's module tree.

The detector decides streams and blocks from the captured graph; this check looks only at
``model.named_modules()`` and at the report's own fields, so it does not repeat the detector's
stream logic. A *repeated unit* of the tree is a module with submodules that is an element of a
``ModuleList`` / ``Sequential`` (a numeric path component) or one of several children of one class
under one parent (a module applied several times, ALBERT-style, shows up in the report as one path in
several blocks and counts too). Rules:

(a) **norms lie in blocks.** A site's block path is a repeated unit, and the site's norm lies inside its
    block. A ``post``/``deepnorm`` site removes its norm, so a norm outside every repeated unit (a final,
    embedding or head norm) is a disagreement; for the other kinds, and for models with no repeated
    unit at all (hand-written flat stacks), the tree has nothing to say and a note is made.
(b) **one signature per block class.** Block instances (one application of a block module) of one class
    carry the same multiset of ``(kind, norm)``. An instance that differs is a disagreement unless its
    module tree differs from the others' (e.g. ModernBERT's first layer has ``nn.Identity`` for a norm,
    a T5 decoder block has a cross-attention layer): then it is a note.
(c) **order.** Within a stream, block indices start at 0, never decrease and never skip; the sites of one
    block share one block path and one decay; ``report.blocks_per_stream`` matches.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from torch import nn

_CONTAINERS = (nn.ModuleList, nn.Sequential)
_REMOVES_NORM = ("post", "deepnorm")


@dataclass
class StructuralCheck:
    """``disagreements``: every way the report contradicts the module tree, in words (empty when it
    agrees); ``notes``: what the tree cannot judge (flat models, unknown paths) or explains."""

    disagreements: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.disagreements

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        lines = [f"structural check: {'agrees' if self.ok else f'{len(self.disagreements)} disagreement(s)'}"]
        lines += [f"  ! {d}" for d in self.disagreements] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def structural_check(model: nn.Module, report) -> StructuralCheck:
    """Check ``report`` (a :class:`geonorm_fx.Report` of ``model``) against ``model``'s module tree."""
    tree = _Tree(model)
    out = StructuralCheck()
    sites = list(report.sites)
    applications = defaultdict(set)   # block path -> {(stream, block)}: a module applied n times
    for s in sites:
        if s.path:
            applications[s.path].add((s.stream, s.block))
    _norms_in_blocks(tree, sites, applications, out)
    _one_signature_per_class(tree, sites, out)
    _order(report, sites, out)
    return out


def _name(site, i: int) -> str:
    return f"site {i} ({site.kind} {site.norm} at {site.node or '?'})"


class _Tree:
    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.any_repeated = any(self.repeated(p) for p in self.modules)

    def get(self, path: str):
        return self.modules.get(path)

    def repeated(self, path: str) -> bool:
        """An element of a ModuleList/Sequential, or one of several same-class children of its parent;
        either way a module with submodules (a norm or a Linear in a list is not a block)."""
        module = self.modules.get(path)
        if not path or module is None or not any(True for _ in module.children()):
            return False
        parent_path, _, leaf = path.rpartition(".")
        parent = self.modules.get(parent_path)
        if parent is None:
            return False
        if leaf.isdigit() and isinstance(parent, _CONTAINERS):
            return True
        return sum(type(c) is type(module) for c in parent.children()) >= 2

    def repeated_prefix(self, path: str) -> str | None:
        """The innermost repeated unit containing ``path`` (the path itself only if it is not a norm)."""
        parts = path.split(".")
        for k in range(len(parts), 0, -1):
            prefix = ".".join(parts[:k])
            if k == len(parts) and _looks_like_norm(self.modules.get(prefix)):
                continue
            if self.repeated(prefix):
                return prefix
        return None

    def fingerprint(self, path: str) -> tuple:
        return tuple((p, type(m).__name__) for p, m in self.modules[path].named_modules())


def _looks_like_norm(module) -> bool:
    return module is not None and "norm" in type(module).__name__.lower()


def _inside(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def _norms_in_blocks(tree: _Tree, sites, applications, out: StructuralCheck) -> None:
    if not tree.any_repeated:
        out.notes.append("the module tree has no repeated block (a flat model): rule (a) cannot be judged")
    for i, s in enumerate(sites):
        who = _name(s, i)
        if s.path:
            module = tree.get(s.path)
            if module is None:
                out.disagreements.append(f"{who}: its block path {s.path!r} is not a module of the model")
                continue
            if not tree.repeated(s.path) and len(applications[s.path]) < 2:
                out.disagreements.append(
                    f"{who}: its block {s.path!r} ({type(module).__name__}) is not a repeated unit of the module "
                    "tree: not an element of a ModuleList/Sequential, not one of several children of its class "
                    "under its parent, and applied only once")
            if not s.norm_path:
                out.notes.append(f"{who}: the report gives no module path for its norm")
            elif not _inside(s.norm_path, s.path):
                out.disagreements.append(f"{who}: its norm {s.norm_path!r} lies outside its block {s.path!r}")
            elif s.norm_path == s.path and _looks_like_norm(module):
                out.disagreements.append(f"{who}: its block {s.path!r} is the norm itself, not a block")
            continue
        # no block path in the report: the tree can still say where the norm lives
        unit = tree.repeated_prefix(s.norm_path) if s.norm_path else None
        if unit is not None:
            out.notes.append(f"{who}: no block path in the report; its norm {s.norm_path!r} lies in block {unit!r}")
        elif s.kind in _REMOVES_NORM and tree.any_repeated:
            out.disagreements.append(
                f"{who}: removes the norm {s.norm_path or '(unnamed)'!r}, which lies in no repeated block of the "
                "model: a norm outside the blocks (final, embedding, head norm) is never a post site")
        elif tree.any_repeated:
            out.notes.append(f"{who}: its norm {s.norm_path or '(unnamed)'!r} lies in no repeated block")


def _signature_text(sig) -> str:
    return " + ".join(f"{n} {kind}/{norm}" for (kind, norm), n in sig) or "no site"


def _one_signature_per_class(tree: _Tree, sites, out: StructuralCheck) -> None:
    instances: dict[tuple, list] = {}          # (stream, block, path) -> sites, in order
    for s in sites:
        if s.path and tree.get(s.path) is not None:
            instances.setdefault((s.stream, s.block, s.path), []).append(s)
    by_class: dict[type, list] = defaultdict(list)
    for key, members in instances.items():
        sig = tuple(sorted(Counter((m.kind, m.norm) for m in members).items()))
        by_class[type(tree.get(key[2]))].append((key, sig))
    for cls, group in by_class.items():
        counts = Counter(sig for _, sig in group)
        majority = max(counts, key=lambda sig: (counts[sig], -[g[1] for g in group].index(sig)))
        if len(counts) == 1:
            continue
        reference = next(key for key, sig in group if sig == majority)
        ref_print = tree.fingerprint(reference[2])
        label = lambda key: f"{key[2]} (stream {key[0]}, block {key[1]})"  # noqa: E731
        odd = [(key, sig) for key, sig in group if sig != majority]
        explained = [(k, s) for k, s in odd if tree.fingerprint(k[2]) != ref_print]
        unexplained = [(k, s) for k, s in odd if tree.fingerprint(k[2]) == ref_print]
        same = [label(k) for k, s in group if s == majority]
        if unexplained:
            out.disagreements.append(
                f"blocks of class {cls.__name__} have different sites although their module trees are alike: "
                + "; ".join(f"{label(k)} has {_signature_text(s)}" for k, s in unexplained)
                + f", but {', '.join(same)} {'has' if len(same) == 1 else 'have'} {_signature_text(majority)}")
        for k, s in explained:
            out.notes.append(f"block {label(k)} of class {cls.__name__} has {_signature_text(s)} where "
                             f"{reference[2]} has {_signature_text(majority)}; its module tree differs, "
                             "which explains it")


def _order(report, sites, out: StructuralCheck) -> None:
    streams: dict[int, list] = defaultdict(list)
    for i, s in enumerate(sites):
        streams[s.stream].append((i, s))
    per_stream = list(getattr(report, "blocks_per_stream", []) or [])
    for stream, members in sorted(streams.items()):
        previous = -1
        seen: dict[int, tuple] = {}
        for i, s in members:
            who = _name(s, i)
            if s.block < previous:
                out.disagreements.append(f"stream {stream}: {who} is in block {s.block} after block {previous}: "
                                         "block indices must follow the order of application")
            elif s.block > previous + 1:
                out.disagreements.append(
                    f"stream {stream}: {who} is in block {s.block}, skipping from block {previous}")
            previous = max(previous, s.block)
            if s.block in seen:
                path, decay, first = seen[s.block]
                if s.path != path:
                    out.disagreements.append(f"stream {stream}: block {s.block} spans two block paths: "
                                             f"{path!r} ({first}) and {s.path!r} ({who})")
                if abs(s.decay - decay) > 1e-9 * max(1.0, abs(decay)):
                    out.disagreements.append(f"stream {stream}: the sites of block {s.block} have different decays: "
                                             f"{decay:.6g} ({first}) and {s.decay:.6g} ({who})")
            else:
                seen[s.block] = (s.path, s.decay, who)
        if stream < len(per_stream) and per_stream[stream] != previous + 1:
            out.disagreements.append(f"stream {stream}: the report counts {per_stream[stream]} block(s) but its "
                                     f"sites are in {previous + 1}")
