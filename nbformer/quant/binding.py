"""A Model's quantized weights: sorting a checkpoint's tensors into float32 params and quantized
ones, and binding the quantized bytes on a device (one uint8 buffer per model per device)."""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .formats import QUANT_KEY, QuantizedTensor

ALIGN = 64  # every tensor of the quantized buffer starts on a 64-byte boundary


def split_quantized(ckpt) -> dict:
    """Move QuantizedTensor values of ckpt.params into ckpt.quantized, give a tied head's quantized
    table a float32 twin for the lookup, and record {name: qtype} in the config (extra['quantized'])
    so that every graph built from it reads those weights quantized. -> ckpt.quantized."""
    quant = dict(getattr(ckpt, "quantized", None) or {})
    params = {}
    for k, v in ckpt.params.items():
        if isinstance(v, QuantizedTensor):
            quant[k] = v
        else:
            params[k] = v
    cfg = ckpt.config
    if "tok_emb" in quant:
        if "tok_emb" not in params:
            params["tok_emb"] = quant["tok_emb"].dequantize()
        if not (cfg.lm_head and cfg.tie_word_embeddings):
            del quant["tok_emb"]  # only the lookup reads it: float32 is all it needs
    for k, v in quant.items():
        if not isinstance(v, QuantizedTensor):
            raise InputError(f"{ckpt.path}: quantized weight '{k}' is a {type(v).__name__}, expected a "
                             f"QuantizedTensor")
    ckpt.params, ckpt.quantized = params, quant
    names = {k: v.qtype.name for k, v in quant.items()}
    if names != dict(cfg.extra.get(QUANT_KEY) or {}):
        extra = {k: v for k, v in cfg.extra.items() if k != QUANT_KEY}
        if names:
            extra[QUANT_KEY] = names
        ckpt.config = cfg.replace(extra=extra)
    return quant


def bind_quantized(dev, quant: dict, what: str) -> tuple:
    """-> (buffer or None, {'<name>.q': (M, row_bytes) uint8 array on dev}). The CPU binds the
    bytes as they are (a GGUF's memory map); a GPU gets one uploaded buffer."""
    if not quant:
        return None, {}
    if dev.kind == "cpu":
        return None, {k + ".q": np.ascontiguousarray(q.data) for k, q in quant.items()}
    offs, n = {}, 0
    for k, q in quant.items():
        offs[k] = n
        n += (q.nbytes + ALIGN - 1) // ALIGN * ALIGN
    dev.ensure_fits(n, what)
    host = np.zeros(max(n, 1), dtype=np.uint8)
    for k, q in quant.items():
        host[offs[k]: offs[k] + q.nbytes] = q.data.reshape(-1)
    buf = dev.upload(host)
    return buf, {k + ".q": dev.view(buf, offs[k], q.data.shape) for k, q in quant.items()}


def refuse_training(ckpt, what: str | None = None):
    """InputError when ckpt keeps weights quantized: quantized models run inference only."""
    q = getattr(ckpt, "quantized", None) or {}
    if q:
        kinds = ", ".join(sorted({t.qtype.name.upper() for t in q.values()}))
        raise InputError(f"{what or ckpt.path}: this model keeps {len(q)} weights quantized ({kinds}); quantized "
                         f"models run inference only, so gradients and training need a float checkpoint (a Hugging "
                         f"Face directory, or a GGUF of F32/F16 tensors)")


def quantized_bytes(quant: dict) -> int:
    return sum(q.nbytes for q in quant.values())
