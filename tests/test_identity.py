"""The detector proves itself: the Pre-Norm identity (GEONORM.md section 6) holds on every Pre-Norm model
of the suite, so the detected sites really are the residual stream."""
import pytest
import torch

import geonorm_fx as gf
from geonorm_fx import zoo

from .tiny import NORM_SPELLINGS, OddNormsModel, PostNormBlock, PreNormBlock, Stack, tokens


def _small_eps(model):
    """The identity needs norms that are scale-invariant in practice: eps far below the stream's scale."""
    for m in model.modules():
        for attr in ("eps", "variance_epsilon"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 1e-12)
    return model


@pytest.mark.parametrize("spelling", NORM_SPELLINGS)
def test_identity_on_hand_written_prenorm_stacks(spelling):
    model = _small_eps(Stack(PreNormBlock, depth=4, spelling=spelling)).eval()
    assert gf.prenorm_identity_gap(model, (tokens(),)) < 1e-3


@pytest.mark.parametrize("spec", ["hf:gpt2", "hf:llama", "hf:vit", "hf:t5", "hf:t5-full"])
def test_identity_on_hugging_face_prenorm_models(spec):
    pytest.importorskip("transformers")
    built = zoo.load(spec)
    assert gf.prenorm_identity_gap(_small_eps(built.model), built.args, built.kwargs) < 1e-3


def test_identity_on_sequential_gpt_neox_and_torch_encoder():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, use_parallel_residual=False, use_cache=False)
    neox = _small_eps(transformers.GPTNeoXForCausalLM(cfg)).eval()
    assert gf.prenorm_identity_gap(neox, (tokens(vocab=64),)) < 1e-3
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    enc = torch.nn.TransformerEncoder(layer, 3, norm=torch.nn.LayerNorm(16, eps=1e-12), enable_nested_tensor=False)
    assert gf.prenorm_identity_gap(_small_eps(enc).eval(), (torch.randn(2, 5, 16),)) < 1e-3


def test_identity_with_qk_norms_and_embedding_norm():
    assert gf.prenorm_identity_gap(_small_eps(OddNormsModel()).eval(), (tokens(),)) < 1e-3


def test_identity_detects_a_wrong_stream():
    """Rescaling something that is not the residual stream changes the output: the check can fail."""
    model = _small_eps(Stack(PreNormBlock, depth=3, final_norm=False)).eval()  # no final norm: not invariant
    assert gf.prenorm_identity_gap(model, (tokens(),)) > 1e-2


def test_identity_refuses_post_norm_models():
    with pytest.raises(gf.GeoNormError, match="pure Pre-Norm"):
        gf.prenorm_identity_gap(Stack(PostNormBlock, depth=2, final_norm=False).eval(), (tokens(),))



def test_identity_gap_applies_both_identities():
    """``identity_gap`` (CONTRACT additions): the Pre-Norm identity on pre sites, the Post-Norm identity on
    post sites, on an affine-free copy; the source model is not changed."""
    post = Stack(PostNormBlock, depth=3, spelling="hand_rms").eval()
    before = {k: v.clone() for k, v in post.state_dict().items()}
    assert gf.identity_gap(post, (tokens(),)) < 1e-3
    assert all(torch.equal(v, post.state_dict()[k]) for k, v in before.items())
    assert gf.identity_gap(Stack(PreNormBlock, depth=3).eval(), (tokens(),)) < 1e-3
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=False)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    assert gf.identity_gap(enc, (torch.randn(2, 5, 16),)) < 1e-3


def test_identity_gap_needs_no_hand_made_small_eps():
    """The copy gets eps 1e-12 from the module tree, so large norm epsilons do not blur the identity."""
    model = Stack(PreNormBlock, depth=3).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 0.5
    assert gf.prenorm_identity_gap(model, (tokens(),)) < 1e-3
    assert model.blocks[0].norm1.eps == 0.5


def test_identity_module_keeps_its_names():
    from geonorm_fx.identity import identity_gap, prenorm_identity_gap
    assert identity_gap is gf.identity_gap and prenorm_identity_gap is gf.prenorm_identity_gap
