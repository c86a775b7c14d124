"""``geonorm-fx inspect|convert|demo``: the pass from the command line. Exit 0 on success, 2 on bad
input (one line on stderr)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

import torch

from . import zoo
from .api import convert, inspect
from .capture import tensor_leaves
from .errors import GeoNormError
from .geodesic import GeodesicUpdate, record_norm_changes
from .schedules import SCHEDULE_NAMES
from .visualize import render_svg, write_dot


def _schedule(text: str):
    if text in SCHEDULE_NAMES:
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a schedule: use {', '.join(SCHEDULE_NAMES)} or comma-separated floats") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geonorm-fx", description="Rewrite residual + norm sites into GeoNorm "
                                "geodesic updates (arXiv 2601.22095).")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("spec", help="hf:<gpt2|bert|llama|vit|t5>, torch:<encoder-pre|encoder-post>, "
                        "a Hugging Face config dir/config.json, or package.module:factory")
    common.add_argument("--json", action="store_true", help="print the report as JSON")
    common.add_argument("--tracer", choices=("auto", "export", "fx"), default="auto")
    common.add_argument("--static", action="store_true", help="capture with static shapes")
    common.add_argument("--schedule", type=_schedule, default="harmonic",
                        help="harmonic|sqrt|linear|none or comma-separated per-block decays")
    common.add_argument("--dot", metavar="FILE", help="write the residual stream with its sites as Graphviz DOT")
    common.add_argument("--svg", metavar="FILE", help="also render the DOT picture to SVG (needs Graphviz dot)")
    sub.add_parser("inspect", parents=[common], help="list the residual sites and skipped norms")
    conv = sub.add_parser("convert", parents=[common], help="convert and check the converted model runs")
    conv.add_argument("--clamp", type=float, default=math.pi / 4, help="maximum angle per update (radians)")
    conv.add_argument("--kinds", nargs="+", default=None, help="rewrite only these site kinds")
    conv.add_argument("--onnx", metavar="OUT.onnx", help="export to ONNX and verify it in ONNX Runtime")
    conv.add_argument("--aot", metavar="OUT.pt2", help="write an AOTInductor package and check it against PyTorch")
    sub.add_parser("demo", help="inspect and convert a built-in model, check the invariant, show the result")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        if args.command == "demo":
            return _demo()
        built = zoo.load(args.spec)
        if args.command == "inspect":
            report = inspect(built.model, built.args, built.kwargs, dynamic=not args.static,
                             tracer=args.tracer, schedule=args.schedule)
            print(report.to_json(indent=2) if args.json else f"{built.name}: {report}")
            _picture(args, report)
            return 0
        module = convert(built.model, built.args, built.kwargs, schedule=args.schedule, clamp=args.clamp,
                         kinds=args.kinds, dynamic=not args.static, tracer=args.tracer)
        check = _check_invariant(module, built.args, built.kwargs)
        deployed = _deploy(args, module, built)
        if args.json:
            print(json.dumps({"report": module.geonorm_report.to_dict(), "check": check, **deployed}, indent=2))
        else:
            print(f"{built.name}: {module.geonorm_report}")
            print(_describe_check(check))
            for line in deployed.values():
                print(line["summary"])
        _picture(args, module.geonorm_report)
        return 0
    except GeoNormError as e:
        print(f"geonorm-fx: error: {e}".splitlines()[0], file=sys.stderr)
        return 2


def _deploy(args, module, built) -> dict:
    """``--onnx`` / ``--aot``: write the file, verify it against PyTorch, describe it."""
    out = {}
    if args.onnx:
        from .exporters import export_onnx
        r = export_onnx(module, built.args, args.onnx, kwargs=built.kwargs)
        out["onnx"] = {"path": r.path, "size_bytes": r.size_bytes, "providers": r.providers, "opset": r.opset,
                       "max_abs_diff": r.max_abs_diff, "checked_shapes": r.checked_shapes,
                       "summary": f"wrote {r.path} ({r.size_bytes / 1024:.0f} KiB, opset {r.opset}); ONNX Runtime "
                                  f"{', '.join(r.providers)}: max |diff| vs PyTorch {r.max_abs_diff:.2e} at input "
                                  f"shapes {r.checked_shapes}"}
    if args.aot:
        from .exporters import export_aot, load_aot
        path = export_aot(module, built.args, args.aot, kwargs=built.kwargs)
        runner = load_aot(path)
        module.eval()
        with torch.no_grad():
            expected = tensor_leaves(module(*built.args, **built.kwargs))
            got = tensor_leaves(runner(*built.args, **built.kwargs))
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(expected, got))
        size = os.path.getsize(path)
        out["aot"] = {"path": path, "size_bytes": size, "max_abs_diff": diff,
                      "summary": f"wrote {path} ({size / 1024:.0f} KiB, AOTInductor): max |diff| vs PyTorch {diff:.2e}"}
    return out


def _picture(args, report) -> None:
    if not (args.dot or args.svg):
        return
    dot_path = args.dot or args.svg + ".dot"
    write_dot(report, dot_path)
    print(f"wrote {dot_path}", file=sys.stderr)
    if args.svg:
        render_svg(dot_path, args.svg)
        print(f"wrote {args.svg}", file=sys.stderr)


def _check_invariant(module, args, kwargs) -> dict:
    """Run the converted module once (eval) and measure, at every geodesic update, the relative change
    of the state norm ``max | |out| - |x| | / |x|`` (GEONORM.md section 2 invariant)."""
    module.eval()
    with record_norm_changes(module) as worst, torch.no_grad():
        module(*args, **kwargs)
    n_params = sum(p.numel() for m in module.modules() if isinstance(m, GeodesicUpdate) for p in m.parameters())
    return {"updates_run": len(worst), "max_relative_norm_change": max(worst, default=0.0),
            "invariant_holds": all(w <= 1e-5 for w in worst), "new_parameters": n_params}


def _describe_check(check: dict) -> str:
    verdict = "holds" if check["invariant_holds"] else "VIOLATED"
    return (f"ran {check['updates_run']} geodesic update(s): max | |out| - |x| | / |x| = "
            f"{check['max_relative_norm_change']:.2e} (invariant <= 1e-5 {verdict}); "
            f"{check['new_parameters']} new parameter(s)")


def _demo() -> int:
    spec = "hf:llama"
    try:
        built = zoo.load(spec)
    except zoo.SpecError:
        spec = "torch:encoder-pre"
        built = zoo.load(spec)
    print(f"== geonorm-fx demo on {spec} ({type(built.model).__name__}, "
          f"{sum(p.numel() for p in built.model.parameters())} parameters, random weights)")
    report = inspect(built.model, built.args, built.kwargs)
    print("-- inspect: what the pass finds\n" + str(report))
    module = convert(built.model, built.args, built.kwargs)
    print(f"-- convert: {len(module.geonorm_report.sites)} site(s) rewritten into geodesic updates "
          f"(schedule={module.geonorm_report.schedule})")
    check = _check_invariant(module, built.args, built.kwargs)
    print("-- check: " + _describe_check(check))
    module.train()
    out = module(*built.args, **built.kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    logits.float().square().mean().backward()
    grads = sum(1 for p in module.parameters() if p.grad is not None)
    total = sum(1 for _ in module.parameters())
    print(f"-- train: one backward pass reached {grads}/{total} parameter tensors")
    shape = tuple(built.args[0].shape)
    bigger = (shape[0] + 1, shape[1] + 3) + shape[2:] if built.args[0].dim() >= 2 else shape
    sample = torch.randint(0, 100, bigger) if not built.args[0].is_floating_point() else torch.randn(bigger)
    module.eval()
    with torch.no_grad():
        module(sample)
    print(f"-- shapes: the converted module also runs on input of shape {bigger} (example was {shape})")
    try:
        from .exporters import export_onnx
    except ImportError:
        print("-- onnx: skipped (pip install 'geonorm-fx[onnx]' for the ONNX Runtime road)")
    else:
        import tempfile
        path = os.path.join(tempfile.mkdtemp(prefix="geonorm-demo-"), "model.onnx")
        r = export_onnx(module, built.args, path, kwargs=built.kwargs)
        print(f"-- onnx: {r.path} ({r.size_bytes / 1024:.0f} KiB, opset {r.opset}) runs in ONNX Runtime "
              f"({', '.join(r.providers)}); max |diff| vs PyTorch {r.max_abs_diff:.2e} at input shapes "
              f"{r.checked_shapes}")
    return 0 if check["invariant_holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
