"""The models of the performance table (issue 5), built offline from Hugging Face configs."""
from __future__ import annotations

import torch


def table_model(name: str, *, width: int = 512, blocks: int = 8, batch: int = 4, seq: int = 256,
                vocab: int = 8192):
    """``(model, args)`` for ``name`` in ``llama`` (Pre-Norm, RMSNorm), ``gpt2`` (Pre-Norm, LayerNorm),
    ``bert`` (Post-Norm, LayerNorm): base models (no LM head, whose matmul would dilute the overhead),
    random init, eval mode, ``batch x seq`` token ids."""
    import transformers as tf

    heads = max(1, width // 64)
    if name == "llama":
        config = tf.LlamaConfig(hidden_size=width, intermediate_size=int(width * 8 / 3 + 63) // 64 * 64,
                                num_hidden_layers=blocks, num_attention_heads=heads, num_key_value_heads=heads,
                                vocab_size=vocab, max_position_embeddings=max(seq, 512), use_cache=False)
        model = tf.LlamaModel(config)
    elif name == "gpt2":
        config = tf.GPT2Config(n_embd=width, n_layer=blocks, n_head=heads, vocab_size=vocab,
                               n_positions=max(seq, 512), use_cache=False)
        model = tf.GPT2Model(config)
    elif name == "bert":
        config = tf.BertConfig(hidden_size=width, num_hidden_layers=blocks, num_attention_heads=heads,
                               intermediate_size=4 * width, vocab_size=vocab, max_position_embeddings=max(seq, 512))
        model = tf.BertModel(config, add_pooling_layer=False)
    else:
        raise ValueError(f"unknown table model {name!r}: use llama, gpt2 or bert")
    generator = torch.Generator().manual_seed(0)
    return model.eval(), (torch.randint(0, vocab, (batch, seq), generator=generator),)
