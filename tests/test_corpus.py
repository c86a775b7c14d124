"""The adversarial corpus (tests/corpus): for every case, convert once with the harmonic schedule and check

- the sites ``[(kind, stream, block)]`` in stream order (and their norm kinds and decays ``1/(k+1)``);
- the norms that must be left untouched: listed in ``report.skipped`` under their path, never a site's
  norm, their weights still in the converted ``state_dict`` and unchanged;
- ``module.training == model.training`` and the source model is not mutated;
- the converted output against the case's own float64 GeoNorm reference at two input shapes (or, when
  nothing is rewritten, against the source model's output);
- for the shape cases, that ``report.dynamic`` tells the truth and a wrong size raises a GeoNormError
  naming the dim.

All failures of one case are collected and reported together. The expected answers come from
GEONORM.md (see each case's docstring), not from what the detector does today.
"""
from __future__ import annotations

import copy
import math
import re
from collections import Counter

import pytest
import torch
from torch.utils import _pytree as pytree

import geonorm_fx as gf

from .corpus import CASES, Case

SEED = 4321


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: intra-op threads only add contention (on a shared 2-core machine they made the
    forward passes 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _double(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _names_dim(msg: str, dim: int) -> bool:
    words = {0: "batch", 1: "seq"}
    return bool(re.search(rf"(dim\w*|shape|size|axis)\W{{0,4}}{dim}\b", msg, re.I)) or words[dim] in msg.lower()


def _compare(out, ref, case: Case, exact: bool) -> str | None:
    """None when ``out`` matches ``ref`` (same structure and shapes, values within tolerance)."""
    lo, so = pytree.tree_flatten(out)
    lr, sr = pytree.tree_flatten(ref)
    if len(lo) != len(lr) or so != sr:
        return f"output structure {so} != expected {sr}"
    for i, (o, r) in enumerate(zip(lo, lr)):
        if not isinstance(r, torch.Tensor):
            continue
        if not isinstance(o, torch.Tensor) or o.shape != r.shape:
            return f"output {i}: shape {getattr(o, 'shape', type(o))} != expected {tuple(r.shape)}"
        od, rd = o.detach().double(), r.detach().double()
        if not torch.isfinite(od).all():
            return f"output {i}: non-finite values"
        err = (od - rd).abs().max().item()
        scale = rd.abs().max().item()
        if exact:  # nothing rewritten: the source's float32 output
            tol = 1e-5 * (1 + scale) if case.rel_tol is None else case.rel_tol * max(scale, 1e-6)
            if err > tol:
                return f"output {i} differs from the source model's (nothing should be rewritten): max err {err:.3g}"
        elif case.rel_tol is not None:
            if err > case.rel_tol * max(scale, 1e-6):
                return f"output {i}: relative max err {err / max(scale, 1e-12):.3g} > {case.rel_tol}"
        else:
            try:
                torch.testing.assert_close(od, rd, rtol=1e-4, atol=1e-4)
            except AssertionError:
                return f"output {i} differs from the float64 GeoNorm reference: max abs err {err:.3g} (scale {scale:.3g})"
    return None


def _kept_params(k, src_sd) -> list[str]:
    if k.params is not None:
        return list(k.params)
    return [key for key in src_sd if key.startswith(k.path + ".")]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus(case: Case):
    errors: list[str] = []
    model = case.build()
    inputs = case.inputs()
    src_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    m64 = copy.deepcopy(model).double()

    try:
        module = gf.convert(model, _clone(inputs[0]), schedule="harmonic", tracer=case.tracer)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"convert raised {_first_line(e)}")
    report = module.geonorm_report

    # -- sites
    got = [(s.kind, s.stream, s.block) for s in report.sites]
    accepted = [(case.sites, case.ref)] + [(list(a[0]), a[1]) if isinstance(a, tuple) else (list(a), case.ref)
                                           for a in case.alt_sites]
    ref_fn = case.ref
    matched = [r for sites, r in accepted if sites == got]
    if matched:
        rewritten, ref_fn = bool(got), matched[0]
    elif case.abstain and got == []:
        rewritten = False
    else:
        rewritten = bool(case.sites)
        alts = "".join(f" or {sites}" for sites, _ in accepted[1:])
        errors.append(f"sites: expected {case.sites}{alts}{' (or none: abstain allowed)' if case.abstain else ''}, "
                      f"got {got}")
    if case.norms is not None and matched and rewritten:
        norms = [s.norm for s in report.sites]
        if norms != case.norms:
            errors.append(f"site norm kinds: expected {case.norms}, got {norms}")
    for s in report.sites:
        if not math.isclose(s.decay, 1.0 / (s.block + 1), rel_tol=1e-9):
            errors.append(f"site {s.node}: decay {s.decay} != 1/(block+1) for block {s.block}")

    # -- norms left untouched
    out_sd = module.state_dict()
    kept = list(case.kept) + ([] if rewritten else list(case.abstain_kept))
    skipped = Counter(s.path for s in report.skipped)
    need = Counter(k.path for k in kept if k.listed)
    for path, n in need.items():
        if skipped[path] < n:
            errors.append(f"norm at {path!r} not listed in report.skipped "
                          f"(skipped paths: {sorted(set(s.path for s in report.skipped))})")
    for k in kept:
        for key in _kept_params(k, src_sd):
            if key not in out_sd:
                errors.append(f"kept parameter {key!r} removed from the converted state_dict")
            elif not torch.equal(out_sd[key].detach().cpu(), src_sd[key]):
                errors.append(f"kept parameter {key!r} changed")
        if k.listed and k.path:
            used = [s.node for s in report.sites if getattr(s, "norm_path", "") == k.path]
            if used:
                errors.append(f"norm {k.path!r} must not be a site's norm (sites {used})")

    # -- modes, source untouched
    if module.training != model.training:
        errors.append(f"module.training is {module.training}, the source model's is {model.training}")
        module.train(model.training)
    for key, value in model.state_dict().items():
        if not torch.equal(value, src_sd[key]):
            errors.append(f"the source model's {key!r} was mutated by convert")

    # -- outputs
    def run(fn, args):
        if case.seed_calls:
            torch.manual_seed(SEED)
        with torch.no_grad():
            return fn(args)

    def expected(args):
        if rewritten:
            return run(lambda a: ref_fn(m64, *_double(a)), args)
        return run(lambda a: model(*_clone(a)), args)

    def check_outputs(label):
        for i, args in enumerate(inputs):
            try:
                out = run(lambda a: module(*_clone(a)), args)
            except Exception as e:  # noqa: BLE001
                if i > 0 and case.tracer == "fx" and not report.dynamic and isinstance(e, gf.GeoNormError):
                    continue  # a static fx capture may refuse other sizes, if it says so
                errors.append(f"{label}shape {i} {tuple(args[0].shape)}: the converted module raised {_first_line(e)}")
                continue
            msg = _compare(out, expected(args), case, exact=not rewritten)
            if msg:
                errors.append(f"{label}shape {i} {tuple(args[0].shape)}: {msg}")

    if not case.train or case.train_outputs:
        check_outputs("")
    if case.train:  # also in eval mode after .eval()
        module.eval()
        model.eval()
        m64.eval()
        check_outputs("after .eval(): ")

    # -- dynamic shapes tell the truth
    if case.dynamic:
        for args, dim in case.dynamic.get("maybe", []):
            try:
                out = run(lambda a: module(*_clone(a)), args)
            except gf.GeoNormError as e:
                if not _names_dim(str(e), dim):
                    errors.append(f"GeoNormError at {tuple(args[0].shape)} does not name dim {dim}: {_first_line(e)}")
                if report.dynamic:
                    errors.append(f"report.dynamic is True but the module refuses {tuple(args[0].shape)}")
                continue
            except Exception as e:  # noqa: BLE001
                errors.append(f"at {tuple(args[0].shape)} the module raised {_first_line(e)} (not a GeoNormError)")
                continue
            msg = _compare(out, expected(args), case, exact=not rewritten)
            if msg:
                errors.append(f"at {tuple(args[0].shape)}: {msg}")
        bad = case.dynamic.get("bad", [])
        if bad and report.dynamic:
            errors.append("report.dynamic is True but the capture fixed a size (the model only runs at one length)")
        for args, dim in bad:
            try:
                run(lambda a: module(*_clone(a)), args)
                errors.append(f"calling at {tuple(args[0].shape)} did not raise")
            except gf.GeoNormError as e:
                if not _names_dim(str(e), dim):
                    errors.append(f"GeoNormError at {tuple(args[0].shape)} does not name dim {dim}: {_first_line(e)}")
            except Exception as e:  # noqa: BLE001
                errors.append(f"calling at {tuple(args[0].shape)} raised {_first_line(e)}, not a GeoNormError")

    assert not errors, f"[{case.id}] {case.doc.splitlines()[0] if case.doc else ''}\n  " + "\n  ".join(errors)


def test_corpus_is_well_formed():
    """At least 64 distinct cases, each with a docstring (the rule it pins), a reason for every kept norm,
    a reference whenever something must be rewritten, and two example shapes that differ in batch and
    sequence size (all sizes >= 2), except the shape cases of class 8."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    assert len(CASES) >= 64
    for c in CASES:
        assert c.doc, c.id
        assert all(k.why for k in c.kept + c.abstain_kept), c.id
        assert c.ref is not None or not c.sites, c.id
        if c.dynamic:
            continue
        first, second = (args[0].shape for args in c.inputs())
        assert first[0] != second[0] and first[1] != second[1], (c.id, first, second)
        assert min(first[:2]) >= 2 and min(second[:2]) >= 2, (c.id, first, second)
