"""Tiny Hugging Face causal LMs with their stock configs (``use_cache=True``), for the in-place install tests.

Only sizes are small; ``eos_token_id`` is unset so that greedy generation always makes the requested number of
tokens (a random model hits any EOS id early)."""
from __future__ import annotations

import torch

VOCAB = 96


def causal_lm(name: str, seed: int = 0):
    """``(model, ids)``: a randomly initialised tiny ``name`` in ``("qwen2", "llama", "gpt2")`` in eval mode,
    and a (2, 8) prompt."""
    import transformers

    torch.manual_seed(seed)
    if name == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       eos_token_id=None, pad_token_id=0)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       eos_token_id=None, bos_token_id=None, pad_token_id=0)
        model = transformers.LlamaForCausalLM(cfg)
    elif name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      eos_token_id=None, bos_token_id=None, pad_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(name)
    model.eval()
    ids = torch.randint(1, VOCAB, (2, 8))
    return model, ids


def copy_updates(installed, converted) -> None:
    """Load the installed model's updates into the converted module, site by site (both reports list the
    sites in graph order)."""
    state = installed.state_dict()
    sites_a, sites_b = installed.geonorm_report.sites, converted.geonorm_report.sites
    assert [(s.kind, s.block, s.path) for s in sites_a] == [(s.kind, s.block, s.path) for s in sites_b]
    mapped = {f"{b.update}.{name}": state[f"{a.update}.{name}"]
              for a, b in zip(sites_a, sites_b) for name in ("scale", "bias", "decay_constant")}
    result = converted.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys


def perturb_updates(model, seed: int = 1) -> None:
    """Move every update's scale and bias away from their initial values (so a test sees whether each update
    runs with the parameters it should)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "geonorm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
