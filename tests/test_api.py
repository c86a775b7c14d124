"""The contract of convert(): no mutation, trainable, deep-copyable, modes, shapes, idempotence."""
import copy
import inspect
import io
import pickle

import pytest
import torch
from torch import nn

import geonorm_fx as gf

from .tiny import PostNormBlock, PreNormBlock, Stack, tokens


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(state[k], v), k


@pytest.fixture(scope="module")
def prenorm():
    torch.manual_seed(0)
    model = Stack(PreNormBlock, depth=2, p=0.3).eval()
    toks = tokens()
    return model, toks, gf.convert(model, (toks,))


def test_source_is_never_mutated_even_by_training_the_result():
    model = Stack(PostNormBlock, depth=2, final_norm=False, p=0.1).eval()
    before = _snapshot(model)
    converted = gf.convert(model, (tokens(),)).train()
    opt = torch.optim.SGD(converted.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        converted(tokens()).square().mean().backward()
        opt.step()
    _assert_same_state(model, before)
    assert model.training is False
    for name, p in converted.named_parameters():
        src = dict(model.named_parameters()).get(name)
        if src is not None:
            assert p.data_ptr() != src.data_ptr(), name


def test_source_is_not_mutated_when_an_error_is_raised():
    model = Stack(PreNormBlock, depth=2).train()
    before = _snapshot(model)
    with pytest.raises(gf.CaptureError):
        gf.convert(model, (torch.randn(2, 3, 4),))  # float input to an embedding: capture fails
    with pytest.raises(gf.GeoNormError, match="unknown site kind"):
        gf.convert(model, (tokens(),), kinds=["sideways"])
    _assert_same_state(model, before)
    assert model.training is True


def test_result_is_trainable_and_gradients_reach_every_parameter(prenorm):
    model, toks, converted = prenorm
    converted.train()
    converted.zero_grad()
    converted(toks).square().mean().backward()
    names = {n for n, _ in converted.named_parameters()}
    assert {f"geonorm.{i}.scale" for i in range(4)} | {f"geonorm.{i}.bias" for i in range(4)} <= names
    for name, p in converted.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_state_dict_keeps_source_names(prenorm):
    model, _, converted = prenorm
    src = set(model.state_dict())
    new = set(converted.state_dict())
    assert src <= new
    assert new - src == {f"geonorm.{i}.{p}" for i in range(4) for p in ("scale", "bias", "decay_constant")}
    post = Stack(PostNormBlock, depth=2, final_norm=False)
    conv = gf.convert(post, (tokens(),))
    removed = {f"blocks.{b}.{n}.{p}" for b in range(2) for n in ("norm1", "norm2") for p in ("weight", "bias")}
    assert set(conv.geonorm_report.removed_parameters) == removed
    assert set(conv.state_dict()) == (set(post.state_dict()) - removed) | {
        f"geonorm.{i}.{p}" for i in range(4) for p in ("scale", "bias", "decay_constant")}
    conv.load_state_dict(post.state_dict(), strict=False)


def test_train_and_eval_switch_dropout(prenorm):
    model, toks, converted = prenorm
    converted.eval()
    with torch.no_grad():
        a, b = converted(toks), converted(toks)
    torch.testing.assert_close(a, b)
    converted.train()
    with torch.no_grad():
        c, d = converted(toks), converted(toks)
    assert not torch.allclose(c, d)
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(toks), a)


def test_modes_that_compute_the_same_program_share_one_forward(prenorm):
    """The eval and train graphs are captured apart; when they compute the same program (no dropout,
    no mode-dependent op) one generated forward serves both modes, which halves the code generation
    of the pass. With dropout they differ and each mode keeps its own (see the dropout test above)."""
    _, toks, with_dropout = prenorm
    assert with_dropout._geonorm_forward["train"] is not with_dropout._geonorm_forward["eval"]

    class NoDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            self.norms = nn.ModuleList(nn.LayerNorm(16) for _ in range(2))
            self.fs = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

        def forward(self, ids):
            x = self.embed(ids)
            for norm, f in zip(self.norms, self.fs):
                x = x + f(norm(x))
            return x

    torch.manual_seed(0)
    converted = gf.convert(NoDropout().eval(), (toks,))
    assert converted.geonorm_report.counts() == {"pre": 2}
    assert converted._geonorm_forward["train"] is converted._geonorm_forward["eval"]
    with torch.no_grad():
        torch.testing.assert_close(converted.train()(toks), converted.eval()(toks))
    twin = copy.deepcopy(converted)
    assert twin._geonorm_forward["train"] is twin._geonorm_forward["eval"]


def test_generated_functions_with_other_constants_are_not_interchangeable():
    """Per-mode modules that are stateless (torch.export's input-guard module) are shared only when their
    functions have the same code and closures: other constants in the code make them different."""
    from geonorm_fx.module import _interchangeable

    def guard(limit):
        namespace = {}
        exec(f"def _(x):\n    assert x.shape[1] <= {limit}\n", namespace)  # noqa: S102 - as torch.export does
        module = nn.Module()
        module.forward = namespace["_"]
        return module

    assert _interchangeable(guard(11), guard(11))
    assert not _interchangeable(guard(11), guard(12))
    assert not _interchangeable(nn.Dropout(0.1), nn.Dropout(0.2)) and _interchangeable(nn.Dropout(0.1), nn.Dropout(0.1))
    assert not _interchangeable(nn.Linear(2, 2), nn.Linear(2, 2))


def test_deepcopy_gives_an_independent_equal_module(prenorm):
    _, toks, converted = prenorm
    converted.eval()
    twin = copy.deepcopy(converted)
    with torch.no_grad():
        torch.testing.assert_close(twin(toks), converted(toks))
        next(twin.parameters()).add_(1.0)
        assert not torch.allclose(twin(toks), converted(toks))
    assert twin.geonorm_report.counts() == converted.geonorm_report.counts()


def test_other_batch_sizes_and_sequence_lengths(prenorm):
    _, _, converted = prenorm
    converted.eval()
    for batch, seq in [(1, 3), (5, 17), (2, 40)]:
        out = converted(tokens(batch, seq))
        assert out.shape == (batch, seq, 32)


def test_converting_a_converted_model_finds_no_new_sites(prenorm):
    _, toks, converted = prenorm
    converted.eval()
    again = gf.inspect(converted, (toks,))
    assert again.sites == []
    assert any("already converted" in s.reason for s in again.skipped)
    reexported = torch.export.export(converted, (toks,), strict=False)
    assert gf.inspect(reexported, (toks,)).sites == []
    twice = gf.convert(converted, (toks,)).eval()
    with torch.no_grad():
        torch.testing.assert_close(twice(toks), converted(toks))


def test_a_model_without_sites():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    with pytest.raises(gf.NoSitesError, match="no residual site"):
        gf.convert(mlp, (x,), strict=True)
    same = gf.convert(mlp, (x,)).eval()
    assert same.geonorm_report.sites == []
    assert [s.reason for s in same.geonorm_report.skipped] == ["no residual add x + f(x) reads or feeds it"]
    with torch.no_grad():
        torch.testing.assert_close(same(x), mlp(x))


def test_kinds_restricts_the_rewrite():
    model = Stack(PreNormBlock, depth=2).eval()
    toks = tokens()
    kept = gf.convert(model, (toks,), kinds=["post"]).eval()
    assert kept.geonorm_report.sites == []
    assert sum("not in kinds" in s.reason for s in kept.geonorm_report.skipped) == 4
    with torch.no_grad():
        torch.testing.assert_close(kept(toks), model(toks))
    with pytest.raises(gf.NoSitesError):
        gf.convert(model, (toks,), kinds=["post"], strict=True)


def test_graph_module_and_exported_program_inputs_are_used_as_given():
    model = Stack(PreNormBlock, depth=2).eval()
    toks = tokens()
    ep = torch.export.export(model, (toks,), strict=False)
    before = _snapshot(model)
    from_ep = gf.convert(ep, (toks,))
    gm = torch.fx.symbolic_trace(Stack(PostNormBlock, depth=2, final_norm=False))
    from_gm = gf.convert(gm, (toks,))
    assert from_ep.geonorm_report.counts() == {"pre": 4}
    assert from_gm.geonorm_report.counts() == {"post": 4}
    opt = torch.optim.SGD(from_ep.parameters(), lr=1.0)
    from_ep.train()(toks).sum().backward()
    opt.step()
    _assert_same_state(model, before)


def test_learnable_false_adds_no_parameters():
    model = Stack(PreNormBlock, depth=2).eval()
    converted = gf.convert(model, (tokens(),), learnable=False)
    assert {n for n, _ in converted.named_parameters()} == {n for n, _ in model.named_parameters()}
    # the state_dict adds only each update's decay constant (the schedule it was converted with)
    assert set(converted.state_dict()) == set(model.state_dict()) | {f"geonorm.{i}.decay_constant" for i in range(4)}


def test_bad_inputs_raise_clear_errors():
    model = Stack(PreNormBlock, depth=1)
    with pytest.raises(gf.GeoNormError, match="expected a torch.nn.Module"):
        gf.convert("not a model", ())
    with pytest.raises(gf.GeoNormError, match="tracer must be one of"):
        gf.convert(model, (tokens(),), tracer="jit")
    with pytest.raises(gf.ScheduleError, match="unknown schedule"):
        gf.convert(model, (tokens(),), schedule="cosine")
    with pytest.raises(gf.GeoNormError, match="clamp"):
        gf.convert(model, (tokens(),), clamp=-1.0)
    with pytest.raises(gf.GeoNormError, match="args must be a tuple"):
        gf.convert(model, {"tokens": tokens()})


def test_pickling_refuses_with_advice_and_state_dict_saves(prenorm):
    _, _, converted = prenorm
    with pytest.raises(gf.GeoNormError, match="state_dict"):
        pickle.dumps(converted)
    buffer = io.BytesIO()
    torch.save(converted.state_dict(), buffer)
    assert buffer.tell() > 0


def test_converted_forward_keeps_the_source_signature(prenorm):
    model, toks, converted = prenorm
    assert list(inspect.signature(converted.forward).parameters) == ["tokens"]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    ep = torch.export.export(converted.eval(), (toks,), dynamic_shapes={"tokens": {0: batch, 1: seq}}, strict=False)
    other = tokens(3, 9)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(other), converted(other))
