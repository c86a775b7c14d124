"""The repeated units (blocks) a graph's nodes were computed in, read from their module stacks.

GEONORM.md section 4: a block is one application of a repeated unit: an element of a ModuleList /
Sequential of layers (a numeric path component), several invocations of one class under one parent, or
one module applied n times (weight sharing). A site lies in the innermost *homogeneous* unit on its
module stack: an element of a container whose elements all have the same structure, a module with
same-class siblings, or a module applied several times. Only where no homogeneous unit encloses it does
an element of a mixed container count (a hybrid stack ``[Attention(), Mamba(), Attention()]``): so the
sub-layers of a block kept in a small mixed list (``ModuleList([attn, mlp])`` inside each layer, T5's
``block.i.layer.j``) share their block, while the layers of a mixed stack are blocks of their own.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import fx

from .ops import GraphView


@dataclass(frozen=True)
class Unit:
    """One application of a repeated unit: its module path and the invocation key that tells apart the
    applications of a shared module (``layer``, ``layer@1``, ...)."""

    path: str
    call: str
    homogeneous: bool


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _is_element(path: str) -> bool:
    return path.rsplit(".", 1)[-1].isdigit()


class ModuleTree:
    """The module paths, classes and invocations recorded on a graph's nodes (``nn_module_stack``)."""

    def __init__(self, view: GraphView, not_units: set | frozenset = frozenset()):
        self.view = view
        self.not_units = set(not_units)   # paths that are never blocks (norm modules applied many times)
        self.classes: dict[str, str] = {}
        self.calls: dict[str, set] = defaultdict(set)
        self.children: dict[str, set] = defaultdict(set)
        self._signatures: dict[str, object] = {}
        self._homogeneous: dict[str, bool] = {}
        for node in view.nodes:
            for key, path, cls in view.module_stack(node):
                if not path:
                    continue
                self.classes[path] = cls
                self.calls[path].add(_call_id(key))
                self._register(path)

    @property
    def empty(self) -> bool:
        return not self.classes

    def _register(self, path: str) -> None:
        while path:
            parent = _parent(path)
            if path in self.children[parent]:
                return
            self.children[parent].add(path)
            path = parent

    def signature(self, path: str) -> object:
        """The class of an invoked module, else the sorted signatures of its children (a container)."""
        sig = self._signatures.get(path)
        if sig is None:
            sig = self.classes.get(path) or tuple(sorted(map(str, (self.signature(c) for c in self.children[path]))))
            self._signatures[path] = sig
        return sig

    def homogeneous(self, path: str) -> bool:
        """A module applied more often than the module enclosing it (weight sharing; its submodules only
        inherit that count), an element of a container whose (at least two) elements have one structure,
        or an invoked module with a same-class sibling under its parent."""
        cached = self._homogeneous.get(path)
        if cached is not None:
            return cached
        calls = len(self.calls.get(path, ()))
        if calls >= 2 and calls > self._ancestor_calls(path):
            result = True   # applied more often than what encloses it: a shared module applied n times
        elif _is_element(path):
            siblings = [c for c in self.children[_parent(path)] if _is_element(c)]
            result = len(siblings) >= 2 and len({str(self.signature(c)) for c in siblings}) == 1
        elif path in self.classes:
            cls = self.classes[path]
            result = sum(1 for c in self.children[_parent(path)] if self.classes.get(c) == cls) >= 2
        else:
            result = False
        self._homogeneous[path] = result
        return result

    def _ancestor_calls(self, path: str) -> int:
        """How often the nearest invoked module enclosing ``path`` was applied (1 at the top)."""
        while path:
            path = _parent(path)
            if path in self.calls:
                return len(self.calls[path])
        return 1

    def unit_of_stack(self, stack: list[tuple[str, str, str]]) -> Unit | None:
        """The block a node with this module stack (outermost first) belongs to, or None."""
        candidates: list[tuple[str, str]] = []   # (path, invocation key), outermost first
        previous = ""
        for i, (key, path, _cls) in enumerate(stack):
            if not path:
                continue
            parts = path.split(".")
            start = len(previous.split(".")) if previous else 0
            for j in range(start + 1, len(parts)):   # non-invoked container elements between two entries
                prefix = ".".join(parts[:j])
                if _is_element(prefix):
                    candidates.append((prefix, _derived_call(prefix, key)))
            candidates.append((path, _call_id(key)))
            previous = path
        candidates = [c for c in candidates if c[0] not in self.not_units]
        homogeneous = [c for c in candidates if self.homogeneous(c[0])]
        if homogeneous:
            path, call = homogeneous[-1]
            return Unit(path, call, True)
        elements = [c for c in candidates if _is_element(c[0])]
        if elements:
            path, call = elements[-1]
            return Unit(path, call, False)
        return None

    def unit(self, node: fx.Node) -> Unit | None:
        return self.unit_of_stack(self.view.module_stack(node))

    def common_unit(self, nodes) -> Unit | None:
        """The unit of the longest module stack shared by all ``nodes`` (None when they share none)."""
        stacks = [self.view.module_stack(n) for n in nodes]
        if not stacks:
            return None
        common = stacks[0]
        for stack in stacks[1:]:
            k = 0
            while k < min(len(common), len(stack)) and common[k][0] == stack[k][0]:
                k += 1
            common = common[:k]
        return self.unit_of_stack(common)

    def contains(self, unit: Unit, node: fx.Node) -> bool:
        """True when ``node`` was computed inside this application of ``unit``."""
        for key, path, _cls in self.view.module_stack(node):
            if path == unit.path:
                return _call_id(key) == unit.call
            if path.startswith(unit.path + "."):
                return _derived_call(unit.path, key) == unit.call
        return False


def _call_id(key: str) -> str:
    """The invocation key without the tracer's prefix: ``L__self__layers.0@1`` -> ``layers.0@1``."""
    key = str(key)
    return key[len("L__self__"):] if key.startswith("L__self__") else key


def _derived_call(prefix: str, key: str) -> str:
    """The invocation id of a container element that is not itself invoked: its path with the
    application suffix of the invoked module below it (``layers.0.attn@1`` -> ``layers.0@1``)."""
    call = _call_id(key)
    return prefix + ("@" + call.rsplit("@", 1)[1] if "@" in call else "")
