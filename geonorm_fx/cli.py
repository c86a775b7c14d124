"""``geonorm-fx inspect|convert|demo``: the pass from the command line.

Exit codes: 0 on success; 2 on bad input (arguments, spec, output paths, a model the pass refuses) with
one line ``geonorm-fx: error: ...`` on stderr; 130 on Ctrl-C with one line. No traceback reaches the user
for any of these: :func:`main` is the one place that turns them into exit codes."""
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
from .errors import GeoNormError, InvalidInputError
from .geodesic import GeodesicUpdate, record_norm_changes
from .report import SITE_KINDS
from .schedules import SCHEDULE_NAMES
from .visualize import render_svg, write_dot

PROG = "geonorm-fx"
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _schedule(text: str):
    """``--schedule``: a schedule name, or comma-separated finite per-block decays (checked before any model
    is built; the number of values is checked against the model's blocks later)."""
    if text in SCHEDULE_NAMES:
        return text
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a schedule: use {', '.join(SCHEDULE_NAMES)} or comma-separated numbers "
                "such as 1,0.5") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} has a decay that is not finite ({item.strip()}): "
                                             "give finite numbers such as 1,0.5")
        values.append(value)
    return values


def _clamp(text: str) -> float:
    """``--clamp``: a finite angle in (0, pi] radians."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give an angle in radians in (0, pi], "
                                         "e.g. 0.785") from None
    if not math.isfinite(value) or not 0.0 < value <= math.pi:
        raise argparse.ArgumentTypeError(f"{text} is not an angle in (0, pi] = (0, {math.pi:.6f}] radians: "
                                         "give e.g. 0.785 (pi/4, the default)")
    return value


def _kinds(text: str) -> list[str]:
    """One ``--kinds`` value: a site kind, or several separated by commas."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in SITE_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown site kind(s) {', '.join(map(repr, unknown)) or repr(text)}: "
                                         f"use any of {', '.join(SITE_KINDS)}")
    return kinds


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``geonorm-fx: error: ...``) and exit code 2."""

    def error(self, message: str):
        print(f"{PROG}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Rewrite residual + norm sites into GeoNorm "
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
    conv.add_argument("--clamp", type=_clamp, default=math.pi / 4, help="maximum angle per update (radians, in (0, pi])")
    conv.add_argument("--kinds", type=_kinds, nargs="+", default=None,
                      help=f"rewrite only these site kinds ({', '.join(SITE_KINDS)})")
    conv.add_argument("--onnx", metavar="OUT.onnx", help="export to ONNX and verify it in ONNX Runtime")
    conv.add_argument("--aot", metavar="OUT.pt2", help="write an AOTInductor package and check it against PyTorch")
    sub.add_parser("demo", help="inspect and convert a built-in model, check the invariant, show the result")
    return p


def _output_paths(args) -> dict[str, str]:
    """The files this command will write, by option (``--svg`` also writes ``FILE.dot`` unless ``--dot``)."""
    paths = {flag: getattr(args, flag.lstrip("-"), None) for flag in ("--onnx", "--aot", "--dot", "--svg")}
    if paths["--svg"] and not paths["--dot"]:
        paths["--svg (its .dot file)"] = paths["--svg"] + ".dot"
    return {flag: path for flag, path in paths.items() if path}


_SUFFIX = {"--onnx": ".onnx", "--aot": ".pt2", "--dot": ".dot", "--svg": ".svg"}


def check_output_path(flag: str, path: str) -> None:
    """Raise :class:`InvalidInputError` when ``path`` cannot be written as a file: it is a directory, its
    folder does not exist or is not a folder, or the folder (or the existing file) is not writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        example = os.path.join(path, "model" + _SUFFIX.get(flag.split()[0], ""))
        raise InvalidInputError(f"{flag} {path} is a directory: give a file path, e.g. {example}")
    if not os.path.exists(folder):
        raise InvalidInputError(f"{flag} {path}: the folder {folder} does not exist: create it "
                                f"(mkdir -p {folder}) or choose another path")
    if not os.path.isdir(folder):
        raise InvalidInputError(f"{flag} {path}: {folder} is not a folder: choose a path inside a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise InvalidInputError(f"{flag} {path}: no permission to write there: choose a writable path")
    if flag == "--aot" and not path.endswith(".pt2"):
        raise InvalidInputError(f"--aot {path}: AOTInductor packages end in .pt2: give e.g. {path}.pt2")


def _os_error_line(e: OSError) -> str:
    """One line for a filesystem error: which path, what went wrong, what to do."""
    if e.filename is None:
        return f"{e.strerror or e}: check the paths given, free disk space and permissions"
    where = e.filename
    if isinstance(e, IsADirectoryError):
        return f"{where} is a directory: give a file path"
    if isinstance(e, FileNotFoundError):
        return f"{where}: no such file or folder: check the path (output folders must exist)"
    if isinstance(e, PermissionError):
        return f"{where}: permission denied: choose a path you can read and write"
    return f"{where}: {e.strerror or e}: check the path, free disk space and permissions"


def _fail(message: str) -> int:
    """Print ``geonorm-fx: error: <first line of message>`` on stderr; return the bad-input exit code."""
    first = (message.strip().splitlines() or ["unknown error"])[0]
    print(f"{PROG}: error: {first}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (argument errors exit 2 from the parser itself).

    The one place where bad input becomes an exit code: :class:`GeoNormError` (bad spec, refused model,
    failed export) and filesystem errors -> 2, Ctrl-C -> 130, each with one line on stderr."""
    try:
        args = _parser().parse_args(argv)
        warnings.filterwarnings("ignore", category=FutureWarning)
        return _run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (Ctrl-C); files it was writing may be incomplete", file=sys.stderr)
        return EXIT_INTERRUPTED
    except GeoNormError as e:
        return _fail(str(e) or type(e).__name__)
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): stop quietly
        _silence_stdout()
        return 1
    except OSError as e:
        return _fail(_os_error_line(e))


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again on a closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _run(args) -> int:
    """The command itself; raises :class:`GeoNormError` / :class:`OSError` on bad input."""
    if args.command == "demo":
        return _demo()
    for flag, path in _output_paths(args).items():   # before the model is built: fail fast
        check_output_path(flag, path)
    built = zoo.load(args.spec)
    if args.command == "inspect":
        report = inspect(built.model, built.args, built.kwargs, dynamic=not args.static,
                         tracer=args.tracer, schedule=args.schedule)
        print(report.to_json(indent=2) if args.json else f"{built.name}: {report}")
        _picture(args, report)
        return 0
    kinds = None if args.kinds is None else [k for group in args.kinds for k in group]
    module = convert(built.model, built.args, built.kwargs, schedule=args.schedule, clamp=args.clamp,
                     kinds=kinds, dynamic=not args.static, tracer=args.tracer)
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
