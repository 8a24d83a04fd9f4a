"""Write a GPT-2 or Llama-family model as a quantized GGUF file (`nbformer quantize`).

The file follows llama.cpp's own conventions, so llama.cpp, the `gguf` reader and nbformer.load
all take it:

* architecture keys as convert_hf_to_gguf.py writes them ('llama.*' / 'gpt2.*'), general.file_type
  (LlamaFileType MOSTLY_Q8_0 / Q4_0 / Q4_1) and general.quantization_version;
* tensor names of llama.cpp: llama: blk.N.attn_q / attn_k / attn_v (Q and K rows permuted for
  llama.cpp's interleaved RoPE pairs, exactly convert_hf_to_gguf's `permute`), attn_output,
  ffn_gate / ffn_up / ffn_down, attn_norm / ffn_norm, output_norm, output (untied only);
  gpt2: position_embd, blk.N.attn_qkv (fused, (3C, C)), attn_output, ffn_up / ffn_down with their
  biases, attn_norm / ffn_norm with biases, output_norm, output (untied only);
* every linear weight in the chosen block type; norms, biases and position embeddings F32; the
  token embedding in `token_embedding` (default Q8_0, as llama.cpp's own Q4_1 SmolLM2-135M file
  stores it; 'f16' / 'f32' keep it float);
* rotary scaling as convert_hf_to_gguf writes it: 'linear' as llama.rope.scaling.type / factor,
  'llama3' (and frequency factors read from a GGUF file) as the F32 rope_freqs.weight tensor of
  HS/2 divisors of the frequencies (llama.cpp's freq_factors);
* the tokenizer (tokenizer.ggml.*, from the model's tokenizer.json) and chat template, so the file
  is self-contained.

Quantization is nbformer.quant.quantize, bit-identical to ggml's reference quantizers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError
from .formats import QuantizedTensor, dequantize, qtype_of, quantize

FAMILIES = ("gpt2", "llama")
EMBEDDING_TYPES = ("q8_0", "q4_0", "q4_1", "f16", "f32")


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: per head, rows (2, HS/2) -> (HS/2, 2)."""
    w = np.asarray(w)
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _float_params(ckpt) -> dict:
    """Canonical float32 arrays of every parameter (quantized inputs dequantized)."""
    out = {}
    for k, v in ckpt.params.items():
        out[k] = dequantize(v) if isinstance(v, QuantizedTensor) else np.asarray(v, dtype=np.float32)
    for k, v in (getattr(ckpt, "quantized", None) or {}).items():
        if k not in out:
            out[k] = dequantize(v)
    return out


def _tokenizer_text(ckpt):
    if ckpt.tokenizer_file is not None:
        return Path(ckpt.tokenizer_file).read_text(encoding="utf-8")
    factory = getattr(ckpt, "tokenizer_json", None)
    if factory is not None:
        return factory() if callable(factory) else str(factory)
    return ckpt.metadata.get("nbformer_tokenizer")


def _chat_template(ckpt):
    tmpl = ckpt.metadata.get("chat_template")
    if isinstance(tmpl, str):
        return tmpl
    d = ckpt.model_dir
    if d is not None and (Path(d) / "tokenizer_config.json").exists():
        try:
            tc = json.loads((Path(d) / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        t = tc.get("chat_template")
        if isinstance(t, str):
            return t
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            for item in t:
                if isinstance(item, dict) and item.get("name") == "default" and isinstance(item.get("template"), str):
                    return item["template"]
    return None


def write_quantized_gguf(ckpt, path, qtype="q8_0", token_embedding: str = "q8_0", name: str | None = None,
                         tokenizer: bool = True) -> dict:
    """Write checkpoint `ckpt` (weights.Checkpoint of a gpt2 or llama model) to `path` as GGUF with
    its linear weights in `qtype`. -> a summary {'path', 'tensors': {name: type}, 'bytes'}."""
    import gguf

    t = qtype_of(qtype)
    emb_type = str(token_embedding).lower()
    if emb_type not in EMBEDDING_TYPES:
        raise InputError(f"--token-embedding: {token_embedding!r}, expected one of {', '.join(EMBEDDING_TYPES)}")
    cfg = ckpt.config
    if cfg.family not in FAMILIES or cfg.arch != "decoder":
        raise ConfigError(f"{ckpt.path}: nbformer quantize writes GPT-2 and Llama-family decoders; this model is "
                          f"a {cfg.family} {cfg.arch}")
    arch = "llama" if cfg.family == "llama" else "gpt2"
    for what, n in (("d_model", cfg.d_model), ("d_ff", cfg.d_ff), ("attention width", cfg.attn_width)):
        if n % 32:
            raise InputError(f"{ckpt.path}: {what} = {n} is not a multiple of 32, so the {t.name.upper()} blocks "
                             f"of 32 weights per row do not fit")
    p = _float_params(ckpt)
    text = _tokenizer_text(ckpt) if tokenizer else None
    if tokenizer and text is None:
        raise InputError(f"{ckpt.path}: no tokenizer.json to embed in the GGUF file (pass --no-tokenizer to write "
                         f"the weights alone)")
    path = Path(path)
    QT = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), arch)
    written = {}

    def lin(gname, a):
        q = quantize(a, t, what=gname)
        w.add_tensor(gname, q.data, raw_dtype=QT[t.name.upper()])
        written[gname] = t.name.upper()

    def f32(gname, a):
        w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
        written[gname] = "F32"

    def embedding(gname, a):
        if emb_type == "f32":
            f32(gname, a)
        elif emb_type == "f16":
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float16))
            written[gname] = "F16"
        else:
            q = quantize(a, emb_type, what=gname)
            w.add_tensor(gname, q.data, raw_dtype=QT[emb_type.upper()])
            written[gname] = emb_type.upper()

    # ---- metadata
    w.add_name(name or cfg.extra.get("gguf", {}).get("name") or Path(ckpt.path).stem)
    w.add_context_length(cfg.max_positions)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_head_count_kv(cfg.kv_heads)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.layer_norm_eps))
        w.add_rope_dimension_count(cfg.head_size)
        if cfg.head_dim is not None and cfg.head_dim * cfg.n_heads != cfg.d_model:
            w.add_key_length(cfg.head_size)
            w.add_value_length(cfg.head_size)
        if cfg.rope_scaling == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(cfg.rope_factor))
        # llama3 scaling (and frequency factors read from a GGUF file) as convert_hf_to_gguf writes them:
        # no scaling type key, a rope_freqs tensor of per-dimension divisors of the frequencies
        if cfg.rope_scaling == "llama3" or cfg.rope_freq_factors:
            from ..weights.positions import rope_freq_factors_of

            f32(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freq_factors_of(cfg))
    else:
        w.add_layer_norm_eps(float(cfg.layer_norm_eps))
    w.add_file_type({"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                     "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[t.name])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if text is not None:
        from ..weights.gguf_tokenizer import write_tokenizer_metadata

        write_tokenizer_metadata(w, text, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                 pad_token_id=cfg.pad_token_id, chat_template=_chat_template(ckpt))

    # ---- tensors
    embedding("token_embd.weight", p["tok_emb"])
    if arch == "gpt2":
        f32("position_embd.weight", p["pos_emb"])
    NH, NKV, HS, F = cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.d_ff
    A, KVW = NH * HS, NKV * HS
    for i in range(cfg.n_layers):
        h, b = f"h{i}.", f"blk.{i}."
        f32(b + "attn_norm.weight", p[h + "ln1.w"])
        if h + "ln1.b" in p:
            f32(b + "attn_norm.bias", p[h + "ln1.b"])
        qkv = p[h + "attn.qkv.w"]
        if arch == "gpt2":
            lin(b + "attn_qkv.weight", qkv)
            if h + "attn.qkv.b" in p:
                f32(b + "attn_qkv.bias", p[h + "attn.qkv.b"])
        else:
            lin(b + "attn_q.weight", permute_qk(qkv[:A], NH))
            lin(b + "attn_k.weight", permute_qk(qkv[A:A + KVW], NKV))
            lin(b + "attn_v.weight", qkv[A + KVW:])
            if h + "attn.qkv.b" in p:
                qb = p[h + "attn.qkv.b"]
                f32(b + "attn_q.bias", permute_qk(qb[:A], NH))
                f32(b + "attn_k.bias", permute_qk(qb[A:A + KVW], NKV))
                f32(b + "attn_v.bias", qb[A + KVW:])
        lin(b + "attn_output.weight", p[h + "attn.out.w"])
        if h + "attn.out.b" in p:
            f32(b + "attn_output.bias", p[h + "attn.out.b"])
        f32(b + "ffn_norm.weight", p[h + "ln2.w"])
        if h + "ln2.b" in p:
            f32(b + "ffn_norm.bias", p[h + "ln2.b"])
        if cfg.ffn_type == "glu":
            gu = p[h + "ffn.gate_up.w"]
            lin(b + "ffn_gate.weight", gu[:F])
            lin(b + "ffn_up.weight", gu[F:])
            if h + "ffn.gate_up.b" in p:
                f32(b + "ffn_gate.bias", p[h + "ffn.gate_up.b"][:F])
                f32(b + "ffn_up.bias", p[h + "ffn.gate_up.b"][F:])
        else:
            lin(b + "ffn_up.weight", p[h + "ffn.up.w"])
            if h + "ffn.up.b" in p:
                f32(b + "ffn_up.bias", p[h + "ffn.up.b"])
        lin(b + "ffn_down.weight", p[h + "ffn.down.w"])
        if h + "ffn.down.b" in p:
            f32(b + "ffn_down.bias", p[h + "ffn.down.b"])
    f32("output_norm.weight", p["final_ln.w"])
    if "final_ln.b" in p:
        f32("output_norm.bias", p["final_ln.b"])
    if not cfg.tie_word_embeddings:
        lin("output.weight", p["lm_head.w"])
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return {"path": str(path), "tensors": written, "bytes": path.stat().st_size, "type": t.name}
