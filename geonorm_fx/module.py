"""The converted model: an ordinary ``nn.Module`` that runs one rewritten fx graph per mode.

It owns the source's parameters and buffers under their original names (``state_dict`` keys are
kept) and the geodesic updates under one submodule. ``forward`` runs the graph captured in the
current mode (``self.training``), so ``.train()`` / ``.eval()`` switch dropout and every other
mode-dependent behaviour. It starts in the source model's mode. It deep-copies, moves between devices,
and is traced again by torch.export / torch.compile like any module.

Inputs are checked before the graph runs (a few integer comparisons per tensor input): a size at a dim
the capture fixed, a size outside the bounds torch.export put on a dynamic dim, or another number of
dims raises :class:`InputShapeError` naming the input, the dim, both sizes and the fix, instead of
torch.export's bare guard ``AssertionError`` or a wrong-shaped result.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import linecache
import sys

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import free_symbols

from .errors import GeoNormError, InputShapeError
from .geodesic import check_decays_before_load
from .report import Report

_counter = itertools.count()


class GeoNormModule(nn.Module):
    """A model rewritten by :func:`geonorm_fx.convert`; ``geonorm_report`` says what was rewritten."""

    def __init__(self, graphs: dict[str, fx.GraphModule], report: Report, inputs=None, training: bool = True):
        """``inputs``: the captured tensor inputs' shapes (``Captured.inputs``, a list of
        :class:`~geonorm_fx.capture.InputShape`) that calls are checked against, ``None`` for no check;
        ``training``: the mode the module starts in (the source's)."""
        super().__init__()
        root = graphs["eval"] if "eval" in graphs else next(iter(graphs.values()))
        for name, child in root.named_children():
            self.add_module(name, child)
        for name, param in root._parameters.items():
            self.register_parameter(name, param)
        for name, buf in root._buffers.items():
            self.register_buffer(name, buf, persistent=name not in root._non_persistent_buffers_set)
        for attr in ("_in_spec", "_out_spec"):
            if hasattr(root, attr):
                setattr(self, attr, getattr(root, attr))
        self._geonorm_graphs = {mode: self._adopt(mode, gm, root) for mode, gm in graphs.items()}
        self.geonorm_report = report
        self._geonorm_input_checks = _input_checks(inputs)
        self._register_load_state_dict_pre_hook(check_decays_before_load, with_module=True)
        self._compile()
        self.train(training)

    def _adopt(self, mode: str, gm: fx.GraphModule, root: fx.GraphModule) -> fx.Graph:
        """Make every attribute the graph reads resolvable on ``self``; an attribute whose name is
        taken by another object (a per-mode constant or guard) is renamed."""
        for node in gm.graph.nodes:
            if node.op not in ("get_attr", "call_module"):
                continue
            obj = _lookup(gm, node.target)
            mine = _lookup(self, node.target)
            if mine is obj:
                continue
            if mine is None and gm is root:
                _assign(self, node.target, obj)
                continue
            new_name = f"_geonorm_{mode}_{node.target.replace('.', '_')}"
            _assign(self, new_name, obj)
            node.target = new_name
        gm.graph.owning_module = self
        return gm.graph

    def _compile(self) -> None:
        """Generate one forward per mode; give this instance a class whose ``forward`` has the source
        model's signature (argument names), as ``fx.GraphModule`` does, so torch.export / torch.onnx
        ``dynamic_shapes`` keyed by argument name work on the converted module."""
        forwards: dict = {}
        for mode, graph in self._geonorm_graphs.items():
            # a mode whose graph computes the same program (no dropout, no mode-dependent op) reuses
            # the other mode's code: generating and compiling it is most of the pass's time
            twin = next((m for m in forwards if _same_program(self, self._geonorm_graphs[m], graph)), None)
            forwards[mode] = forwards[twin] if twin is not None else _compile_graph(
                graph, getattr(self, "_geonorm_input_checks", ()), owner=self, mode=mode)
        self._geonorm_forward = forwards
        signature = inspect.signature(self._geonorm_forward.get("eval") or next(iter(self._geonorm_forward.values())))

        def forward(self, *args, **kwargs):
            mode = "train" if self.training else "eval"
            fn = self._geonorm_forward.get(mode) or next(iter(self._geonorm_forward.values()))
            if torch.compiler.is_compiling():
                return fn(self, *args, **kwargs)
            try:
                return fn(self, *args, **kwargs)
            except AssertionError as e:
                if "Guard failed" not in str(e):
                    raise
                raise _guard_error(e) from None

        forward.__signature__ = signature
        base = type(self).__mro__[1] if type(self).__dict__.get("_geonorm_per_instance") else type(self)
        self.__class__ = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__,
                                                       "__qualname__": base.__qualname__,
                                                       "_geonorm_per_instance": True})

    def dynamic_dims(self) -> list[list[int]]:
        """For each tensor input (in flattened order), the dims the capture kept dynamic (symbolic; a
        dim torch.export fixed stays a ``SymInt`` of a constant and is not listed)."""
        out = []
        for node in self._geonorm_graphs["eval" if "eval" in self._geonorm_graphs else "train"].nodes:
            val = node.meta.get("val") if node.op == "placeholder" else None
            if isinstance(val, torch.Tensor):
                out.append([d for d, size in enumerate(val.shape)
                            if isinstance(size, torch.SymInt) and free_symbols(size)])
        return out

    @property
    def graph(self) -> fx.Graph:
        """The rewritten graph of the current mode."""
        return self._geonorm_graphs["train" if self.training and "train" in self._geonorm_graphs else "eval"]

    @property
    def code(self) -> str:
        return self.graph.python_code(root_module="self").src

    def __deepcopy__(self, memo):
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        for key, value in self.__dict__.items():
            if key != "_geonorm_forward":
                twin.__dict__[key] = copy.deepcopy(value, memo)
        for graph in twin._geonorm_graphs.values():
            graph.owning_module = twin
        twin._compile()
        return twin

    def __reduce_ex__(self, protocol):
        raise GeoNormError(
            "a converted module cannot be pickled (its fx graphs carry fake-tensor metadata): save "
            "module.state_dict() and rebuild with geonorm_fx.convert(...), or deploy it with "
            "torch.export.save(torch.export.export(module, args), path)")


def _input_checks(inputs) -> tuple:
    """The per-call shape checks of the captured inputs, as a literal the generated code embeds:
    ``(placeholder index, name, rank, ((dim, low, high), ...), requested dims)``; a
    fixed dim has ``low == high``, a dynamic one appears only where torch.export bounded it."""
    checks = []
    for i in inputs or ():
        bounds = []
        for d, size in enumerate(i.shape):
            if size is not None:
                bounds.append((d, int(size), int(size)))
            elif d in i.bounds:
                low, high = i.bounds[d]
                bounds.append((d, int(low), sys.maxsize if high is None else int(high)))
        checks.append((i.index, i.name, len(i.shape), tuple(bounds), tuple(i.requested)))
    return tuple(checks)


def check_input_shapes(checks: tuple, *values) -> None:
    """Called first by the generated forward with the flattened inputs ``checks`` name; raises
    :class:`InputShapeError` on a mismatch. Symbolic sizes (a re-export or torch.compile tracing the
    module) are not compared, so the check adds no guard of its own."""
    for check, value in zip(checks, values):
        shape = getattr(value, "shape", None)
        if shape is None:
            continue
        if len(shape) != check[2]:
            raise _shape_error(check, tuple(shape), None)
        for d, low, high in check[3]:
            n = shape[d]
            if type(n) is int and (n < low or n > high):
                raise _shape_error(check, tuple(shape), d)


def _shape_error(check: tuple, shape: tuple, dim: int | None) -> InputShapeError:
    _, name, rank, bounds, requested = check
    if dim is None:
        fixed = {d: lo for d, lo, hi in bounds if lo == hi}
        captured = "[" + ", ".join(str(fixed[d]) if d in fixed else "*" for d in range(rank)) + "]"
        return InputShapeError(
            f"input {name!r} has {len(shape)} dims (shape {list(shape)}), but the converted module was "
            f"captured for {rank} dims (shape {captured}, * = any size). Fix: pass a tensor with {rank} "
            f"dims, or convert again with an example input of the rank you will use")
    low, high = next((lo, hi) for d, lo, hi in bounds if d == dim)
    given = shape[dim]
    if low == high:
        why = ("torch.export fixed it although it was asked to keep it dynamic (the conversion warned; "
               "see report.fixed_dims)" if dim in requested else
               "the captured graph is specialised to that size there (a feature or channel dim the "
               "model's weights fix, a dim convert(dynamic=True) does not make dynamic: it asks for dims "
               "0 and 1, or a static capture: dynamic=False or a failed dynamic capture)")
        return InputShapeError(
            f"input {name!r} dim {dim} has size {given}, but the converted module was captured with that "
            f"dim fixed to {low}: {why}. Fix: convert again with an example whose dim {dim} has size "
            f"{given}, or make the dim dynamic: convert with dynamic=True, remove what ties it to a constant "
            f"(a shape check such as x.shape[{dim}] == {low}, a fixed-size buffer or position table used "
            f"whole), and use example sizes >= 2")
    limit = f"{low}..{high}" if high != sys.maxsize else f">= {low}"
    example_why = f", e.g. a table of {high} positions sliced to the length" if high != sys.maxsize else ""
    return InputShapeError(
        f"input {name!r} dim {dim} has size {given}, but the converted module accepts sizes {limit} there "
        f"(torch.export bounded the dynamic dim{example_why}). Fix: pass a size in {limit}, or convert a "
        f"model that accepts the size you need")


def _compile_graph(graph: fx.Graph, checks: tuple = (), owner: nn.Module | None = None, mode: str = ""):
    """Python code for ``graph`` (fx codegen), with the input checks first. Each mode's graph flattens its inputs
    and rebuilds its outputs with its own pytree specs (``_geonorm_{in,out}_spec_<mode>`` on ``owner``): a model's
    output structure may depend on the mode (XLNet returns its memory only in eval mode)."""
    check_node = None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    checks = tuple(c for c in checks if c[0] < len(placeholders))
    if checks:  # only while generating code: the stored graph stays the captured program
        with graph.inserting_after(placeholders[-1]):
            check_node = graph.call_function(
                check_input_shapes, (checks, *(placeholders[c[0]] for c in checks)))
    try:
        code = graph.python_code(root_module="self")
    finally:
        if check_node is not None:
            graph.erase_node(check_node)
    info = getattr(graph._codegen, "pytree_info", None)
    if owner is not None and info is not None and mode:
        src = code.src
        for kind, spec in (("in", info.in_spec), ("out", info.out_spec)):
            if spec is not None and f"self._{kind}_spec" in src:
                owner.__dict__[f"_geonorm_{kind}_spec_{mode}"] = spec
                src = src.replace(f"self._{kind}_spec", f"self._geonorm_{kind}_spec_{mode}")
        code.src = src
    filename = f"<geonorm_fx generated forward {next(_counter)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - fx codegen, as GraphModule does
    return namespace["forward"]


def _same_program(owner: nn.Module, a: fx.Graph, b: fx.Graph) -> bool:
    """True when ``a`` and ``b`` (graphs of ``owner``) compute the same thing: the same ops on the same
    targets (or interchangeable modules) with the same arguments (nodes compared by position), and the
    same input/output handling. Then one generated forward serves both."""
    if len(a.nodes) != len(b.nodes) or type(a._codegen) is not type(b._codegen) \
            or getattr(a._codegen, "pytree_info", None) != getattr(b._codegen, "pytree_info", None):
        return False
    position: dict[fx.Node, int] = {}
    for i, (x, y) in enumerate(zip(a.nodes, b.nodes)):
        if x.op != y.op or x.name != y.name \
                or not _same_args((x.args, x.kwargs), (y.args, y.kwargs), position):
            return False
        if x.target is not y.target and x.target != y.target and not (
                x.op == "call_module" and _interchangeable(_lookup(owner, x.target), _lookup(owner, y.target))):
            return False
        position[x] = position[y] = i
    return True


def _interchangeable(a, b) -> bool:
    """Two stateless modules of one class whose attributes are equal, functions compared by their code
    (torch.export gives each capture its own input-guard module, generated from the same guards)."""
    if a is b:
        return True
    if type(a) is not type(b) or not isinstance(a, nn.Module) or any(
            m._parameters or m._buffers or m._modules for m in (a, b)):
        return False
    return _same_state(a, b, ignore=("training",))


def _same_value(a, b, depth: int = 0) -> bool:
    """Equal plain values, functions with equal code whose closures hold equal values, or objects of
    one class whose public attributes are equal in this sense."""
    if a is b:
        return True
    if depth > 4:
        return False
    if callable(a) and callable(b) and hasattr(inspect.unwrap(a), "__code__"):
        a, b = inspect.unwrap(a), inspect.unwrap(b)
        code = getattr(a, "__code__", None)
        if code != getattr(b, "__code__", None):
            return False
        cells_a, cells_b = a.__closure__ or (), b.__closure__ or ()
        return len(cells_a) == len(cells_b) and all(
            _same_value(x.cell_contents, y.cell_contents, depth + 1) for x, y in zip(cells_a, cells_b))
    if not _same_class(type(a), type(b)) or isinstance(a, (torch.Tensor, nn.Module)):
        return False
    if type(a) is type(b) and a == b:
        return True
    return _same_state(a, b, depth + 1)


def _same_class(a: type, b: type) -> bool:
    # a class defined inside a function is a new class object per call (torch's config patches)
    return a is b or (a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__ and "<locals>" in a.__qualname__)


def _same_state(a, b, depth: int = 0, ignore: tuple = ()) -> bool:
    """The public attributes of ``a`` and ``b`` (except ``ignore``) are the same values (:func:`_same_value`)."""
    state_a, state_b = getattr(a, "__dict__", None), getattr(b, "__dict__", None)
    if state_a is None or state_b is None:
        return False
    keys = {k for k in state_a if not k.startswith("_") and k not in ignore}
    return keys == {k for k in state_b if not k.startswith("_") and k not in ignore} and all(
        _same_value(state_a[k], state_b[k], depth) for k in keys)


def _same_args(x, y, position: dict) -> bool:
    if isinstance(x, fx.Node) or isinstance(y, fx.Node):
        return isinstance(x, fx.Node) and isinstance(y, fx.Node) and position.get(x, -1) == position.get(y, -2)
    if isinstance(x, (tuple, list)) or isinstance(y, (tuple, list)):
        return type(x) is type(y) and len(x) == len(y) and all(_same_args(p, q, position) for p, q in zip(x, y))
    if isinstance(x, dict) or isinstance(y, dict):
        return type(x) is type(y) and x.keys() == y.keys() and all(_same_args(x[k], y[k], position) for k in x)
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return x is y
    return type(x) is type(y) and x == y


def _lookup(module: nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _assign(module: nn.Module, target: str, obj) -> None:
    *path, name = target.split(".")
    owner = module
    for part in path:
        nxt = getattr(owner, part, None)
        if nxt is None:
            nxt = nn.Module()
            owner.add_module(part, nxt)
        owner = nxt
    if isinstance(obj, nn.Module):
        owner.add_module(name, obj)
    elif isinstance(obj, nn.Parameter):
        owner.register_parameter(name, obj)
    else:
        setattr(owner, name, obj)


def _guard_error(e: AssertionError) -> InputShapeError:
    """A shape guard of the captured graph (a relation torch.export recorded between sizes, e.g. a sequence
    length bounded by a chunk size) rejected the call's inputs: say so in the package's terms."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else "Guard failed"
    return InputShapeError(
        f"the converted module's capture does not accept these input sizes ({text[:300]}): torch.export tied a "
        "size to the example's (a sequence length bounded by a chunk size or a fixed-size buffer, a batch "
        "specialised to 1). Convert with an example of the sizes you will call it with, or remove what ties them")
