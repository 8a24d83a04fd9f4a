"""Tiny GGUF files for the tests, written with gguf.GGUFWriter the way llama.cpp's
convert_hf_to_gguf.py writes a LlamaForCausalLM: llama.* keys, Q/K rows permuted for interleaved
RoPE, token_embd / blk.N.attn_q ... names, norms in F32, matrices in the asked type."""
from __future__ import annotations

import json

import gguf
import numpy as np

from nbformer.weights.gguf_io import permute_gguf_qk
from nbformer.weights.gguf_tokenizer import write_tokenizer_metadata

CHATML_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
                   "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def hf_llama_tensors(model) -> dict:
    """name -> float32 numpy of a transformers LlamaForCausalLM's state dict."""
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _qtype(name):
    return getattr(gguf.GGMLQuantizationType, name)


def write_llama_gguf(path, hf_cfg, sd: dict, qtype: str = "F32", emb_qtype: str | None = None,
                     tokenizer_json: str | None = None, chat_template: str | None = None, arch: str = "llama",
                     extra_keys=None, skip=(), override=None, permute=True):
    """Write sd (HF LlamaForCausalLM names) as a llama GGUF file. qtype: type of the 2-D matrices
    (F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_1); norms stay F32. Returns {gguf name: float64 array the
    file holds, dequantized} for building float64 references."""
    NH, NKV = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads
    HS = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // NH
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(hf_cfg.num_hidden_layers)
    w.add_context_length(hf_cfg.max_position_embeddings)
    w.add_embedding_length(hf_cfg.hidden_size)
    w.add_feed_forward_length(hf_cfg.intermediate_size)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(hf_cfg.rms_norm_eps))
    w.add_rope_dimension_count(HS)
    w.add_vocab_size(hf_cfg.vocab_size)
    for k, v in (extra_keys or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    if tokenizer_json is not None:
        write_tokenizer_metadata(w, tokenizer_json, bos_token_id=hf_cfg.bos_token_id,
                                 eos_token_id=hf_cfg.eos_token_id, add_bos_token=False, chat_template=chat_template)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(hf_cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        names.update({p + "input_layernorm.weight": b + "attn_norm.weight",
                      p + "self_attn.q_proj.weight": b + "attn_q.weight",
                      p + "self_attn.k_proj.weight": b + "attn_k.weight",
                      p + "self_attn.v_proj.weight": b + "attn_v.weight",
                      p + "self_attn.o_proj.weight": b + "attn_output.weight",
                      p + "post_attention_layernorm.weight": b + "ffn_norm.weight",
                      p + "mlp.gate_proj.weight": b + "ffn_gate.weight",
                      p + "mlp.up_proj.weight": b + "ffn_up.weight",
                      p + "mlp.down_proj.weight": b + "ffn_down.weight"})
        for x in "qkv":  # Qwen2's biases
            names[p + f"self_attn.{x}_proj.bias"] = b + f"attn_{x}.bias"
    held = {}
    tied = bool(getattr(hf_cfg, "tie_word_embeddings", False))
    for hf_name, a in sd.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        name = names[hf_name]
        if name in skip:
            continue
        a = np.ascontiguousarray(a, dtype=np.float32)
        if permute and name.endswith(("attn_q.weight", "attn_q.bias")):
            a = permute_gguf_qk(a, NH)
        elif permute and name.endswith(("attn_k.weight", "attn_k.bias")):
            a = permute_gguf_qk(a, NKV)
        if override and name in override:
            a = override[name]
        t = qtype if a.ndim == 2 else "F32"
        if name == "token_embd.weight" and emb_qtype is not None:
            t = emb_qtype
        if t == "F32":
            w.add_tensor(name, a)
            held[name] = a.astype(np.float64)
        elif t == "F16":
            w.add_tensor(name, a.astype(np.float16))
            held[name] = a.astype(np.float16).astype(np.float64)
        else:
            q = gguf.quants.quantize(a, _qtype(t))
            w.add_tensor(name, q, raw_dtype=_qtype(t))
            held[name] = gguf.quants.dequantize(q, _qtype(t)).astype(np.float64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def tiny_tokenizer_json(texts=None, vocab_size=300, digits=True):
    """A byte-level BPE (SmolLM2's layout: single digits, then GPT-2's split) with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = texts or ["Hello world, the capital of France is Paris. 12345 café naïve 😀",
                      "def f(x):\n    return x ** 2\n", "What is the capital of Italy? Rome!"] * 20
    tok = Tokenizer(models.BPE())
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bl]) if digits else bl
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, tr)
    return tok.to_str()


def tokenizer_size(tokenizer_json: str) -> int:
    d = json.loads(tokenizer_json)
    return max(list(d["model"]["vocab"].values()) + [a["id"] for a in d["added_tokens"]]) + 1


def write_gpt2_gguf(path, hf_cfg, sd: dict, qtype: str = "F32", tokenizer_json: str | None = None):
    """A transformers GPT2LMHeadModel state dict as llama.cpp's convert_hf_to_gguf writes it (arch
    'gpt2': Conv1D weights transposed to (out, in), attn_qkv fused, position_embd)."""
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_name("tiny-gpt2")
    w.add_block_count(hf_cfg.n_layer)
    w.add_context_length(hf_cfg.n_positions)
    w.add_embedding_length(hf_cfg.n_embd)
    w.add_feed_forward_length(hf_cfg.n_inner or 4 * hf_cfg.n_embd)
    w.add_head_count(hf_cfg.n_head)
    w.add_layer_norm_eps(float(hf_cfg.layer_norm_epsilon))
    if tokenizer_json is not None:
        write_tokenizer_metadata(w, tokenizer_json, bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id)
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
    for i in range(hf_cfg.n_layer):
        p, b = f"transformer.h.{i}.", f"blk.{i}."
        for hf, g in (("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
                      ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")):
            names[p + hf + ".weight"], names[p + hf + ".bias"] = b + g + ".weight", b + g + ".bias"
    for hf_name, a in sd.items():
        if hf_name not in names:  # lm_head (tied), attn.bias buffers
            continue
        name = names[hf_name]
        a = np.ascontiguousarray(a, dtype=np.float32)
        if hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            a = np.ascontiguousarray(a.T)
        if a.ndim == 2 and qtype != "F32" and name != "position_embd.weight":
            w.add_tensor(name, gguf.quants.quantize(a, _qtype(qtype)), raw_dtype=_qtype(qtype))
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
