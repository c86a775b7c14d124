"""ONNX export with the torch.onnx dynamo exporter, verified in ONNX Runtime.

``export_onnx`` writes the file (opset :data:`DEFAULT_OPSET` unless told, dynamic batch and sequence
axes, external data for models over :data:`EXTERNAL_DATA_BYTES`), then, with ``verify=True``, runs it in
ONNX Runtime (CUDA execution provider first when ``onnxruntime-gpu`` and a GPU are present, else CPU) on
the example inputs and on inputs with other batch/sequence sizes, and compares with PyTorch.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..capture import dynamic_shapes_for, normalize_inputs, tensor_leaves
from ..errors import GeoNormError, InvalidInputError

#: Opset used when none is given; the dynamo exporter needs 18 or newer.
DEFAULT_OPSET = 18
#: Parameters larger than this go to an external-data file beside the model (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


class VerificationError(GeoNormError):
    """ONNX Runtime's outputs differ from PyTorch's beyond the tolerance (the message names the worst)."""


@dataclass
class OnnxExport:
    """Where the model went and what verification measured."""

    path: str
    opset: int
    size_bytes: int
    providers: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    checked_shapes: list[list[tuple[int, ...]]] = field(default_factory=list)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for comparing outputs of a model computing in ``dtype``."""
    return {torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}.get(dtype, (1e-4, 1e-3))


def default_providers() -> list[str]:
    """CUDA first when ONNX Runtime has it and a GPU is visible, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    out = []
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        out.append("CUDAExecutionProvider")
    return out + ["CPUExecutionProvider"]


def ort_session(path: str, providers: list[str] | None = None, level: str = "all", threads: int = 0):
    """An ONNX Runtime session with graph optimisation ``"all"`` (ORT_ENABLE_ALL) or ``"none"``;
    ``threads`` intra-op threads (0: ONNX Runtime's default, one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=providers or default_providers())


def export_onnx(module: nn.Module, args, path: str, *, kwargs=None, opset: int | None = None, dynamic: bool = True,
                verify: bool = True, providers: list[str] | None = None,
                external_data: bool | None = None) -> OnnxExport:
    """Export ``module`` (in eval mode) to ONNX at ``path`` and, with ``verify``, check it in ONNX Runtime
    against PyTorch at the example shape and one other batch/sequence size; raises
    :class:`VerificationError` naming the worst output and its difference when beyond tolerance.

    Bad input (not a module, ``args`` not a tuple/tensor, ``kwargs`` not a dict, an ``opset`` that is not an
    integer >= 18, a ``path`` that is a directory or in a folder that cannot be created or written) raises
    :class:`InvalidInputError` before anything is exported. The file is written atomically (a failed export
    leaves an earlier file at ``path`` as it was); weights go to ``path + ".data"`` when the parameters and
    buffers exceed :data:`EXTERNAL_DATA_BYTES` (or ``external_data=True``), and a stale ``.data`` file is
    removed otherwise. ``module`` is put back in its training mode and is otherwise left as it was."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise GeoNormError("ONNX export needs the onnx extra: pip install 'geonorm-fx[onnx]' "
                           "(or '[gpu]' for onnxruntime-gpu)") from None
    if not isinstance(module, nn.Module):
        raise InvalidInputError(f"export_onnx needs an nn.Module, got {type(module).__name__}")
    args, kwargs = normalize_inputs(args, kwargs)
    opset = check_opset(opset)
    path = check_output_path(path, "the ONNX file")
    if external_data is None:
        external_data = tensor_bytes(module) > EXTERNAL_DATA_BYTES
    with eval_mode(module), warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        shapes = dynamic_shapes_for(module, args, kwargs) if dynamic else None
        names = output_names(module, args, kwargs)
        try:
            program = torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                        dynamic_shapes=shapes, external_data=external_data, verbose=False,
                                        output_names=names)
        except Exception as e:  # noqa: BLE001 - re-raised with the reason
            raise export_error(f"torch.onnx could not export {type(module).__name__}", e) from e
        size = _save_atomically(program, path, external_data)
    result = OnnxExport(path=path, opset=opset, size_bytes=size)
    if verify:
        verify_onnx(module, args, kwargs, result, providers)
    return result


def check_opset(opset) -> int:
    """``opset`` as an int (:data:`DEFAULT_OPSET` for ``None``); :class:`InvalidInputError` unless it is an
    integer of at least 18 (the dynamo exporter's oldest)."""
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral):
        raise InvalidInputError(f"opset must be an integer of at least 18 (default {DEFAULT_OPSET}), "
                                f"got {opset!r} ({type(opset).__name__})")
    if opset < 18:
        raise InvalidInputError(f"opset {opset} is too old for the dynamo exporter: use 18 or newer")
    return int(opset)


def check_output_path(path, what: str) -> str:
    """``path`` as a string, after making sure a file can be written there: not a directory, its folder
    existing (created when missing) and writable. Raises :class:`InvalidInputError` naming the path (before
    any export work is done)."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise InvalidInputError(f"the path for {what} must be a str or os.PathLike, got "
                                f"{type(path).__name__}") from None
    if not isinstance(path, str) or not path.strip():
        raise InvalidInputError(f"the path for {what} must be a non-empty file path, got {path!r}")
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise InvalidInputError(f"{path} is a directory: give the path of a file for {what} (a name inside "
                                "that folder, for example)")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"cannot create the folder {folder} for {what} at {path} "
                                f"({type(e).__name__}: {e.strerror or e}): choose a path in a folder you can "
                                "create") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidInputError(f"cannot write {what} at {path}: the folder {folder} is not writable; choose "
                                "another path or fix the folder's permissions")
    return path


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``module`` (what the file will hold), each storage counted once
    (tied weights, views)."""
    seen: dict[tuple, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        try:
            storage = t.untyped_storage()
            key = (t.device.type, storage.data_ptr()) if storage.data_ptr() else ("tensor", id(t))
            seen[key] = max(seen.get(key, 0), storage.nbytes())
        except Exception:  # noqa: BLE001 - tensor subclasses without a plain storage: count the elements
            seen[("tensor", id(t))] = t.numel() * t.element_size()
    return sum(seen.values())


def _save_atomically(program, path: str, external_data: bool) -> int:
    """Save ``program`` at ``path`` by writing it in a temporary folder beside it and moving the file (and its
    ``.data`` file, when it has one) into place: a failure leaves an earlier file at ``path`` untouched. A
    ``.data`` file left by an earlier export is removed when this one has none. Returns the bytes written."""
    folder, name = os.path.split(os.path.abspath(path))
    staging = tempfile.mkdtemp(prefix=f".{name}.", dir=folder)
    try:
        staged = os.path.join(staging, name)
        try:
            program.save(staged, external_data=external_data)
        except Exception as e:  # noqa: BLE001 - re-raised with the reason
            raise export_error(f"could not write the ONNX file {path}", e) from e
        size = os.path.getsize(staged)
        data = path + ".data"
        if os.path.exists(staged + ".data"):  # also written without asking for models over 2 GiB
            size += os.path.getsize(staged + ".data")
            os.replace(staged + ".data", data)
        elif os.path.lexists(data):
            os.remove(data)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return size


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def export_error(what: str, e: BaseException) -> GeoNormError:
    """A :class:`GeoNormError` that keeps the cause: the exception's type and message (terminal escape codes
    stripped, up to 40 lines), and the innermost cause's type and message when it is another exception (torch.onnx
    wraps the real failure, e.g. a decomposition error, in its own)."""
    def text(x: BaseException) -> str:
        lines = [line.rstrip() for line in _ANSI.sub("", str(x)).strip().splitlines() if line.strip()]
        body = "\n    ".join(lines[:40]) + ("\n    ..." if len(lines) > 40 else "")
        return f"{type(x).__name__}: {body}" if body else type(x).__name__

    root, seen = e, 0
    while (root.__cause__ is not None or root.__context__ is not None) and seen < 20:
        root = root.__cause__ or root.__context__
        seen += 1
    message = f"{what}: {text(e)}"
    if root is not e and text(root) not in message:
        message += f"\n  caused by {text(root)}"
    return GeoNormError(message)


def output_names(module: nn.Module, args: tuple, kwargs: dict) -> list[str] | None:
    """ONNX output names from the model's output structure: the keys and attribute names on the path to each
    tensor (``logits``, ``last_hidden_state``, ``hidden_states.2``), ``output`` for a lone tensor, ``output_0``,
    ``output_1`` ... for plain tuples. ``None`` (torch.onnx's default names) when the call fails or gives a
    non-tensor leaf the export would drop."""
    try:
        with torch.no_grad(), eval_mode(module):
            out = module(*args, **kwargs)
        leaves = pytree.tree_flatten_with_path(out)[0]
    except Exception:  # noqa: BLE001 - names are a convenience: the export reports real failures
        return None
    if not leaves or not all(isinstance(v, torch.Tensor) for _, v in leaves):
        return None
    if len(leaves) == 1 and not leaves[0][0]:
        return ["output"]
    names = []
    for path, _ in leaves:
        parts = []
        for key in path:
            for attr in ("key", "name", "idx"):
                if hasattr(key, attr):
                    parts.append(str(getattr(key, attr)))
                    break
        name = ".".join(parts)
        names.append(f"output_{name or len(names)}" if not name or name[0].isdigit() else name)
    return names if len(set(names)) == len(names) else None


def verify_onnx(module: nn.Module, args: tuple, kwargs: dict, result: OnnxExport,
                providers: list[str] | None = None, level: str = "all") -> None:
    """Run ``result.path`` in ONNX Runtime at the example shape and at a new batch/sequence size; set
    ``result.max_abs_diff`` / ``providers`` / ``checked_shapes``, or raise :class:`VerificationError`."""
    try:
        session = ort_session(result.path, providers, level)
    except Exception as e:  # noqa: BLE001 - ORT's own errors, re-raised with what to do
        raise _ort_failure(result.path, e) from e
    result.providers = list(session.get_providers())
    cases = [(args, kwargs)]
    other = _other_sizes(session, module, args, kwargs)
    if other is not None:
        cases.append(other)
    worst = 0.0
    for case_args, case_kwargs in cases:
        with torch.no_grad(), eval_mode(module):
            expected = tensor_leaves(module(*case_args, **case_kwargs))
        feeds = _feeds(session, case_args, case_kwargs)
        try:
            got = session.run(None, feeds)
        except Exception as e:  # noqa: BLE001 - ORT's own errors, re-raised with what to do
            raise _ort_failure(result.path, e) from e
        result.checked_shapes.append([tuple(v.shape) for v in feeds.values()])
        if len(got) != len(expected):
            raise VerificationError(f"ONNX Runtime returned {len(got)} outputs, PyTorch {len(expected)}")
        for i, (ref, out) in enumerate(zip(expected, got)):
            diff, bound = diff_and_bound(ref, out, ref.dtype)
            worst = max(worst, diff)
            if not diff <= bound:  # NaN fails too
                name = session.get_outputs()[i].name
                raise VerificationError(
                    f"ONNX Runtime ({result.providers[0]}) disagrees with PyTorch on output {i} ({name!r}) at input "
                    f"shapes {result.checked_shapes[-1]}: max |diff| = {diff:.3g} > {bound:.3g}; the file "
                    f"{result.path} is not a faithful export")
    result.max_abs_diff = worst


def diff_and_bound(ref: torch.Tensor, out, dtype: torch.dtype) -> tuple[float, float]:
    """``(max |ref - out|, allowed)`` for an output computed in ``dtype`` (:func:`tolerance`); ``out`` may be a
    NumPy array (ONNX Runtime) or a tensor. A NaN difference fails ``diff <= allowed``."""
    ref = ref.detach().float().cpu()
    out = (torch.from_numpy(out) if not isinstance(out, torch.Tensor) else out.detach()).float().cpu()
    diff = float((ref - out).abs().max()) if ref.numel() else 0.0
    atol, rtol = tolerance(dtype)
    return diff, atol + rtol * (float(ref.abs().max()) if ref.numel() else 0.0)


def _ort_failure(path: str, e: Exception) -> VerificationError:
    first = str(e).strip().splitlines()[0][:300]
    hint = (" (ONNX Runtime's CPU provider has no bfloat16 kernels for some ops: verify on the CUDA provider, "
            "or export in float16/float32)" if "NOT_IMPLEMENTED" in first else "")
    return VerificationError(f"ONNX Runtime could not load or run {path}: {first}{hint}")


def _feeds(session, args: tuple, kwargs: dict) -> dict:
    tensors = tensor_leaves((args, kwargs))
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise VerificationError(f"the ONNX model takes {len(names)} inputs but the example has {len(tensors)} tensors")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}


def _other_sizes(session, module: nn.Module, args: tuple, kwargs: dict):
    """The example inputs with the symbolic ONNX dims (batch, sequence) grown by 1, 2, ...: all of them
    if PyTorch accepts that, else only the first (batch); None when neither runs."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
    symbols: list[str] = []
    example: dict[str, int] = {}
    for idx, meta in zip(tensors, session.get_inputs()):
        for d, dim in enumerate(meta.shape):
            if isinstance(dim, str) and dim not in example:
                symbols.append(dim)
                example[dim] = int(leaves[idx].shape[d])
    for grown in (symbols, symbols[:1]):
        if not grown:
            return None
        sizes = {sym: example[sym] + (k + 1 if sym in grown else 0) for k, sym in enumerate(symbols)}
        case = pytree.tree_unflatten(_resized(leaves, tensors, session, sizes), spec)
        try:
            with torch.no_grad(), eval_mode(module):
                module(*case[0], **case[1])
            return case
        except Exception:  # noqa: BLE001 - the module does not take these sizes; try fewer
            continue
    return None


def _resized(leaves: list, tensors: list[int], session, sizes: dict) -> list:
    out = list(leaves)
    gen = torch.Generator().manual_seed(0)
    for idx, meta in zip(tensors, session.get_inputs()):
        t = leaves[idx]
        shape = [sizes[dim] if isinstance(dim, str) else int(t.shape[d]) for d, dim in enumerate(meta.shape)]
        if t.dtype == torch.bool:
            out[idx] = torch.ones(shape, dtype=torch.bool)
        elif t.is_floating_point():
            out[idx] = torch.randn(shape, generator=gen).to(t.dtype)
        else:
            high = int(t.max()) + 1 if t.numel() else 2
            out[idx] = torch.randint(0, max(high, 1), shape, generator=gen, dtype=t.dtype)
    return out


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
