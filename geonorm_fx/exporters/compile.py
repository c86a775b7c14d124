"""torch.compile hand-off and an ahead-of-time (AOTInductor) package for deployment."""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from ..capture import dynamic_shapes_for, normalize_inputs
from ..errors import GeoNormError, InvalidInputError
from .onnx import check_output_path


def compile_model(module: nn.Module, **torch_compile_kwargs):
    """``torch.compile(module, **torch_compile_kwargs)``: same call signature as ``module``; works under
    ``no_grad`` and for training (backward through the compiled module)."""
    if not isinstance(module, nn.Module):
        raise InvalidInputError(f"compile_model needs an nn.Module, got {type(module).__name__}")
    return torch.compile(module, **torch_compile_kwargs)


#: a launch of an Inductor-generated kernel in its output code: C++ (CPU) or Triton (GPU)
_LAUNCH = re.compile(r"^\s+(?:cpp_fused_\w+\(|triton_\w+\.run\()", re.MULTILINE)


def kernel_launches(module: nn.Module, args, kwargs=None) -> int:
    """Number of generated kernels one ``no_grad`` call of ``torch.compile(module)`` launches (library
    calls such as matmuls are not counted). Compiles ``module`` afresh; raises :class:`GeoNormError` when
    Dynamo splits the module into several graphs, since a count over split graphs says nothing about fusion.
    """
    from torch._inductor.utils import run_and_get_code

    args, kwargs = normalize_inputs(args, kwargs)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(*args, **kwargs)
    if explained.graph_break_count:
        reasons = "; ".join(r.reason.strip().splitlines()[0] for r in explained.break_reasons[:3])
        raise GeoNormError(f"torch.compile splits {type(module).__name__} into {explained.graph_count} graphs "
                           f"({reasons}); fix the graph breaks before counting kernels")
    torch._dynamo.reset()
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(module), *args, **kwargs)
    return len(_LAUNCH.findall("\n".join(code)))


def export_aot(module: nn.Module, args, path: str, *, kwargs=None, dynamic: bool = True) -> str:
    """Write an AOTInductor ``.pt2`` package of ``module`` (eval mode) with
    ``torch._inductor.aoti_compile_and_package``; :func:`load_aot` runs it without the model's class.

    Bad input (not a module, ``args`` / ``kwargs`` of the wrong kind, a ``path`` not ending in ``.pt2``, a
    directory, or in a folder that cannot be created or written) raises :class:`InvalidInputError` before
    anything is compiled; ``module`` is put back in its training mode."""
    if not isinstance(module, nn.Module):
        raise InvalidInputError(f"export_aot needs an nn.Module, got {type(module).__name__}")
    args, kwargs = normalize_inputs(args, kwargs)
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).endswith(".pt2"):
        raise InvalidInputError(f"AOT packages end in .pt2, got {path!r}")
    path = check_output_path(path, "the AOT package")
    was_training = module.training
    module.eval()
    try:
        shapes = dynamic_shapes_for(module, args, kwargs) if dynamic else None
        program = torch.export.export(module, args, kwargs, dynamic_shapes=shapes, strict=False)
        return torch._inductor.aoti_compile_and_package(program, package_path=path)
    except Exception as e:  # noqa: BLE001 - re-raised with the reason
        from .onnx import export_error

        raise export_error(f"AOTInductor could not package {type(module).__name__}", e) from e
    finally:
        module.train(was_training)


def load_aot(path: str):
    """Load a package written by :func:`export_aot`; call it like the module (``fn(*args, **kwargs)``).

    An AOTInductor package holds native code that runs in this process when loaded: load only packages you
    trust (ones you built, or from a source you would run a program from).

    Raises :class:`GeoNormError` naming the path and what to do when there is no file there, it is a
    directory, empty, or not a package this PyTorch can load (corrupt, truncated, or built by another
    version or for another device)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"load_aot needs the path of a .pt2 package, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise GeoNormError(f"{path} is a directory, not an AOT package: give the .pt2 file export_aot wrote")
    if not os.path.exists(path):
        raise GeoNormError(f"no AOT package at {path}: check the path, or write one with export_aot")
    if os.path.getsize(path) == 0:
        raise GeoNormError(f"the AOT package {path} is empty (an interrupted write?): write it again with "
                           "export_aot")
    try:
        return torch._inductor.aoti_load_package(path)
    except Exception as e:  # noqa: BLE001 - torch's own errors, re-raised with what to do
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise GeoNormError(
            f"could not load the AOT package {path} ({type(e).__name__}: {first}): it is corrupt, truncated, "
            "or not an AOTInductor package for this PyTorch version and device; write it again with "
            "export_aot") from e
