"""``gf.install``: the GeoNorm rewrite applied in place, to the user's own model object, through a
torch.compile backend.

The model keeps its class, attributes, methods and call signature. Its ``forward`` becomes a compiled entry
point: Dynamo captures each call (prefill, every decode shape, train and eval, LoRA layers added later) as a
graph, and the backend here re-traces each graph to ATen (``make_fx``, pre-dispatch, under the graph's own
fake mode, so symbolic sizes stay symbolic and module paths stay on the nodes), runs the same detector as
:func:`geonorm_fx.convert` (``passes/``), rewrites the sites and hands the graph to the chosen torch.compile
backend.

Every graph uses the same parameters: the updates are registered on the model, under ``geonorm.``, when
``install`` returns, one per site, keyed by (block path, order of the site in its block), e.g.
``geonorm.model.layers.3.site1``. Their decay constants are fixed at install time from the example call's
graph. A later graph must agree: a site that was not found at install time, a site of another kind, or a block
whose sites are not all in one graph (a graph break inside a block) raises :class:`ConversionError` instead of
running the model with an update silently missing.
"""
from __future__ import annotations

import contextlib
import inspect as pyinspect
import itertools
import math
import re
import types
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .capture import capture_lock, normalize_inputs
from .checkpointing import inline_checkpoints, outline_checkpoints
from .errors import CaptureError, ConversionError, GeoNormError, InvalidInputError
from .geodesic import GeodesicUpdate, check_decays_before_load
from .passes.ops import GraphView
from .passes.rewrite import rewrite_sites
from .passes.sites import Analysis, SiteMatch, analyze
from .schedules import Schedule

PREFIX = "geonorm"
_entry_counter = itertools.count()


@dataclass(frozen=True)
class SiteKey:
    """Where an update lives: the block's module path (relative to the installed model, ``""`` for a model
    without module structure) and the site's order among the sites of that block."""

    path: str
    order: int

    @property
    def attr(self) -> str:
        """The update's module path under ``geonorm.``."""
        return f"{self.path}.site{self.order}" if self.path else f"site{self.order}"


@dataclass
class InstallPlan:
    """What ``install`` found: per key the site's kind (a later graph must agree), and the keys it rewrote
    (those of the requested ``kinds``), which have an update under ``geonorm.``."""

    kinds: dict[SiteKey, str] = field(default_factory=dict)
    rewritten: set = field(default_factory=set)
    backend: object = "inductor"
    fullgraph: bool = True
    prefix: str = PREFIX   # the updates' attribute: ``geonorm`` unless the model has one (then ``geonorm_1``...)


def install(model: nn.Module, args=(), kwargs=None, *, schedule: Schedule = "harmonic",
            clamp: float = math.pi / 4, learnable: bool = True, kinds: Iterable[str] | None = None,
            backend="inductor", fullgraph: bool = True) -> nn.Module:
    """Make ``model`` itself the GeoNorm model, in place, and return it.

    The example call ``model(*args, **kwargs)`` is captured by Dynamo (nothing runs) and analysed by the
    detector of :func:`geonorm_fx.convert`; each site ``i`` of block ``k`` gets a
    ``GeodesicUpdate(decay_k, clamp, learnable)`` registered at ``model.geonorm.<block path>.site<j>``
    (``decay_k`` from ``schedule`` over the blocks of the site's residual stream, GEONORM.md section 3).
    From then on every call of ``model`` runs ``geo(x, s)`` in place of each residual sum ``x + s`` (the
    post norm removed for post/DeepNorm sites): ``model.forward`` is a torch.compile entry point whose
    backend rewrites each graph Dynamo produces and passes it to ``backend`` (``"inductor"``, ``"eager"``
    for no code generation, any registered backend name or a backend callable).

    ``model.geonorm_report`` is the :class:`Report`. ``fullgraph=True``: a graph break is an error (no site
    can be split); with ``fullgraph=False`` a break inside a block, or one that makes blocks frames of their own
    that Dynamo shares between same-class blocks, raises :class:`ConversionError` at the call that produced it.
    """
    from .api import _check_kinds, _check_schedule, _decays, _report

    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"install needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule) or type(model).__name__ == "GeoNormModule":
        raise InvalidInputError(
            f"install works on the model object itself; a {type(model).__name__} is already a captured graph: "
            "use geonorm_fx.convert for it, or install on the original model")
    kind_set = _check_kinds(kinds)
    _check_schedule(schedule)
    if not isinstance(clamp, (int, float)) or isinstance(clamp, bool) or not (0.0 < float(clamp) <= math.pi):
        raise InvalidInputError(f"clamp must be an angle in (0, pi], got {clamp!r}")
    if not isinstance(fullgraph, bool):
        raise InvalidInputError(f"fullgraph must be True or False, got {fullgraph!r}")
    _check_backend(backend)
    target = _installable(model)
    if isinstance(target.__dict__.get("forward"), InstalledForward):
        raise InvalidInputError(
            f"{type(target).__name__} already has GeoNorm installed ({len(target.geonorm_report.sites)} sites): "
            "install once; to change the schedule, install on a fresh copy of the original model")
    if "forward" in target.__dict__:
        raise InvalidInputError(
            f"{type(target).__name__}.forward was replaced on the instance (by accelerate hooks, an earlier "
            "torch.compile or a wrapper): install on a model whose forward is its class's")
    args, kwargs = normalize_inputs(args, kwargs)

    analysis = _discover(target, args, kwargs, fullgraph)
    decays = _decays(schedule, analysis)
    chosen = [i for i, s in enumerate(analysis.sites) if kind_set is None or s.kind in kind_set]
    keys = site_keys(analysis.sites)
    from .api import _free_name

    plan = InstallPlan(backend=backend, fullgraph=fullgraph, prefix=_free_name(target, PREFIX))
    updates = nn.Module()
    device, dtype = _device_dtype(target)
    for key, site in zip(keys, analysis.sites):
        plan.kinds[key] = site.kind
    for i in chosen:
        key, site = keys[i], analysis.sites[i]
        plan.rewritten.add(key)
        update = GeodesicUpdate(decays[i], clamp, learnable, dim=site.dim).to(device)
        if learnable and dtype is not None:  # the model's dtype (FSDP2 shards one dtype per group)
            update.scale.data = update.scale.data.to(dtype)
            update.bias.data = update.bias.data.to(dtype)
        _assign(updates, key.attr, update)
    report = _report(analysis, decays, chosen, schedule, "dynamo", True, kind_set,
                     {i: f"{plan.prefix}.{keys[i].attr}" for i in chosen})
    report.tracer = "dynamo"
    target.add_module(plan.prefix, updates)
    target._register_load_state_dict_pre_hook(check_decays_before_load, with_module=True)
    target.geonorm_report = report
    target.__dict__["forward"] = InstalledForward(target, plan)
    return model


def installed_forward_of(model: nn.Module) -> "InstalledForward | None":
    """The installed entry point of ``model`` (or of the model a PEFT wrapper holds), ``None`` if none."""
    fwd = _installable(model).__dict__.get("forward")
    return fwd if isinstance(fwd, InstalledForward) else None


def site_keys(sites: list[SiteMatch], root: str | None = "", strip: str = "") -> list[SiteKey]:
    """``SiteKey(path, j)`` per site, ``path`` the block path inside the installed model (``root``: where the
    graph's frame ran, see :func:`graph_root`; ``strip``: the attribute a wrapper holds the model under, for
    a graph of a wrapper): ``j`` counts the earlier sites with the same block path."""
    seen: dict[str, int] = {}
    keys = []
    for s in sites:
        path = _join(root, _strip(s.path, strip))
        j = seen.get(path, 0)
        seen[path] = j + 1
        keys.append(SiteKey(path, j))
    return keys


def _strip(path: str, prefix: str) -> str:
    if not prefix:
        return path
    if path == prefix:
        return ""
    return path[len(prefix) + 1:] if path.startswith(prefix + ".") else "?" + path


def _join(root: str | None, path: str) -> str:
    if root is None:
        return "?" + path  # a frame whose place in the model is unknown: matches no installed key
    return ".".join(p for p in (root, path) if p)


class InstalledForward:
    """``model.forward`` after ``install``: calls the model's class ``forward`` through torch.compile with the
    GeoNorm backend. It has the source forward's signature; deep copies and pickles rebuild it for the copy."""

    def __init__(self, module: nn.Module, plan: InstallPlan):
        self.module = module
        self.plan = plan
        self._build()

    def _build(self) -> None:
        original = type(self.module).forward
        self.__signature__ = pyinspect.signature(types.MethodType(original, self.module))
        self.__wrapped__ = types.MethodType(original, self.module)
        self.__doc__ = original.__doc__
        self.__name__ = "forward"
        entry = _fresh_entry(original)
        self._compiled = torch.compile(entry, backend=GeoNormBackend(self), fullgraph=self.plan.fullgraph)

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        with _dynamo_settings():
            try:
                return self._compiled(self.module, *args, **kwargs)
            except GeoNormError:
                raise
            except Exception as e:  # noqa: BLE001 - Dynamo's own errors, said in the package's terms
                raise _dynamo_error(e) from e

    @property
    def __self__(self) -> nn.Module:
        return self.module

    @property
    def __func__(self):
        """A function of ``(module, *args, **kwargs)``, as a bound method has (accelerate re-wraps a model's
        ``forward.__func__`` for mixed precision); it calls this entry point."""
        installed = self

        def forward(module, *args, **kwargs):
            return installed(*args, **kwargs)

        forward.__signature__ = pyinspect.signature(type(self.module).forward)
        return forward

    def __deepcopy__(self, memo):
        import copy

        twin = InstalledForward.__new__(InstalledForward)
        memo[id(self)] = twin
        twin.module = copy.deepcopy(self.module, memo)
        twin.plan = copy.deepcopy(self.plan, memo)
        twin._build()
        return twin

    def __getstate__(self):
        return {"module": self.module, "plan": self.plan}

    def __setstate__(self, state):
        self.module = state["module"]
        self.plan = state["plan"]
        self._build()


class GeoNormBackend:
    """The torch.compile backend of one installed model: re-trace, detect, check against the plan, rewrite,
    hand on to the inner backend."""

    def __init__(self, owner: InstalledForward):
        self.owner = owner

    def __call__(self, gm: fx.GraphModule, example_inputs):
        module = self.owner.module
        plan = self.owner.plan
        aten, state = aten_graph(gm)
        analysis = analyze_with_parameters(aten, set(state))
        root = graph_root(state, example_inputs, module)
        rewritten = apply_plan(aten, analysis.sites, plan, module, root)
        if plan.backend == "eager":
            aten = outline_checkpoints(aten)
        compiled = _inner_backend(plan.backend)(aten, example_inputs)
        if not rewritten or not state or not root:  # the model's own frame: its entry code is this model's alone
            return compiled
        anchor = min(state)
        return _ForItsModule(compiled, anchor, example_inputs[anchor], root)


class _ForItsModule:
    """A rewritten graph bound to the module it was compiled for. Dynamo guards a frame on its modules' types
    and attributes, not their identity: after a graph break, a block's ``forward`` is a frame of its own, and its
    compiled graph would be reused for every other block of the class, with the first block's updates. The call
    checks the identity of one of the graph's parameters (one comparison) and refuses any other module."""

    def __init__(self, compiled, index: int, parameter, root: str | None):
        self.compiled = compiled
        self.index = index
        self.parameter = parameter
        self.root = root
        self.boxed = bool(getattr(compiled, "_boxed_call", False))  # it takes one list of inputs

    def __call__(self, *args):
        if args[self.index] is not self.parameter:
            raise ConversionError(
                f"a graph rewritten with the updates of {self.root or 'the model'!r} is being reused by torch.compile "
                "for another module of the same class (a graph break made each block a frame of its own, and Dynamo "
                "shares one compiled frame between same-class blocks): its updates would be the wrong ones. Remove "
                "the graph break (torch._dynamo.explain shows it) and install with fullgraph=True")
        return self.compiled(list(args)) if self.boxed else self.compiled(*args)


def apply_plan(aten: fx.GraphModule, sites: list[SiteMatch], plan: InstallPlan, module: nn.Module,
               root: str | None, strip: str = "") -> int:
    """Check a graph's sites against the install plan and rewrite the planned ones with the model's own
    updates (``call_module`` to the same objects); return how many were rewritten."""
    keys = site_keys(sites, root, strip)
    _check_against_plan(aten, sites, keys, plan, root, strip)
    updates = getattr(module, plan.prefix)
    chosen, targets = [], []
    for site, key in zip(sites, keys):
        if key in plan.rewritten:
            name = f"_geonorm_{len(chosen)}"
            aten.add_module(name, updates.get_submodule(key.attr))
            chosen.append(site)
            targets.append(name)
    if chosen:
        rewrite_sites(aten, chosen, targets, recompile=True)
    return len(chosen)


def rewrite_with_plan(gm: fx.GraphModule, model: nn.Module, prefix: str = "") -> int:
    """Rewrite a torch.export graph (``ExportedProgram.module()``) of the installed ``model``, or of a wrapper
    holding it at attribute ``prefix``, with the model's updates: the same detector and plan check as the
    install backend (exporters use it to carry an installed model into ONNX)."""
    fwd = installed_forward_of(model)
    if fwd is None:
        raise InvalidInputError(f"{type(model).__name__} has no GeoNorm installed")
    analysis = analyze(GraphView(gm))
    return apply_plan(gm, analysis.sites, fwd.plan, _installable(model), "", prefix)


def aten_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[int, str]]:
    """``gm`` (a Dynamo graph) re-traced to pre-dispatch ATen with ``make_fx`` under the fake mode of its own
    example values (symbolic sizes stay symbolic; ``nn_module_stack`` is kept on every node). Returns the
    graph and, for each placeholder that is a parameter or buffer of a module, its index and its attribute
    path relative to the frame's module (``{3: "layers.0.mlp.weight"}``)."""
    inline_checkpoints(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("example_value") for n in placeholders]
    fake_mode = next((f.fake_mode for f in fakes if isinstance(f, torch._subclasses.FakeTensor)), None)
    from torch.fx import traceback as fx_traceback
    from torch.fx.experimental.proxy_tensor import make_fx

    context = fake_mode if fake_mode is not None else contextlib.nullcontext()
    with capture_lock, context, fx_traceback.preserve_node_meta():
        aten = make_fx(fx.Interpreter(gm).run, pre_dispatch=True, tracing_mode="real")(*fakes)
    state = {}
    for i, node in enumerate(placeholders):
        path = _state_path(node)
        if path is not None:
            state[i] = path
    return aten, state


_SOURCE_PART = re.compile(r"\._(modules|parameters|buffers)\[['\"]?([^'\"\]]+)['\"]?\]")


def _state_path(node: fx.Node) -> str | None:
    """``"layers.0.mlp.weight"`` for a placeholder whose Dynamo source is
    ``L['self']._modules['layers']._modules['0']._modules['mlp']._parameters['weight']``; ``None`` for a
    placeholder that is not a parameter or buffer."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", "")
    name = name() if callable(name) else name
    if not isinstance(name, str) or ("._parameters[" not in name and "._buffers[" not in name):
        return None
    parts = _SOURCE_PART.findall(name)
    if not parts or parts[-1][0] == "modules":
        return None
    return ".".join(p for _kind, p in parts)


def graph_root(state: dict[int, str], example_inputs, module: nn.Module) -> str | None:
    """The path, inside the installed model, of the module a graph's frame ran in: ``""`` for the model's own
    forward, ``"layers.3"`` for a frame Dynamo started inside that layer (after a graph break in a nested
    call). Found by identity of the graph's parameters; ``None`` when the graph reads none of the model's."""
    names: dict[int, list[str]] = {}
    for name, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                   module.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(name)
    for i, rel in state.items():
        for full in names.get(id(example_inputs[i]) if i < len(example_inputs) else -1, ()):
            if full == rel:
                return ""
            if full.endswith("." + rel):
                return full[: -len(rel) - 1]
    return None


def analyze_with_parameters(aten: fx.GraphModule, params: set[int]) -> Analysis:
    """The detector on ``aten`` with the model's parameters and buffers seen as attributes (as in a
    torch.export capture: the soundness rules tell parameters from inputs), then put back as inputs."""
    placeholders = [n for n in aten.graph.nodes if n.op == "placeholder"]
    saved = {}
    for i in params:
        node = placeholders[i]
        saved[node] = node.target
        node.op, node.target = "get_attr", f"_geonorm_state_{i}"
    try:
        return analyze(GraphView(aten))
    finally:
        for node, target in saved.items():
            node.op, node.target = "placeholder", target


def _check_against_plan(aten: fx.GraphModule, sites: list[SiteMatch], keys: list[SiteKey], plan: InstallPlan,
                        root: str | None, strip: str = "") -> None:
    """Every site of the graph was registered at install time, with the same kind; every registered site of a
    block the graph computes any part of is in the graph."""
    found = {}
    for site, key in zip(sites, keys):
        found[key] = site
        if key in plan.kinds and plan.kinds[key] != site.kind:
            raise ConversionError(
                f"the residual site {key.attr} is a {site.kind!r} site in this call's graph but was a "
                f"{plan.kinds[key]!r} site at install time: the model's structure depends on the call "
                "(mode, arguments); install with an example call of the kind you will make")
    unknown = [k for k in found if k not in plan.kinds]
    if unknown:
        names = ", ".join(k.attr for k in unknown[:6])
        raise ConversionError(
            f"this call's graph has residual sites that were not found at install time ({names}): the "
            "model computes other blocks for this call; install with an example call that runs them")
    touched = {_join(root, _strip(p, strip)) for p in _touched_paths(aten)} if root is not None else set()
    missing = [k for k in plan.rewritten if k not in found and k.path in touched]
    if missing:
        names = ", ".join(k.attr for k in missing[:6])
        raise ConversionError(
            f"this call's graph computes part of a block but not its residual site(s) {names}: a graph break "
            "inside the block (or a changed block) would run it without its GeoNorm update. Remove the graph "
            "break (see torch._dynamo.explain), or install with fullgraph=True to have it reported at capture")


def _touched_paths(aten: fx.GraphModule) -> set[str]:
    """Every module path (and its ancestors) that some node of the graph was computed in, relative to the
    graph's frame (``""``: the frame's own module)."""
    view = GraphView(aten)
    paths: set[str] = {""}
    for node in aten.graph.nodes:
        for _key, path, _cls in view.module_stack(node):
            parts = path.split(".")
            for i in range(1, len(parts) + 1):
                paths.add(".".join(parts[:i]))
    return paths


def _discover(model: nn.Module, args: tuple, kwargs: dict, fullgraph: bool) -> Analysis:
    """The analysis of the example call's graph(s). With ``fullgraph=True`` nothing runs: the backend stops
    Dynamo after the one graph. Otherwise the call runs once in eval mode without gradients (every graph of
    the call is seen); the model's mode is restored."""
    analyses: list[Analysis] = []

    class _Seen(Exception):
        pass

    def backend(gm, example_inputs):
        aten, state = aten_graph(gm)
        analysis = analyze_with_parameters(aten, set(state))
        root = graph_root(state, example_inputs, model)
        if root is None and analysis.sites:
            raise CaptureError(
                "a graph of the example call has residual sites but reads none of the model's parameters, so "
                "their place in the model is unknown: install with fullgraph=True")
        for site in analysis.sites:
            site.path = _join(root, site.path)
        analyses.append(analysis)
        if fullgraph:
            raise _Seen()
        return gm.forward

    compiled = torch.compile(_fresh_entry(type(model).forward), backend=backend, fullgraph=fullgraph, dynamic=False)
    training = model.training
    try:
        with capture_lock, _dynamo_settings(), (torch.no_grad() if not fullgraph else contextlib.nullcontext()):
            if not fullgraph:
                model.eval()
            compiled(model, *args, **kwargs)
    except Exception as e:  # noqa: BLE001
        if not _caused_by(e, _Seen):
            if isinstance(e, GeoNormError):
                raise
            raise _dynamo_error(e, at_install=True) from e
    finally:
        model.train(training)
    if not analyses:
        raise CaptureError(f"torch.compile produced no graph for {type(model).__name__} on the example inputs")
    return _merged(analyses)


def _merged(analyses: list[Analysis]) -> Analysis:
    """One analysis over several graphs: each graph's streams are streams of their own."""
    if len(analyses) == 1:
        return analyses[0]
    out = Analysis()
    for a in analyses:
        offset = len(out.blocks_per_stream)
        for s in a.sites:
            s.stream += offset
        out.sites.extend(a.sites)
        out.skipped.extend(a.skipped)
        out.blocks_per_stream.extend(a.blocks_per_stream)
    return out


def _caused_by(e: BaseException, cls: type) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, cls):
            return True
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
        seen += 1
    return False


def _dynamo_error(e: BaseException, at_install: bool = False) -> GeoNormError:
    inner = e
    for _ in range(10):
        if isinstance(inner, GeoNormError):
            return inner
        nxt = getattr(inner, "inner_exception", None) or inner.__cause__
        if nxt is None:
            break
        inner = nxt
    text = str(e).strip().splitlines()
    first = next((line for line in text if line.strip()), type(e).__name__)[:400]
    name = type(e).__name__
    if "graph break" in str(e).lower() or name in ("Unsupported", "UserError"):
        return CaptureError(
            f"torch.compile could not capture the model's forward as one graph ({name}: {first}). With "
            "fullgraph=True a graph break is an error, because a break inside a block would run that block "
            "without its GeoNorm update. Fix the break (torch._dynamo.explain shows where), or install with "
            "fullgraph=False: breaks between blocks are then allowed, and one inside a block is still an error")
    if "recompile" in str(e).lower() and "limit" in str(e).lower():
        return CaptureError(
            f"torch.compile recompiled the installed forward more often than its limit ({name}: {first}); "
            "rather than fall back to the model without GeoNorm, this is an error. Call the model with fewer "
            "distinct input kinds (shapes, dtypes, modes), or raise torch._dynamo.config.recompile_limit")
    where = "capturing the example call" if at_install else "compiling a call of the installed model"
    return CaptureError(f"torch.compile failed {where} ({name}: {first})")


class _DynamoSettings:
    """Around every call of an installed model: recompiling past the limit fails rather than falling back to the
    model without its updates; a log call inside the model (Hugging Face's ``logger.warning_once``) is dropped
    from the graph instead of breaking it; torch's fused inference path of ``nn.TransformerEncoderLayer`` /
    ``MultiheadAttention`` (a whole layer as one native op, in which no residual sum can be rewritten) is off.
    Plain attribute swaps (a ``config.patch`` per call cost ~24 us)."""

    def __init__(self):
        self._loggers = None

    def _values(self, config) -> dict:
        if self._loggers is None:
            import logging

            self._loggers = {getattr(logging.Logger, name) for name in
                             ("debug", "info", "warning", "warn", "warning_once", "info_once", "warning_advice")
                             if hasattr(logging.Logger, name)}
        ignored = config.ignore_logging_functions
        return {"fail_on_recompile_limit_hit": True, "recompile_limit": max(config.recompile_limit, 16),
                "ignore_logging_functions": ignored if self._loggers <= ignored else set(ignored) | self._loggers}

    @contextlib.contextmanager
    def __call__(self):
        import torch._dynamo.config as config

        saved = {}
        fastpath = torch.backends.mha.get_fastpath_enabled()
        try:
            for name, value in self._values(config).items():
                saved[name] = getattr(config, name)
                setattr(config, name, value)
            torch.backends.mha.set_fastpath_enabled(False)
            yield
        finally:
            for name, value in saved.items():
                setattr(config, name, value)
            torch.backends.mha.set_fastpath_enabled(fastpath)


_dynamo_settings = _DynamoSettings()


def _fresh_entry(original):
    """A new function (its own code object, so its own Dynamo cache and recompile count) that calls the
    class's ``forward`` with the module as ``self`` (module paths in the graph are then the model's own)."""
    def geonorm_forward(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    n = next(_entry_counter)
    code = geonorm_forward.__code__.replace(co_name=f"geonorm_forward_{n}",
                                             co_qualname=f"geonorm_forward_{n}")
    return types.FunctionType(code, geonorm_forward.__globals__, f"geonorm_forward_{n}",
                              geonorm_forward.__defaults__, geonorm_forward.__closure__)


def _inner_backend(backend):
    if callable(backend):
        return backend
    if backend == "eager":
        return lambda gm, example_inputs: gm
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
    from torch._dynamo import lookup_backend

    return lookup_backend(backend)


def _check_backend(backend) -> None:
    if callable(backend) or backend in ("eager", "inductor"):
        return
    if not isinstance(backend, str):
        raise InvalidInputError(f"backend must be a torch.compile backend name or callable, got {backend!r}")
    from torch._dynamo import list_backends

    names = set(list_backends(exclude_tags=())) | {"eager", "inductor", "aot_eager"}
    if backend not in names:
        raise InvalidInputError(f"unknown torch.compile backend {backend!r}: use one of {sorted(names)}")


def _installable(model: nn.Module) -> nn.Module:
    """The module whose forward runs the model: a PEFT wrapper delegates to the model it holds."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft."):
        base = get_base()
        if isinstance(base, nn.Module):
            return base
    return model


def _device_dtype(model: nn.Module):
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else None)
    for b in model.buffers():
        return b.device, None
    return torch.device("cpu"), None


def _assign(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, name = path.split(".")
    owner = root
    for part in parents:
        nxt = owner._modules.get(part)
        if nxt is None:
            nxt = nn.Module()
            owner.add_module(part, nxt)
        owner = nxt
    owner.add_module(name, module)


def load_updates(model: nn.Module, source) -> list[str]:
    """Load the ``geonorm.*`` tensors saved with an installed model into ``model`` (installed with the same
    schedule) and return their names. ``source``: a ``save_pretrained`` directory (its ``*.safetensors``, or
    ``*.bin`` read with ``weights_only=True``), one such file, or a ``state_dict``.

    This is the second half of reloading: ``from_pretrained`` restores the source weights and ignores the
    updates, ``install`` registers fresh ones, and this loads their trained values. The saved and installed
    update names must be the same set, and every decay constant must match (:class:`ScheduleError`
    otherwise); nothing is loaded unless all of it can be.

    ``source`` may also be a module from :func:`geonorm_fx.convert` (or another installed copy) of the same
    model: its updates are matched to the installed ones site by site (both reports list the sites in graph
    order; kinds, blocks, streams and paths must agree), so a model trained as a converted module can be served
    through the installed road (``generate``, the cached ONNX decoder)."""
    target = _installable(model)
    if installed_forward_of(target) is None:
        raise InvalidInputError("load_updates needs a model that gf.install has changed: install it first, "
                                "with the schedule the updates were trained with")
    if isinstance(source, nn.Module) and hasattr(_installable(source), "geonorm_report"):
        state = _from_converted(_installable(source), target)
    else:
        state = _read_state(source)
    prefix = installed_forward_of(target).plan.prefix + "."
    saved = {k: v for k, v in state.items() if k.startswith(prefix)}
    mine = {k for k in target.state_dict() if k.startswith(prefix)}
    if set(saved) != mine:
        extra, missing = sorted(set(saved) - mine), sorted(mine - set(saved))
        raise ConversionError(
            f"the saved updates do not fit this model's: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(extra)} unexpected (e.g. {extra[:3]}). Install with the same model, example call and kinds "
            "as the model that was saved")
    result = target.load_state_dict(saved, strict=False)
    assert not result.unexpected_keys
    return sorted(saved)


def _from_converted(converted: nn.Module, target: nn.Module) -> dict:
    """The converted module's update tensors under the installed model's names, site by site."""
    mine, theirs = target.geonorm_report.sites, converted.geonorm_report.sites
    describe = [(s.kind, s.block, s.stream, s.path) for s in mine]
    if describe != [(s.kind, s.block, s.stream, s.path) for s in theirs]:
        raise ConversionError(
            f"the converted module's sites ({len(theirs)}) are not the installed model's ({len(mine)}) site for "
            "site (kind, block, stream, path): convert and install the same model with the same kinds")
    state = converted.state_dict()
    out = {}
    for a, b in zip(mine, theirs):
        for name in ("scale", "bias", "decay_constant"):
            key = f"{b.update}.{name}"
            if key in state:
                out[f"{a.update}.{name}"] = state[key]
    return out


def _read_state(source) -> dict:
    import os
    from collections.abc import Mapping

    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidInputError(f"source must be a directory, a file or a state_dict, got {type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        files = files or sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".bin"))
        if not files:
            raise InvalidInputError(f"{path} holds no *.safetensors or *.bin file to load updates from")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise InvalidInputError(f"{path} does not exist")
    state: dict = {}
    for f in files:
        try:
            if f.endswith(".safetensors"):
                from safetensors.torch import load_file

                state.update(load_file(f))
            else:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem to the user
            raise InvalidInputError(f"could not read {f} ({type(e).__name__}: {str(e)[:200]})") from e
    return state
