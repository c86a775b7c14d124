"""``gf.install``: GeoNorm in place on real Hugging Face classes and hand-written stacks, checked against
``gf.convert`` of the same weights (an independent path: torch.export of the whole model, no Dynamo)."""
from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import nn

import geonorm_fx as gf
from tests.install_models import causal_lm, copy_updates, perturb_updates

pytest.importorskip("transformers")


def _greedy_full_prefix(converted, ids, steps):
    """Greedy decoding with no cache: the whole prefix is recomputed for every token."""
    seq, logits_per_step = ids, []
    with torch.no_grad():
        for _ in range(steps):
            out = converted(seq, use_cache=False)
            logits = out.logits[:, -1]
            logits_per_step.append(logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq, logits_per_step


@pytest.mark.parametrize("name", ["qwen2", "llama", "gpt2"])
def test_generate_with_cache_matches_convert_greedy(name):
    model, ids = causal_lm(name)
    source = copy.deepcopy(model)
    assert model.config.use_cache  # stock config
    same = gf.install(model, (ids,), backend="eager")
    assert same is model and type(model) is type(source)
    assert model.geonorm_report.counts() == {"pre": 4}
    perturb_updates(model)
    converted = gf.convert(source, (ids,), {"use_cache": False})
    copy_updates(model, converted)

    out = model.generate(ids, max_new_tokens=32, do_sample=False, output_logits=True, return_dict_in_generate=True)
    seq, logits = _greedy_full_prefix(converted, ids, 32)
    assert out.sequences.shape == (2, 40)
    assert torch.equal(out.sequences, seq)
    for cached, full in zip(out.logits, logits):
        torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    # the source's own logits are another model's (the test can fail)
    with torch.no_grad():
        assert (source(ids).logits[:, -1] - logits[0]).abs().max() > 1e-3


def test_signature_optional_arguments_labels_and_output_types():
    model, ids = causal_lm("qwen2")
    source = copy.deepcopy(model)
    gf.install(model, (ids,), backend="eager")
    assert inspect.signature(model.forward) == inspect.signature(source.forward)
    with torch.no_grad():
        plain = model(ids)
        with_mask = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        labelled = model(ids, labels=ids)
    assert type(plain) is type(source(ids))
    assert type(plain).__name__ == "CausalLMOutputWithPast"
    assert plain.past_key_values is not None and with_mask.past_key_values is None
    torch.testing.assert_close(plain.logits, with_mask.logits)
    assert labelled.loss is not None and labelled.loss.dim() == 0
    expected = nn.functional.cross_entropy(plain.logits[:, :-1].reshape(-1, plain.logits.shape[-1]),
                                           ids[:, 1:].reshape(-1))
    torch.testing.assert_close(labelled.loss, expected)
    # another batch and length than the example
    longer = torch.randint(1, 90, (3, 13))
    with torch.no_grad():
        assert model(longer).logits.shape == (3, 13, model.config.vocab_size)


def test_updates_are_parameters_when_install_returns_and_state_dict_has_decays():
    model, ids = causal_lm("llama")
    gf.install(model, (ids,), schedule="harmonic", backend="eager")
    names = [n for n, _ in model.named_parameters() if n.startswith("geonorm.")]
    assert names == [f"geonorm.model.layers.{b}.site{j}.{p}" for b in (0, 1) for j in (0, 1) for p in ("scale", "bias")]
    assert all(p.shape == (1,) for n, p in model.named_parameters() if n.startswith("geonorm."))
    decays = {k: float(v) for k, v in model.state_dict().items() if k.endswith("decay_constant")}
    assert decays == {"geonorm.model.layers.0.site0.decay_constant": 1.0, "geonorm.model.layers.0.site1.decay_constant": 1.0,
                      "geonorm.model.layers.1.site0.decay_constant": 0.5, "geonorm.model.layers.1.site1.decay_constant": 0.5}
    assert [s.update for s in model.geonorm_report.sites] == [
        "geonorm.model.layers.0.site0", "geonorm.model.layers.0.site1",
        "geonorm.model.layers.1.site0", "geonorm.model.layers.1.site1"]


def test_loading_a_state_dict_of_another_schedule_is_an_error():
    model, ids = causal_lm("llama")
    other = copy.deepcopy(model)
    gf.install(model, (ids,), schedule="harmonic", backend="eager")
    gf.install(other, (ids,), schedule="sqrt", backend="eager")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    perturb_updates(model)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(gf.ScheduleError, match="another schedule"):
        other.load_state_dict(model.state_dict())
    same = copy.deepcopy(model)
    same.load_state_dict(model.state_dict())  # the same schedule loads
    # and for a converted module too
    conv_a = gf.convert(causal_lm("llama")[0], (ids,), {"use_cache": False}, schedule="harmonic")
    conv_b = gf.convert(causal_lm("llama")[0], (ids,), {"use_cache": False}, schedule="none")
    conv_before = {k: v.clone() for k, v in conv_b.state_dict().items()}
    with pytest.raises(gf.ScheduleError):
        conv_b.load_state_dict(conv_a.state_dict())
    # a refused state_dict changes nothing (the decays are checked before any tensor is loaded)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert all(torch.equal(conv_before[k], v) for k, v in conv_b.state_dict().items())


def test_training_loop_matches_convert_and_trains_every_update():
    model, ids = causal_lm("qwen2")
    source = copy.deepcopy(model)
    gf.install(model, (ids,), backend="eager")
    converted = gf.convert(source, (ids,), {"labels": ids, "use_cache": False})
    copy_updates(model, converted)
    model.train()
    converted.train()
    opt_a = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt_b = torch.optim.AdamW(converted.parameters(), lr=3e-3)
    batches = [torch.randint(1, 90, (2, 8)) for _ in range(4)]
    losses_a, losses_b = [], []
    for step in range(20):
        batch = batches[step % 4]
        loss_a = model(batch, labels=batch).loss
        loss_b = converted(batch, labels=batch, use_cache=False).loss
        loss_a.backward()
        loss_b.backward()
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("geonorm.")}
            assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
        opt_a.step(), opt_b.step(), opt_a.zero_grad(), opt_b.zero_grad()
        losses_a.append(loss_a.item())
        losses_b.append(loss_b.item())
    assert max(abs(a - b) for a, b in zip(losses_a, losses_b)) < 1e-4
    assert sum(losses_a[-4:]) < sum(losses_a[:4]) - 0.1


class _Block(nn.Module):
    """A Pre-Norm block written by hand (the shape of timm's ViT block)."""

    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mix, self.mlp = nn.Linear(d, d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.mix(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Stack(nn.Module):
    def __init__(self, d=16, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@pytest.mark.parametrize("make", [
    lambda: (_Stack(), torch.randn(2, 5, 16)),
    lambda: (nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True),
                                   2, enable_nested_tensor=False), torch.randn(2, 5, 16)),
    lambda: (nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                   enable_nested_tensor=False), torch.randn(2, 5, 16)),
], ids=["hand-written-prenorm", "transformer-encoder-prenorm", "transformer-encoder-postnorm"])
def test_non_hf_models_match_convert(make):
    model, x = make()
    model.eval()
    source = copy.deepcopy(model)
    gf.install(model, (x,), backend="eager")
    converted = gf.convert(source, (x,))
    assert model.geonorm_report.counts() == converted.geonorm_report.counts() != {}
    perturb_updates(model)
    copy_updates(model, converted)
    for shape in ((2, 5, 16), (3, 7, 16)):
        y = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(model(y), converted(y), atol=1e-5, rtol=1e-5)
            assert (model(y) - source(y)).abs().max() > 1e-3


class _BreakInsideBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm, self.f = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        h = self.f(self.norm(x))
        torch._dynamo.graph_break()
        return x + h


class _BreakingStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_BreakInsideBlock() for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_a_graph_break_inside_a_block_is_an_error_not_a_dropped_update():
    model, x = _BreakingStack().eval(), torch.randn(2, 4, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(gf.CaptureError, match="graph break"):
        gf.install(model, (x,), backend="eager")
    assert not hasattr(model, "geonorm") and "forward" not in model.__dict__
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # fullgraph=False: each graph holds half a block; nothing to rewrite is found, and an installed model
    # whose block is split later fails at the call (see the next test)
    report = gf.install(_BreakingStack().eval(), (x,), backend="eager", fullgraph=False).geonorm_report
    assert report.sites == []


class _MaybeBreak(nn.Module):
    """Breaks the graph inside its block only when asked (a call-dependent graph break)."""

    def __init__(self, d=16):
        super().__init__()
        self.norm, self.f = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x, split=False):
        h = self.f(self.norm(x))
        if split:
            torch._dynamo.graph_break()
        return x + h


class _MaybeBreakingStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_MaybeBreak() for _ in range(2))

    def forward(self, x, split=False):
        for b in self.blocks:
            x = b(x, split)
        return x


def test_a_later_call_that_splits_a_block_raises():
    model, x = _MaybeBreakingStack().eval(), torch.randn(2, 4, 16)
    gf.install(model, (x,), backend="eager", fullgraph=False)
    assert model.geonorm_report.counts() == {"pre": 2}
    with torch.no_grad():
        model(x)
        with pytest.raises(gf.ConversionError, match="graph break inside the block"):
            model(x, split=True)


def test_deepcopy_runs_its_own_updates():
    model, ids = causal_lm("llama")
    gf.install(model, (ids,), backend="eager")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.geonorm.parameters():
            p.add_(1.0)
        a, b = model(ids).logits, twin(ids).logits
    assert (a - b).abs().max() > 1e-3
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits)


def test_bad_arguments_change_nothing():
    model, ids = causal_lm("llama")
    for kwargs, err in [({"schedule": "cubic"}, gf.ScheduleError), ({"clamp": 0.0}, gf.InvalidInputError),
                        ({"kinds": ["pre", "bogus"]}, gf.InvalidInputError), ({"backend": "nope"}, gf.InvalidInputError),
                        ({"fullgraph": "yes"}, gf.InvalidInputError)]:
        with pytest.raises(err):
            gf.install(model, (ids,), **kwargs)
        assert not hasattr(model, "geonorm") and "forward" not in model.__dict__
    gf.install(model, (ids,), backend="eager")
    with pytest.raises(gf.InvalidInputError, match="already has GeoNorm installed"):
        gf.install(model, (ids,), backend="eager")
    with pytest.raises(gf.InvalidInputError):
        gf.install(lambda x: x, (ids,))


def test_kinds_filter_leaves_other_sites_and_checks_them():
    model, x = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                     enable_nested_tensor=False).eval(), torch.randn(2, 5, 16)
    source = copy.deepcopy(model)
    gf.install(model, (x,), backend="eager", kinds=["pre"])
    assert model.geonorm_report.sites == [] and len(list(model.geonorm.parameters())) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    with torch.no_grad():
        assert math.isfinite(float(model(x).sum()))


class _NoCopies(_Stack):
    """Deep-copying it fails: an operation that works on it copied no weights."""

    def __deepcopy__(self, memo):
        raise RuntimeError("this model must not be copied")


def test_inspect_and_convert_copy_false_copy_no_weights():
    model, x = _NoCopies().train(), torch.randn(2, 5, 16)
    model.blocks[1].eval()  # a mixed mode, restored after the captures
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = gf.inspect(model, (x,))
    assert report.counts() == {"pre": 6}
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(gf.CaptureError, match="deep-copy"):
        gf.convert(model, (x,))
    shared = gf.convert(model, (x,), copy=False)
    assert [m.training for m in model.modules()] == modes
    params = {id(p) for p in model.parameters()}
    assert all(id(p) in params for n, p in shared.named_parameters() if not n.startswith("geonorm."))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # training the result trains the source's own tensors (the documented exception)
    shared.train()
    shared(x).sum().backward()
    with torch.no_grad():
        for p in shared.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    assert not torch.equal(before["blocks.0.mix.weight"], model.blocks[0].mix.weight)


def test_convert_copy_false_keeps_the_source_whole_when_norms_are_removed():
    from tests.tiny import PostNormBlock, Stack, tokens

    post = Stack(PostNormBlock, depth=2, final_norm=False).eval()
    names = set(post.state_dict())
    conv = gf.convert(post, (tokens(),), copy=False)
    assert conv.geonorm_report.counts() == {"post": 4}
    assert set(post.state_dict()) == names  # the removed norms' weights are still the source's
    with torch.no_grad():
        assert torch.isfinite(conv(tokens())).all()


def test_load_updates_from_a_converted_module():
    model, ids = causal_lm("llama")
    source = copy.deepcopy(model)
    converted = gf.convert(copy.deepcopy(model), (ids,), {"use_cache": False})
    perturb_updates(converted)
    gf.install(model, (ids,), backend="eager")
    names = gf.load_updates(model, converted)
    assert len(names) == 12
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, converted(ids, use_cache=False).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(gf.InvalidInputError, match="install it first"):
        gf.load_updates(source, converted)
    other = gf.convert(copy.deepcopy(source), (ids,), {"use_cache": False}, kinds=["post"])
    with pytest.raises(gf.ConversionError, match="site for"):
        gf.load_updates(model, other)
