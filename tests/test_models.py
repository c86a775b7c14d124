"""The model zoo end to end: Hugging Face models built offline from tiny configs, nn.TransformerEncoder.

Numerics against a reference built with forward hooks on the *source* model: at every site the
branch output ``s`` is replaced so that the model's own residual add yields ``Geo_k(x, s)``.
"""
import pytest
import torch

import geonorm_fx as gf
from geonorm_fx import zoo

from .reference import reference_geodesic

pytest.importorskip("transformers")

TWO_BY_TWO = ([0, 0, 1, 1], [1.0, 1.0, 0.5, 0.5])
EXPECTED = {
    # spec: (site counts, blocks per stream, block of each site, decay of each site, skipped reasons (prefixes))
    "hf:gpt2": ({"pre": 4}, [2], *TWO_BY_TWO, ["final norm"]),
    "hf:bert": ({"post": 4}, [2], *TWO_BY_TWO, ["embedding norm"]),
    "hf:llama": ({"pre": 4}, [2], *TWO_BY_TWO, ["final norm"]),
    "hf:vit": ({"pre": 4}, [2], *TWO_BY_TWO, ["final norm"]),
    "hf:t5": ({"pre": 4}, [2], *TWO_BY_TWO, ["final norm"]),
    "hf:t5-full": ({"pre": 10}, [2, 2], [0, 0, 1, 1, 0, 0, 0, 1, 1, 1],
                   [1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5], ["final norm"] * 2),
    "hf:gemma2": ({"sandwich": 4}, [2], *TWO_BY_TWO, ["final norm"]),
    "hf:olmo2": ({"respost": 4}, [2], *TWO_BY_TWO, ["off the residual stream"] * 4 + ["final norm"]),
    "hf:gpt-neox": ({"parallel": 2}, [2], [0, 1], [1.0, 0.5], ["final norm"]),
    "hf:albert": ({"post": 8}, [4], [0, 0, 1, 1, 2, 2, 3, 3], [1, 1, 1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 4, 1 / 4],
                  ["embedding norm"]),
    "torch:encoder-pre": ({"pre": 4}, [2], *TWO_BY_TWO, []),
    "torch:encoder-post": ({"post": 4}, [2], *TWO_BY_TWO, []),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def converted(request):
    built = zoo.load(request.param)
    return request.param, built, gf.convert(built.model, built.args, built.kwargs)


def test_site_counts_blocks_and_skips(converted):
    spec, built, module = converted
    counts, per_stream, blocks, decays, skipped = EXPECTED[spec]
    report = module.geonorm_report
    assert report.counts() == counts
    for graph in module._geonorm_graphs.values():
        graph.lint()
    assert report.blocks_per_stream == per_stream
    assert [s.block for s in report.sites] == blocks
    assert [s.decay for s in report.sites] == pytest.approx(decays)
    assert all(s.path for s in report.sites)
    assert [s.reason.split(":")[0] for s in report.skipped] == skipped
    assert report.to_dict()["counts"] == counts


def test_runs_at_other_shapes_and_keeps_output_structure(converted):
    spec, built, module = converted
    module.eval()
    x = built.args[0]
    bigger = torch.randint(0, 100, (3, 13)) if not x.is_floating_point() else torch.randn(3, *x.shape[1:])
    kwargs = {k: torch.randint(0, 100, (3, 5)) for k in built.kwargs}
    with torch.no_grad():
        src_out = built.model(bigger, **kwargs)
        out = module(bigger, **kwargs)
    assert type(out) is type(src_out)
    first = out[0] if not isinstance(out, torch.Tensor) else out
    ref = src_out[0] if not isinstance(src_out, torch.Tensor) else src_out
    assert first.shape == ref.shape and torch.isfinite(first).all()


def _hook_reference(model, pairs, args):
    """Run ``model`` with each site turned into a geodesic update: ``reader`` is the first module that
    reads the stream ``x`` (its input is captured), ``branch`` the module whose output is the branch
    output ``s``; the hook makes the model's own ``x + s`` compute ``Geo(x, s)``."""
    handles = []
    for reader, branch, decay in pairs:
        state = {}
        handles.append(reader.register_forward_pre_hook(
            lambda m, inp, kw, st=state: st.update(x=inp[0] if inp else kw["hidden_states"]), with_kwargs=True))

        def hook(m, inp, out, st=state, d=decay):
            s = out[0] if isinstance(out, tuple) else out
            step = reference_geodesic(st["x"], s, d) - st["x"]
            return (step,) + tuple(out[1:]) if isinstance(out, tuple) else step
        handles.append(branch.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(*args)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("spec", ["hf:gpt2", "hf:llama", "hf:gemma2", "hf:olmo2"])
def test_hf_models_match_the_hook_reference(spec):
    built = zoo.load(spec)
    model = built.model
    module = gf.convert(model, built.args).eval()
    if spec == "hf:gpt2":
        layers = model.transformer.h
        pairs = [(b.ln_1, b.attn, 1 / (k + 1)) for k, b in enumerate(layers)]
        pairs += [(b.ln_2, b.mlp, 1 / (k + 1)) for k, b in enumerate(layers)]
    elif spec == "hf:llama":
        layers = model.model.layers
        pairs = [(b.input_layernorm, b.self_attn, 1 / (k + 1)) for k, b in enumerate(layers)]
        pairs += [(b.post_attention_layernorm, b.mlp, 1 / (k + 1)) for k, b in enumerate(layers)]
    elif spec == "hf:gemma2":  # sandwich: x + N2(f(N1(x))); the hook replaces N2's output
        layers = model.model.layers
        pairs = [(b.input_layernorm, b.post_attention_layernorm, 1 / (k + 1)) for k, b in enumerate(layers)]
        pairs += [(b.pre_feedforward_layernorm, b.post_feedforward_layernorm, 1 / (k + 1))
                  for k, b in enumerate(layers)]
    else:  # respost: x + N(f(x)); x is the input of the attention / MLP module itself
        layers = model.model.layers
        pairs = [(b.self_attn, b.post_attention_layernorm, 1 / (k + 1)) for k, b in enumerate(layers)]
        pairs += [(b.mlp, b.post_feedforward_layernorm, 1 / (k + 1)) for k, b in enumerate(layers)]
    expected = _hook_reference(model, pairs, built.args).logits
    with torch.no_grad():
        got = module(*built.args).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert (got - model(*built.args).logits).abs().max() > 1e-3  # GeoNorm really changed the function


def test_postnorm_bert_matches_the_hook_reference():
    built = zoo.load("hf:bert")
    model = built.model
    module = gf.convert(model, built.args).eval()
    handles = []
    for k, layer in enumerate(model.encoder.layer):
        for out_module in (layer.attention.output, layer.output):
            def hook(m, inp, out, d=1 / (k + 1)):
                hidden, residual = inp
                return reference_geodesic(residual, m.dropout(m.dense(hidden)), d)
            handles.append(out_module.register_forward_hook(hook))
    with torch.no_grad():
        expected = model(*built.args)
    for h in handles:
        h.remove()
    with torch.no_grad():
        got = module(*built.args)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-4, rtol=1e-4)


def test_hf_attention_dropout_follows_the_mode():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, use_cache=False,
                                  attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    module = gf.convert(model, (ids,))
    train_graph = str(module.train().graph)
    eval_graph = str(module.eval().graph)
    assert "0.5" in train_graph and "scaled_dot_product_attention" in train_graph
    with torch.no_grad():
        a, b = module(ids).logits, module(ids).logits
        torch.testing.assert_close(a, b)
        module.train()
        c, d = module(ids).logits, module(ids).logits
    assert not torch.allclose(c, d)
    assert eval_graph != train_graph
