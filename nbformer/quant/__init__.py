"""Quantized weights kept quantized: ggml's Q8_0 / Q4_0 / Q4_1 block formats (formats.py), their
float64 reference matmul (reference.py), and what a Model needs to hold some linear weights
quantized.

How a quantized model is put together (the interface between loaders and the runtime):

* A loader (GGUF) gives `Checkpoint.quantized`: canonical parameter name -> QuantizedTensor, for
  the linear weights it keeps quantized (`attn.qkv.w`, `attn.out.w`, `ffn.gate_up.w` / `ffn.up.w`,
  `ffn.down.w`, `lm_head.w`), and leaves those names out of `Checkpoint.params` (float32 only).
  Fused weights are row concatenations (QuantizedTensor.concat: Q | K | V, gate | up), GGUF's
  Q/K row permutation is a row reorder (take_rows): both exact on blocks.
  A tied output head reading a quantized token embedding: `quantized['tok_emb']` holds the
  quantized table for the LM head while `params['tok_emb']` keeps the float32 table (dequantized)
  for the embedding lookup. (A QuantizedTensor found in `params` is moved there by the Model.)
* The Model records {name: qtype} in `config.extra['quantized']`; the graph builder then emits
  `qlinear` / `qlinear_glu` nodes reading a uint8 param tensor `<name>.q` (M, row_bytes) instead
  of a `linear` on the float32 weight; quantized bytes live in their own buffer (one per model
  per device) beside the flat float32 parameters.
* Training a quantized model is refused with a clear error (dequantize it first).

`linear_weight_from_record` is the hook GGUF loading calls for each linear weight.
"""
from .formats import (BY_GGML, Q4_0, Q4_1, Q8_0, QK, QTYPES, QUANT_KEY, QType, QuantizedTensor, check_k, dequantize,
                      dequantize64, qtype_of, quantize, row_bytes, unpack)
from .reference import qlinear_glu_reference, qlinear_reference

KEEP_QUANTIZED = ("q8_0", "q4_0", "q4_1")


def quantized_names(cfg) -> dict:
    """{canonical name: qtype name} of the weights a config's graphs read quantized."""
    return dict(cfg.extra.get(QUANT_KEY) or {})


def q_param_name(name: str) -> str:
    """The graph tensor holding the packed bytes of canonical weight `name`."""
    return name + ".q"


__all__ = ["QK", "QType", "QTYPES", "Q8_0", "Q4_0", "Q4_1", "BY_GGML", "QuantizedTensor", "quantize", "dequantize",
           "dequantize64", "unpack", "qtype_of", "row_bytes", "check_k", "qlinear_reference",
           "qlinear_glu_reference", "KEEP_QUANTIZED", "QUANT_KEY", "quantized_names", "q_param_name"]
