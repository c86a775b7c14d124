"""Bad input gets a clear error, nothing is lost, no checkpoint runs code.

The ``geonorm-fx`` command line (exit 2 with one line for bad input, 130 for Ctrl-C, never a traceback;
options checked before the model is built; factory specs; Hugging Face configs built as their
``architectures`` class) and ``examples/train_lm.py`` (weights-only resume, atomic checkpoints, metrics kept
on resume, periodic and SIGINT checkpoints). Models are tiny: everything runs on 2 cores.
"""
from __future__ import annotations

import csv
import inspect
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import geonorm_fx
from geonorm_fx import cli, zoo
from geonorm_fx.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import train_lm  # noqa: E402

CONSOLE = os.path.join(os.path.dirname(sys.executable), "geonorm-fx")

# A module of factories, imported from the current directory (no PYTHONPATH): each good one keeps its
# model in MODELS so a test can check the command did not change it; ``marked`` writes MARKER when called.
FACTORIES = '''
import os
import sys
import torch
from torch import nn

MODELS = []
MARKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "factory-was-called")


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.f = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.f(self.norm(x))


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(Block(8), Block(8)).eval()
    MODELS.append(model)
    return model


def good():
    return _model(), (torch.randn(2, 4, 8),)


def marked():
    open(MARKER, "w").close()
    return good()


def three_items_bad_kwargs():
    return _model(), (torch.randn(2, 4, 8),), 5


def one_item():
    return (_model(),)


def not_a_module():
    return "model", (torch.randn(2, 4, 8),)


def a_list():
    return [_model(), (torch.randn(2, 4, 8),)]


def exits_zero():
    raise SystemExit(0)


def calls_sys_exit():
    sys.exit(3)


def raises():
    raise ValueError("no weights here")


def interrupted():
    raise KeyboardInterrupt


NOT_CALLABLE = 42
'''


def _one_error_line(err: str) -> str:
    """The single ``geonorm-fx: error: ...`` line on stderr (and nothing else, no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _exit_code(argv) -> int:
    """``main(argv)``'s exit code, whether it returns it or the argument parser exits."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training, [n for n, _ in model.named_modules()]


def _assert_unchanged(model, before):
    state, training, names = before
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert model.training == training and [n for n, _ in model.named_modules()] == names
    assert not hasattr(model, "geonorm_report")


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A fresh factories module in a fresh working directory (not on sys.path); yields its import name."""
    name = f"badinput_factories_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    yield name
    assert sys.path == path_before   # the cwd was taken off sys.path again
    sys.modules.pop(name, None)


# ----------------------------------------------------------------------------------- specs and factories

@pytest.mark.parametrize("spec,message", [
    ("../../etc:passwd", "is not a Python module name"),
    (".evil:f", "is not a Python module name"),
    ("os:getcwd", "returned str, but a factory must return (model, args)"),
    ("os:sep", "not a factory"),
    ("os:no_such_factory", "has no attribute 'no_such_factory'"),
    ("os:path.join:x", "is not a Python name"),
])
def test_bad_factory_specs_exit_2_with_one_line(capsys, spec, message):
    assert main(["inspect", spec]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("geonorm-fx: error: ") and message in line


@pytest.mark.parametrize("factory,message", [
    ("three_items_bad_kwargs", "returned int as kwargs (the third item)"),
    ("one_item", "returned a tuple of 1 item(s)"),
    ("not_a_module", "returned str as the model"),
    ("a_list", "returned list, but a factory must return (model, args) or (model, args, kwargs)"),
    ("exits_zero", "exited (SystemExit(0)) instead of returning (model, args)"),
    ("calls_sys_exit", "exited (SystemExit(3)) instead of returning (model, args)"),
    ("raises", "raised ValueError: no weights here"),
    ("NOT_CALLABLE", "is a int, not a factory"),
])
def test_bad_factories_exit_2_with_one_line(capsys, factories, factory, message):
    assert main(["convert", f"{factories}:{factory}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("geonorm-fx: error: ") and message in line


def test_factory_in_the_working_directory_imports_without_pythonpath(capsys, factories):
    assert os.getcwd() not in sys.path
    assert main(["inspect", f"{factories}:good", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"pre": 2}


def test_import_error_inside_the_spec_module_is_one_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "badinput_broken_module.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "badinput_broken_module:f"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot import" in line and "no_such_dependency_xyz" in line
    sys.modules.pop("badinput_broken_module", None)


def test_ctrl_c_in_the_factory_exits_130_with_one_line(capsys, factories):
    assert main(["inspect", f"{factories}:interrupted"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in _one_error_line(err)


def test_ctrl_c_during_conversion_exits_130_and_leaves_the_model(capsys, factories, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "convert", interrupt)
    assert main(["convert", f"{factories}:good"]) == 130
    assert "interrupted" in _one_error_line(capsys.readouterr().err)


def test_model_left_unchanged_when_conversion_fails(capsys, factories):
    assert main(["convert", f"{factories}:good", "--schedule", "1,0.5,0.25"]) == 2
    assert "3 values but the model has 2 blocks" in _one_error_line(capsys.readouterr().err)
    model = sys.modules[factories].MODELS[-1]
    fresh = sys.modules[factories].good()[0]
    _assert_unchanged(model, _state(fresh))


# ------------------------------------------------------------- options checked before the model is built

@pytest.mark.parametrize("options,message", [
    (["--kinds", "pre", "bogus"], "unknown site kind(s) 'bogus'"),
    (["--kinds", "pre,Post"], "unknown site kind(s) 'Post'"),
    (["--clamp", "0"], "not an angle in (0, pi]"),
    (["--clamp", "-1"], "not an angle in (0, pi]"),
    (["--clamp", "3.2"], "not an angle in (0, pi]"),
    (["--clamp", "nan"], "not an angle in (0, pi]"),
    (["--clamp", "inf"], "not an angle in (0, pi]"),
    (["--clamp", "wide"], "is not a number"),
    (["--schedule", "fast"], "is not a schedule"),
    (["--schedule", "1,,0.5"], "is not a schedule"),
    (["--schedule", "1,nan"], "not finite"),
    (["--onnx", "{tmp}"], "is a directory: give a file path"),
    (["--onnx", "{tmp}/missing/m.onnx"], "does not exist: create it"),
    (["--aot", "{tmp}/m.onnx"], "end in .pt2"),
    (["--dot", "{tmp}/missing/m.dot"], "does not exist: create it"),
    (["--svg", "{tmp}"], "is a directory"),
    (["--dot", "{tmp}/file.txt/m.dot"], "is not a folder"),
])
def test_bad_options_exit_2_before_the_model_is_built(capsys, factories, tmp_path, options, message):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    started = time.perf_counter()
    assert _exit_code(["convert", f"{factories}:marked", *options]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("geonorm-fx: error: ") and message in line, line
    assert not (tmp_path / "factory-was-called").exists()   # refused before the factory ran
    assert time.perf_counter() - started < 5


def test_unwritable_output_folder_exits_2(capsys, factories, tmp_path, monkeypatch):
    out = tmp_path / "readonly"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(out) else real_access(p, mode))
    assert main(["convert", f"{factories}:marked", "--onnx", str(out / "m.onnx")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(out / "m.onnx") in line and "no permission to write" in line
    assert not (tmp_path / "factory-was-called").exists()


@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied", "{path}"),
    OSError(28, "No space left on device", "{path}"),
    IsADirectoryError(21, "Is a directory", "{path}"),
    geonorm_fx.GeoNormError("export failed at {path}\nsecond line"),
])
def test_errors_from_the_exporter_exit_2_and_leave_the_model(capsys, factories, tmp_path, monkeypatch, error):
    pytest.importorskip("onnx")
    path = str(tmp_path / "m.onnx")
    error.args = tuple(a.replace("{path}", path) if isinstance(a, str) else a for a in error.args)
    if isinstance(error, OSError):
        error.filename = path

    def failing_export(*args, **kwargs):
        raise error
    monkeypatch.setattr("geonorm_fx.exporters.export_onnx", failing_export)
    assert main(["convert", f"{factories}:good", "--onnx", path]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("geonorm-fx: error: ") and path in line
    model = sys.modules[factories].MODELS[-1]
    _assert_unchanged(model, _state(sys.modules[factories].good()[0]))


def test_write_error_of_the_dot_file_exits_2(capsys, factories, tmp_path, monkeypatch):
    path = str(tmp_path / "stream.dot")

    def failing_write(report, p):
        raise PermissionError(13, "Permission denied", p)
    monkeypatch.setattr(cli, "write_dot", failing_write)
    assert main(["inspect", f"{factories}:good", "--dot", path]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert path in line and "permission denied" in line


# ---------------------------------------------------------------------------------- as a real process

def test_exit_builtin_as_factory_via_python_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "geonorm_fx.cli", "inspect", "builtins:exit"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stdout == ""
    line = _one_error_line(proc.stderr)
    assert "exited (SystemExit(None)) instead of returning (model, args)" in line


def test_console_script_cwd_factory_and_bad_clamp(tmp_path):
    (tmp_path / "cwd_factories_mod.py").write_text(FACTORIES)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ok = subprocess.run([CONSOLE, "inspect", "cwd_factories_mod:good"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "2 site(s)" in ok.stdout
    bad = subprocess.run([CONSOLE, "convert", "cwd_factories_mod:marked", "--clamp", "nan"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2
    assert _one_error_line(bad.stderr).startswith("geonorm-fx: error: argument --clamp")
    assert not (tmp_path / "factory-was-called").exists()


# ------------------------------------------------------------------------------- Hugging Face configs

def _qwen2_config(folder: pathlib.Path) -> pathlib.Path:
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen2ForCausalLM"):
        pytest.skip("this transformers has no Qwen2")
    cfg = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=64, intermediate_size=64, max_position_embeddings=64,
                                   architectures=["Qwen2ForCausalLM"])
    cfg.save_pretrained(folder)
    return folder


def test_config_is_built_as_the_class_architectures_names(tmp_path, capsys):
    folder = _qwen2_config(tmp_path)
    built = zoo.load(str(folder / "config.json"))
    assert type(built.model).__name__ == "Qwen2ForCausalLM"
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "(Qwen2ForCausalLM)" in out and "4 site(s) in 2 block(s) [pre=4]" in out


def test_config_with_custom_code_is_refused_without_running_it(tmp_path, capsys):
    pytest.importorskip("transformers")
    marker = tmp_path / "custom-code-ran"
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "badinput_custom", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}))
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "cannot read a Hugging Face config" in _one_error_line(capsys.readouterr().err)
    assert not marker.exists()


# ================================================================================ examples/train_lm.py

TINY = ["--d-model", "16", "--layers", "1", "--heads", "2", "--seq-len", "16", "--batch-size", "4",
        "--eval-batches", "1", "--log-every", "2", "--eval-every", "4", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> pathlib.Path:
    """~20 KB of Python source as training text."""
    import argparse
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(inspect.getsource(argparse)[:20000])
    return path


def _train_args(out, text, *extra, variant="prenorm", steps=8):
    return ["--variant", variant, "--steps", str(steps), "--seed", "0", "--out", str(out), "--data", str(text),
            *TINY, *extra]


def _rows(out: pathlib.Path) -> list[tuple[int, str, float]]:
    with open(out / "metrics.csv", newline="") as f:
        return [(int(r["step"]), r["split"], float(r["loss"])) for r in csv.DictReader(f)]


class Evil:
    """Unpickling this runs a shell command that creates ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("writer,message", [
    ("torch.save", "refused: it references posix.system"),
    (2, "refused: it references posix.system"),               # a plain pickle, protocol 2
    (4, r"not a checkpoint of train_lm.py \(it holds data"),  # protocol 4: refused at its first frame
])
def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, text, writer, message):
    marker, ckpt = tmp_path / "pwned", tmp_path / "evil.pt"
    payload = {"model": Evil(marker), "args": {}, "step": 1}
    if writer == "torch.save":
        torch.save(payload, ckpt)
    else:
        with open(ckpt, "wb") as f:
            pickle.dump(payload, f, protocol=writer)
    with pytest.raises(train_lm.CheckpointError, match=message) as exc:
        train_lm.main(_train_args(tmp_path / "out", text, "--resume", str(ckpt)))
    assert exc.value.code == 2 and "\n" not in str(exc.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()   # refused before anything was built or written


def test_resume_refuses_code_as_a_process(tmp_path, text):
    marker, ckpt = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": Evil(marker)}, ckpt)
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train_lm.py"),
                           *_train_args(tmp_path / "out", text, "--resume", str(ckpt))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert line.startswith("train_lm.py: error: --resume") and "refused" in line
    assert not marker.exists()


@pytest.mark.parametrize("content,message", [
    (b"", "damaged or not a torch checkpoint"),
    (b'{"model": {}}', "not a checkpoint of train_lm.py"),
    ("truncated", "damaged or not a torch checkpoint"),
    ("no-args", "no 'args' entry"),
    ("incomplete", "not a complete train_lm.py checkpoint: model, optimizer, step, data_generator"),
])
def test_resume_refuses_damaged_or_foreign_files(tmp_path, text, content, message):
    ckpt = tmp_path / "checkpoint.pt"
    if content == "truncated":
        torch.save({"model": {"w": torch.zeros(100)}}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif content == "no-args":
        torch.save({"w": torch.zeros(3)}, ckpt)
    elif content == "incomplete":
        torch.save({"args": vars(train_lm.parse_args(_train_args(tmp_path, text)))}, ckpt)
    else:
        ckpt.write_bytes(content)
    with pytest.raises(train_lm.CheckpointError, match=message):
        train_lm.main(_train_args(tmp_path / "out", text, "--resume", str(ckpt)))


@pytest.mark.parametrize("extra,message", [
    (["--log-every", "0"], "--log-every: 0 must be at least 1"),
    (["--checkpoint-every", "-2"], "--checkpoint-every: -2 must be at least 1"),
    (["--steps", "ten"], "'ten' is not an integer"),
    (["--clamp", "nan"], "not an angle in (0, pi]"),
    (["--heads", "3"], "--d-model 16 is not divisible by --heads 3"),
    (["--data", "/no/such/text.txt"], "--data /no/such/text.txt: no such file or folder"),
    (["--resume", "/no/such/checkpoint.pt"], "no such checkpoint file"),
])
def test_bad_training_arguments_are_one_line_errors(tmp_path, text, extra, message):
    with pytest.raises(train_lm.ScriptError) as exc:
        train_lm.main(_train_args(tmp_path, text, *extra))
    assert exc.value.code == 2 and message in str(exc.value) and "\n" not in str(exc.value)


def test_checkpoint_holds_only_plain_data(tmp_path, text):
    train_lm.main(_train_args(tmp_path, text, "--steps", "4", "--save-checkpoint"))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "step", "data_generator", "args", "pending_losses"} <= set(ckpt)
    assert type(ckpt["args"]) is dict and ckpt["args"]["variant"] == "prenorm" and ckpt["step"] == 4
    with pytest.raises(TypeError, match="only tensors and plain data"):
        train_lm.plain_data({"x": object()})
    import argparse
    plain = train_lm.plain_data({"opts": argparse.Namespace(out=pathlib.Path("a/b"), n=1), "t": (1, [2.0])})
    assert plain == {"opts": {"out": "a/b", "n": 1}, "t": (1, [2.0])}


def test_a_failing_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    train_lm.atomic_save({"step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f)
        f.seek(0)
        f.truncate(100)   # partial bytes, then the disk fills up
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train_lm.atomic_save({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    kept = torch.load(path, weights_only=True)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]   # no temporary file left behind


def test_resume_into_the_same_folder_appends_metrics(tmp_path, text):
    out, straight = tmp_path / "run", tmp_path / "straight"
    train_lm.main(_train_args(out, text, "--stop-after", "4", "--save-checkpoint", variant="geonorm-pre"))
    assert [r[0] for r in _rows(out)] == [2, 4, 4]
    train_lm.main(_train_args(out, text, "--resume", str(out / "checkpoint.pt"), variant="geonorm-pre"))
    rows = _rows(out)
    assert [(r[0], r[1]) for r in rows] == [(2, "train"), (4, "train"), (4, "val"), (6, "train"), (8, "train"),
                                            (8, "val")]
    train_lm.main(_train_args(straight, text, variant="geonorm-pre"))
    assert [r[2] for r in rows] == pytest.approx([r[2] for r in _rows(straight)], rel=1e-6)


def test_resume_drops_rows_written_after_the_checkpoint(tmp_path, text):
    out = tmp_path / "run"
    train_lm.main(_train_args(out, text, "--stop-after", "3", "--save-checkpoint", "--log-every", "1"))
    early = tmp_path / "step3.pt"
    early.write_bytes((out / "checkpoint.pt").read_bytes())
    train_lm.main(_train_args(out, text, "--resume", str(early), "--stop-after", "5", "--log-every", "1"))
    # the run crashed here, after logging steps 4 and 5; resuming from step 3 must not log them twice
    train_lm.main(_train_args(out, text, "--resume", str(early), "--log-every", "1"))
    trains = [r[0] for r in _rows(out) if r[1] == "train"]
    assert trains == list(range(1, 9))


def test_checkpoint_every_n_steps(tmp_path, text, monkeypatch):
    saved = []
    real = train_lm.save_checkpoint
    monkeypatch.setattr(train_lm, "save_checkpoint", lambda path, *a: (saved.append(a[3]), real(path, *a)))
    train_lm.main(_train_args(tmp_path, text, "--steps", "7", "--checkpoint-every", "3"))
    assert saved == [3, 6, 7]   # every 3 steps, and at the end
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 7


def test_resume_with_nothing_left_to_train_is_an_error(tmp_path, text):
    train_lm.main(_train_args(tmp_path, text, "--steps", "4", "--save-checkpoint"))
    with pytest.raises(train_lm.CheckpointError, match="nothing to train"):
        train_lm.main(_train_args(tmp_path, text, "--steps", "4", "--resume", str(tmp_path / "checkpoint.pt")))


def test_sigint_writes_a_checkpoint_and_resume_continues(tmp_path, text):
    out = tmp_path / "run"
    args = _train_args(out, text, "--log-every", "1", steps=100000)
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "train_lm.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.csv").exists() and len((out / "metrics.csv").read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    line = _one_error_line(stderr)
    ckpt_path = out / "checkpoint.pt"
    assert line.startswith("train_lm.py: stopped by SIGINT after step") and str(ckpt_path) in line
    step = torch.load(ckpt_path, weights_only=True)["step"]
    assert f"after step {step} of 100000" in line
    assert not (out / "summary.json").exists()   # an interrupted run is not a finished one
    summary = train_lm.main(args + ["--resume", str(ckpt_path), "--stop-after", str(step + 3)])
    assert summary["steps_done"] == step + 3
    trains = [r[0] for r in _rows(out) if r[1] == "train"]
    assert trains == list(range(1, step + 4))
