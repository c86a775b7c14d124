"""The command line: exit codes, tables, JSON, every kind of spec, the demo."""
import json
import os
import subprocess
import sys

import pytest

from geonorm_fx.cli import main


def test_inspect_prints_a_table(capsys):
    assert main(["inspect", "torch:encoder-pre"]) == 0
    out = capsys.readouterr().out
    assert "4 site(s) in 2 block(s) [pre=4]" in out
    assert "layers.1" in out and "decay" in out


def test_inspect_json_parses(capsys):
    assert main(["inspect", "torch:encoder-post", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"] == {"post": 4}
    assert [s["block"] for s in data["sites"]] == [0, 0, 1, 1]


def test_convert_with_schedule_and_clamp_json(capsys):
    assert main(["convert", "tests.tiny:factory", "--schedule", "0.9,0.3", "--clamp", "0.5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["decay"] for s in data["report"]["sites"]] == [0.9, 0.9, 0.3, 0.3]
    assert data["check"]["invariant_holds"] is True
    assert data["check"]["updates_run"] == 4


@pytest.mark.parametrize("argv,message", [
    (["inspect", "hf:nope"], "unknown built-in model"),
    (["inspect", "no_such_module_xyz:factory"], "cannot import"),
    (["inspect", "/no/such/config.json"], "no such config"),
    (["inspect", "gibberish"], "cannot read model spec"),
    (["convert", "tests.tiny:factory", "--schedule", "2,2,2"], "3 values but the model has 2 blocks"),
])
def test_bad_specs_exit_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_schedule_text_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "tests.tiny:factory", "--schedule", "fast"])
    assert exc.value.code == 2


def test_hugging_face_config_directory(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    cfg.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"pre": 6}
    assert main(["inspect", str(tmp_path / "config.json")]) == 0


def test_console_script_demo_runs():
    pytest.importorskip("transformers")
    exe = os.path.join(os.path.dirname(sys.executable), "geonorm-fx")
    proc = subprocess.run([exe, "demo"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "invariant <= 1e-5 holds" in proc.stdout
    assert "4 site(s) rewritten" in proc.stdout
    assert "runs in ONNX Runtime (CPUExecutionProvider)" in proc.stdout


def test_convert_onnx_and_aot_report_where_the_files_went(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    onnx_path, aot_path = tmp_path / "m.onnx", tmp_path / "m.pt2"
    assert main(["convert", "tests.tiny:factory", "--onnx", str(onnx_path), "--aot", str(aot_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["onnx"]["path"] == str(onnx_path) and onnx_path.exists()
    assert data["onnx"]["size_bytes"] == os.path.getsize(onnx_path)
    assert data["onnx"]["providers"] == ["CPUExecutionProvider"] and data["onnx"]["max_abs_diff"] < 1e-4
    assert data["aot"]["path"] == str(aot_path) and aot_path.exists() and data["aot"]["max_abs_diff"] < 1e-4
    assert main(["convert", "tests.tiny:factory", "--onnx", str(onnx_path)]) == 0
    assert "ONNX Runtime CPUExecutionProvider: max |diff| vs PyTorch" in capsys.readouterr().out
