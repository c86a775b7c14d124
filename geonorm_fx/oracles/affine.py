"""An affine-free, tiny-eps copy of a model, made from its module tree (never from the detector).

The identities of GEONORM.md section 6 are exact for norms without affine and with ``eps -> 0``.
:func:`affine_free_copy` deep-copies the model and, module by module:

- ``nn.LayerNorm`` / ``nn.RMSNorm`` (and subclasses): weight 1, bias 0, ``eps`` 1e-12;
- any other module whose class name contains ``"Norm"`` (not Batch/Group/Instance norms) that has a
  1-D ``weight`` (or ``gamma``): its float eps-like attributes (``eps``, ``epsilon``,
  ``variance_epsilon``, ...) become 1e-12, its ``bias`` (or ``beta``) 0, and its weight 1 or 0,
  whichever makes the module compute an affine-free RMSNorm or LayerNorm on a random input (0 for a
  ``(1 + w)`` gain such as Gemma's), checked against a reference computed here; a module that matches
  neither is restored as it was and listed in ``unrecognised``;
- the same without the weight for a parameter-free ``*Norm`` module with an eps attribute.

Functional norms called with literal arguments and no module of their own (``F.layer_norm(x, shape)``
in some forward) keep their affine and their default eps: the identities then hold only up to
``eps / mean(x**2)``, which is far below the tolerance for streams of unit scale.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

TINY_EPS = 1e-12
EPS_ATTRS = ("eps", "epsilon", "variance_epsilon", "variance_eps", "layer_norm_eps", "norm_eps")
WEIGHT_ATTRS = ("weight", "gamma")
BIAS_ATTRS = ("bias", "beta")
_NOT_FEATURE_NORMS = ("Batch", "Group", "Instance", "LocalResponse")


@dataclass
class AffineFree:
    """What :func:`affine_free_copy` did: ``model`` is the copy; ``changed`` the paths of the norm
    modules made affine-free; ``unrecognised`` the ``*Norm`` modules left as they were, with why."""

    model: nn.Module
    changed: list[str] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)


def affine_free_copy(model: nn.Module) -> AffineFree:
    """A deep copy of ``model`` in eval mode whose feature norms have no affine and eps 1e-12."""
    work = copy.deepcopy(model).eval()
    out = AffineFree(work)
    with torch.no_grad():
        for path, module in work.named_modules():
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                _free_builtin(module)
                out.changed.append(path)
            elif _looks_like_feature_norm(module):
                why = _free_generic(module)
                (out.unrecognised.append(f"{path or '<root>'}: {why}") if why else out.changed.append(path))
    return out


def _looks_like_feature_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Norm" in name and not any(k in name for k in _NOT_FEATURE_NORMS)


def _free_builtin(module: nn.Module) -> None:
    if getattr(module, "weight", None) is not None:
        module.weight.fill_(1.0)
    if getattr(module, "bias", None) is not None:
        module.bias.zero_()
    module.eps = TINY_EPS


def _own_tensor(module: nn.Module, names) -> torch.Tensor | None:
    for name in names:
        t = module._parameters.get(name)
        if t is None:
            t = module._buffers.get(name)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    return None


def _free_generic(module: nn.Module) -> str:
    """Make one ``*Norm`` module affine-free; return ``""`` on success, else why it was left alone."""
    eps_saved = {a: getattr(module, a) for a in EPS_ATTRS
                 if isinstance(getattr(module, a, None), float) and not isinstance(getattr(module, a), bool)}
    weight, bias = _own_tensor(module, WEIGHT_ATTRS), _own_tensor(module, BIAS_ATTRS)
    if weight is None:
        if not eps_saved:
            return ""  # a wrapper such as x-transformers' PreNorm: nothing of its own to change
        for a in eps_saved:
            setattr(module, a, TINY_EPS)
        return ""
    if weight.dim() != 1:
        return f"weight of shape {tuple(weight.shape)} is not one gain per feature"
    saved_w, saved_b = weight.clone(), None if bias is None else bias.clone()
    for a in eps_saved:
        setattr(module, a, TINY_EPS)
    if bias is not None:
        bias.zero_()
    for fill in (1.0, 0.0):
        weight.fill_(fill)
        if _computes_plain_norm(module, weight):
            return ""
    weight.copy_(saved_w)
    if bias is not None:
        bias.copy_(saved_b)
    for a, v in eps_saved.items():
        setattr(module, a, v)
    return "computes neither an RMSNorm nor a LayerNorm with its gain at 1 or 0; left as it is"


def _computes_plain_norm(module: nn.Module, weight: torch.Tensor) -> bool:
    """Run the module on a random input (last-dim and channels-first layouts) and compare with an
    affine-free RMSNorm and LayerNorm computed here."""
    d = weight.numel()
    g = torch.Generator().manual_seed(1234)
    for shape, dim in (((2, 3, d), -1), ((2, d, 3, 3), 1)):
        x = (3.0 * torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5)
        x = x.to(device=weight.device, dtype=weight.dtype)
        try:
            y = module(x)
        except Exception:  # noqa: BLE001 - a module that cannot run on one tensor is not a plain norm
            continue
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            continue
        xf, yf = x.double(), y.double()
        rms = xf * torch.rsqrt(xf.pow(2).mean(dim, keepdim=True))
        centred = xf - xf.mean(dim, keepdim=True)
        ln = centred * torch.rsqrt(centred.pow(2).mean(dim, keepdim=True))
        tol = 1e-3 if weight.dtype in (torch.float32, torch.float64) else 3e-2
        for ref in (rms, ln):
            if float((yf - ref).abs().max()) <= tol * float(ref.abs().max()):
                return True
    return False


_EPS_POSITION = {torch.ops.aten.layer_norm.default: 4, torch.ops.aten.native_layer_norm.default: 4,
                 torch.ops.aten.rms_norm.default: 3, torch.ops.aten.group_norm.default: 4}


def tiny_eps_graph(gm, eps: float = TINY_EPS):
    """Set the eps argument of every whole-op layer/RMS norm call in a captured aten graph to ``eps``: norms
    whose eps is a literal in the model's code (``F.layer_norm(x, shape, eps=1e-5)``, OLMo's parameter-free
    LayerNorm) cannot be reached through the module tree. Returns ``gm``, recompiled."""
    changed = False
    for node in gm.graph.nodes:
        pos = _EPS_POSITION.get(node.target) if node.op == "call_function" else None
        if pos is not None and len(node.args) > pos and isinstance(node.args[pos], float):
            node.update_arg(pos, eps)
            changed = True
    if changed:
        gm.recompile()
    return gm
