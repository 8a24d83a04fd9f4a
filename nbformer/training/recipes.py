"""Model configs nbformer trains from scratch."""
from __future__ import annotations

from ..config import ModelConfig
from ..errors import InputError


def seq2seq_config(vocab_size: int, d_model: int, enc_layers: int, dec_layers: int, heads: int, d_ff: int,
                   norm: str = "post", activation: str = "relu", positions: str = "sinusoidal",
                   max_positions: int = 512, pad_id: int = 0, eos_id: int = 1) -> ModelConfig:
    """The original Transformer ("Attention Is All You Need"): sinusoidal positions, post-LN
    (pre-LN adds a final LayerNorm to encoder and decoder), ReLU FFN, one embedding matrix shared
    by source, target and output projection, embeddings scaled by sqrt(d_model). Decoding starts
    from the pad token, as Marian does."""
    for name, v in (("d_model", d_model), ("layers", enc_layers), ("decoder layers", dec_layers),
                    ("heads", heads), ("d_ff", d_ff)):
        if not isinstance(v, int) or v < 1:
            raise InputError(f"{name}: expected a positive integer, got {v!r}")
    if d_model % heads:
        raise InputError(f"heads: d_model {d_model} is not divisible by {heads} heads")
    return ModelConfig(arch="encoder_decoder", vocab_size=vocab_size, d_model=d_model, n_heads=heads,
                       n_layers=enc_layers, n_decoder_layers=dec_layers, d_ff=d_ff, max_positions=max_positions,
                       norm=norm, activation=activation, positions=positions, final_layernorm=norm == "pre",
                       embedding_layernorm=False, tie_word_embeddings=True, embedding_scale=d_model ** 0.5,
                       lm_head=True, lm_head_bias=False, qkv_bias=True, pad_token_id=pad_id, padding_idx=None,
                       eos_token_id=eos_id, decoder_start_token_id=pad_id)


def seq2seq_tokens(cfg: ModelConfig | None, tok, where) -> tuple:
    """-> (decoder start, eos, pad) ids: from the model config when fine-tuning, else from the
    tokenizer's <pad> and </s> tokens."""
    if cfg is not None:
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.bos_token_id
        missing = [n for n, v in (("decoder_start_token_id", start), ("eos_token_id", cfg.eos_token_id),
                                  ("pad_token_id", cfg.pad_token_id)) if v is None]
        if missing:
            raise InputError(f"{where}: the model config has no {', '.join(missing)}; encoder-decoder training "
                             f"needs them")
        return int(start), int(cfg.eos_token_id), int(cfg.pad_token_id)
    pad, eos = tok.token_to_id("<pad>"), tok.token_to_id("</s>")
    if pad is None or eos is None:
        raise InputError(f"{where}: an encoder-decoder tokenizer needs '<pad>' and '</s>' tokens")
    return pad, eos, pad
