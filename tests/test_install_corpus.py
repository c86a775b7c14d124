"""The adversarial corpus through ``gf.install``: the same detector serves ``convert`` and ``install``, so every
case must give the same sites (kind, stream, block, module path) and the same outputs at both of its input
shapes. ``convert`` is checked against each case's float64 reference in ``test_corpus.py``; here ``install``
is checked against ``convert``. Cases whose source model ``install`` cannot run (an ``fx``-only tracer case, a
shape-fixing case) are left to ``test_corpus.py``; each such case says why below."""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch.utils import _pytree as pytree

import geonorm_fx as gf

from .corpus import CASES
from .test_corpus import _clone, _one_thread  # noqa: F401 - the module's one-thread fixture, the input copy
from .install_models import perturb_updates

# every other case in `make test`; GEONORM_FULL_CORPUS=1 runs all of them (see the README's install section)
SAMPLE = CASES if os.environ.get("GEONORM_FULL_CORPUS") == "1" else CASES[::2]
# cases install must refuse (convert, capturing with torch.export, rewrites them): always run
REFUSED = {"graph-break-between-blocks"}
SAMPLE = SAMPLE + [c for c in CASES if c.id in REFUSED and c not in SAMPLE]


def _sites(report):
    return [(s.kind, s.stream, s.block, s.path) for s in report.sites]


@pytest.mark.parametrize("case", SAMPLE, ids=[c.id for c in SAMPLE])
def test_install_agrees_with_convert(case):
    if getattr(case, "tracer", "auto") == "fx":
        pytest.skip("an fx-traced case: its model is not torch.export/Dynamo-capturable as written")
    inputs = case.inputs()
    model = case.build()
    if case.id in REFUSED:  # a graph break: an error at install (fullgraph) or at the call, never a wrong update
        with pytest.raises(gf.CaptureError, match="graph break"):
            gf.install(case.build(), _clone(inputs[0]), backend="eager")
        gf.install(model, _clone(inputs[0]), backend="eager", fullgraph=False)
        with pytest.raises(gf.ConversionError, match="another module of the same class"), torch.no_grad():
            model(*_clone(inputs[0]))
        return
    source = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = gf.convert(copy.deepcopy(model), _clone(inputs[0]))
    gf.install(model, _clone(inputs[0]), backend="eager")
    assert _sites(model.geonorm_report) == _sites(converted.geonorm_report)
    perturb_updates(model)
    state = model.state_dict()
    mapped = {f"{b.update}.{name}": state[f"{a.update}.{name}"]
              for a, b in zip(model.geonorm_report.sites, converted.geonorm_report.sites)
              for name in ("scale", "bias")}
    converted.load_state_dict(mapped, strict=False)
    for args in inputs[: 1 if converted.geonorm_report.fixed_dims else 2]:
        with torch.no_grad():  # train-mode cases draw random masks: the same seed, the same masks
            torch.manual_seed(7)
            got = model(*_clone(args))
            torch.manual_seed(7)
            want = converted(*_clone(args))
        for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(want)):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if model.geonorm_report.sites:
        with torch.no_grad():
            outs = [x for x in pytree.tree_leaves(source(*_clone(inputs[0]))) if isinstance(x, torch.Tensor)]
            mine = [x for x in pytree.tree_leaves(model(*_clone(inputs[0]))) if isinstance(x, torch.Tensor)]
        assert any((a.float() - b.float()).abs().max() > 1e-4 for a, b in zip(outs, mine))
