"""The training study's scripts: every variant trains, DDP keeps ranks identical, checkpoints round-trip.

Tiny models on a small text file so the whole module runs in about a minute on 2 cores.
"""
from __future__ import annotations

import csv
import inspect
import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import lm_model  # noqa: E402
import train_lm  # noqa: E402

TINY = ["--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "32", "--batch-size", "8",
        "--eval-batches", "2", "--log-every", "5", "--threads", "1", "--quiet"]
STEPS = 60


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> pathlib.Path:
    """~60 KB of real text (Python source from the standard library)."""
    import argparse
    import csv as csv_module
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(inspect.getsource(argparse) + inspect.getsource(csv_module))
    return path


def _args(variant: str, out: pathlib.Path, data: pathlib.Path, *extra: str) -> list[str]:
    return ["--variant", variant, "--steps", str(STEPS), "--seed", "0", "--out", str(out), "--data", str(data),
            "--eval-every", "30", *TINY, *extra]


def _metrics(out: pathlib.Path, split: str) -> list[float]:
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "split", "loss", "tokens", "seconds"]
    return [float(r["loss"]) for r in rows if r["split"] == split]


@pytest.fixture(scope="module")
def geonorm_pre_run(tmp_path_factory, text_file):
    """One uninterrupted geonorm-pre run, shared by the smoke and the resume tests."""
    out = tmp_path_factory.mktemp("geonorm-pre")
    return out, train_lm.main(_args("geonorm-pre", out, text_file))


@pytest.mark.parametrize("variant", train_lm.VARIANTS)
def test_every_variant_trains(variant, tmp_path, text_file, geonorm_pre_run):
    if variant == "geonorm-pre":
        out, summary = geonorm_pre_run
    else:
        out = tmp_path
        summary = train_lm.main(_args(variant, out, text_file))
    train = _metrics(out, "train")
    assert len(train) == STEPS // 5 and all(math.isfinite(v) for v in train)
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 0.3, train   # starts near ln(256) = 5.55
    assert math.isfinite(summary["final_val_loss"]) and not summary["diverged"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["final_val_loss"] == summary["final_val_loss"]
    assert set(on_disk["versions"]) == {"torch", "python", "geonorm_fx"}
    expected = {"geonorm-pre": {"pre": 4}, "geonorm-post": {"post": 4}}.get(variant, {})
    assert on_disk["site_counts"] == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_stay_identical(tmp_path, text_file):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(EXAMPLES / "train_lm.py"), "--ddp",
           *_args("geonorm-pre", out, text_file, "--save-params", str(tmp_path / "params.pt"))]
    cmd[cmd.index("--steps") + 1] = "12"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"params.rank{r}.pt") for r in (0, 1)]
    assert list(ranks[0]) == list(ranks[1])
    geo = [k for k in ranks[0] if "geonorm." in k and not k.endswith("decay_constant")]
    assert len(geo) == 8 and {k.rsplit(".", 1)[1] for k in geo} == {"scale", "bias"}
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # the ranks saw different batches, so equality means the gradients were averaged; and they trained
    assert any(float(ranks[0][k]) != 1.0 for k in geo if k.endswith("scale"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and math.isfinite(summary["final_val_loss"])
    assert all(math.isfinite(v) for v in _metrics(out, "train"))


def test_checkpoint_round_trip_and_resume(tmp_path, text_file, geonorm_pre_run):
    first = tmp_path / "first"
    summary, trained = train_lm.train(train_lm.parse_args(
        _args("geonorm-pre", first, text_file, "--stop-after", "30", "--save-checkpoint")))
    assert summary["steps_done"] == 30
    torch.save(trained.state_dict(), tmp_path / "state.pt")
    # a fresh conversion of the same architecture (other init), loaded strictly, is the same model
    other_init = train_lm.parse_args(_args("geonorm-pre", tmp_path, text_file) + ["--seed", "7"])
    fresh, counts = train_lm.build_model(other_init)
    assert counts == {"pre": 4}
    state = torch.load(tmp_path / "state.pt")
    assert any(k.startswith("geonorm.") for k in state)
    fresh.load_state_dict(state, strict=True)
    x = torch.randint(0, 256, (3, 20))
    for mode in (False, True):
        trained.train(mode)
        fresh.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)
    # resuming from the checkpoint ends exactly where the uninterrupted run ended
    resumed = tmp_path / "resumed"
    again = train_lm.main(_args("geonorm-pre", resumed, text_file, "--resume", str(first / "checkpoint.pt")))
    full_out, full = geonorm_pre_run
    assert again["steps_done"] == STEPS
    assert again["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-6)
    assert _metrics(resumed, "train") == pytest.approx(_metrics(full_out, "train")[30 // 5:], rel=1e-6)


def test_resume_refuses_another_model(tmp_path, text_file):
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"args": {**vars(train_lm.parse_args(_args("geonorm-pre", tmp_path, text_file))), "schedule": "sqrt"}},
               ckpt)
    opts = train_lm.parse_args(_args("geonorm-pre", tmp_path, text_file, "--resume", str(ckpt)))
    with pytest.raises(SystemExit, match="schedule"):
        train_lm._load_checkpoint(opts, None, None, None)


def test_data_split_is_fixed(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(25):
        (folder / f"f{i:02d}.txt").write_bytes(bytes([65 + i]) * 50)
    data = lm_model.load_data(str(folder))
    assert data.n_files == 25 and set(data.val.tolist()) == {65 + 10}   # file 10 of every 20
    assert 65 + 10 not in set(data.train.tolist())
    one = lm_model.load_data(str(folder / "f03.txt"))
    assert one.train.numel() == 45 and one.val.numel() == 5   # a single file: the last 10% of its bytes
    files = lm_model.stdlib_files()
    assert files == sorted(files) and len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
