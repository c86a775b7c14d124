"""``gf.install`` with what the model is used with: Trainer, save_pretrained, autocast, bfloat16, gradient
checkpointing, PEFT LoRA."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import geonorm_fx as gf
from geonorm_fx.geodesic import GeodesicUpdate
from tests.install_models import causal_lm, copy_updates, perturb_updates

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = [torch.randint(1, 90, (8,), generator=g) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _train_with_trainer(model, out_dir):
    losses = []

    class Recording(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            losses.append((loss[0] if return_outputs else loss).item())
            return loss

    args = transformers.TrainingArguments(output_dir=str(out_dir), max_steps=20, per_device_train_batch_size=4,
                                          learning_rate=3e-3, use_cpu=True, report_to=[], save_strategy="no",
                                          logging_strategy="no", seed=0, dataloader_num_workers=0,
                                          remove_unused_columns=False)
    Recording(model=model, args=args, train_dataset=_Rows()).train()
    return losses


def test_trainer_matches_convert_for_20_steps(tmp_path):
    model, ids = causal_lm("llama")
    source = copy.deepcopy(model)
    gf.install(model, (ids,), backend="eager")
    source.config.use_cache = False  # convert fixes the call's arguments: no cache, input_ids and labels
    converted = gf.convert(source, kwargs={"input_ids": torch.randint(1, 90, (4, 8)),
                                           "labels": torch.randint(1, 90, (4, 8))})
    copy_updates(model, converted)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("geonorm.")}
    losses_a = _train_with_trainer(model, tmp_path / "a")
    losses_b = _train_with_trainer(converted, tmp_path / "b")
    assert len(losses_a) == len(losses_b) == 20
    assert max(abs(a - b) for a, b in zip(losses_a, losses_b)) < 1e-4
    assert sum(losses_a[-5:]) < sum(losses_a[:5])
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n.startswith("geonorm."))


_RELOAD = textwrap.dedent("""
    import sys, torch, transformers, geonorm_fx as gf
    directory, ids_file, logits_file, schedule = sys.argv[1:5]
    ids = torch.load(ids_file, weights_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    gf.install(model, (ids,), schedule=schedule, backend="eager")
    try:
        gf.load_updates(model, directory)
    except gf.ScheduleError as e:
        print("ScheduleError", e)
        sys.exit(3)
    with torch.no_grad():
        torch.save(model(ids).logits, logits_file)
""")


def test_save_pretrained_and_reload_in_a_new_process(tmp_path):
    model, ids = causal_lm("qwen2")
    gf.install(model, (ids,), backend="eager")
    perturb_updates(model)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "saved")
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD)
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "saved"), str(tmp_path / "ids.pt"),
                          str(tmp_path / "logits.pt"), "harmonic"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=1e-5)
    other = subprocess.run([sys.executable, str(script), str(tmp_path / "saved"), str(tmp_path / "ids.pt"),
                            str(tmp_path / "other.pt"), "none"], capture_output=True, text=True, env=env, timeout=300)
    assert other.returncode == 3 and "another schedule" in other.stdout
    # and the plain state_dict route, in this process
    fresh, _ = causal_lm("qwen2", seed=5)
    gf.install(fresh, (ids,), backend="eager")
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected)


def test_autocast_and_bfloat16_after_install():
    model, ids = causal_lm("llama")
    source = copy.deepcopy(model)
    gf.install(model, (ids,), backend="eager")
    perturb_updates(model)
    with torch.no_grad():
        reference = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(ids).logits
            mixed_source = source(ids).logits
        assert mixed.dtype == torch.bfloat16
        assert (mixed.float() - reference).abs().max() < 0.05
        assert (mixed_source.float() - reference).abs().max() > 0.1  # the source is another model
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("geonorm."))
    model.eval().to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        half = model(ids).logits
    assert half.dtype == torch.bfloat16
    assert (half.float() - reference).abs().max() < 0.1


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_gradient_checkpointing_recomputes_and_matches(backend):
    model, ids = causal_lm("llama")
    gf.install(model, (ids,), backend=backend)
    perturb_updates(model)
    model.train()
    calls = []
    for m in model.modules():
        if isinstance(m, GeodesicUpdate):
            m.register_forward_hook(lambda *a: calls.append(1))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # recompute whole regions (countable)
        loss = model(ids, labels=ids).loss
        loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-5)
    if backend == "eager":  # the eager backend runs the updates as modules: each block's forward ran twice
        assert len(calls) == 4 + 2 * 4, len(calls)


@pytest.mark.parametrize("order", ["lora-then-install", "install-then-lora"])
def test_peft_lora_before_or_after_install(order):
    peft = pytest.importorskip("peft")
    model, ids = causal_lm("qwen2")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           init_lora_weights=False)
    if order == "lora-then-install":
        model = peft.get_peft_model(model, lora)
        same = gf.install(model, (ids,), backend="eager")
        assert same is model
        inner = model.get_base_model()
        for p in inner.geonorm.parameters():  # PEFT froze the base; the updates are trained with the adapters
            assert p.requires_grad
    else:
        gf.install(model, (ids,), backend="eager")
        model = peft.get_peft_model(model, lora)
        inner = model.get_base_model()
    assert inner.geonorm_report.counts() == {"pre": 4}
    perturb_updates(inner)
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    assert merged is inner and hasattr(merged, "geonorm")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)
        tokens = merged.generate(ids, max_new_tokens=8, do_sample=False)
    assert tokens.shape == (2, 16)
