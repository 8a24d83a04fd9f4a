"""ggml block formats Q8_0, Q4_0 and Q4_1, byte for byte as ggml lays them out, in NumPy.

A quantized weight (M, K) in the nn.Linear layout (out_features, in_features) is M rows of
K / 32 blocks, each block 32 consecutive weights of one row:

  Q8_0  34 bytes: d (fp16) | qs[32] int8                 w = d * q
  Q4_0  18 bytes: d (fp16) | qs[16] two 4-bit q per byte  w = d * (q - 8)
  Q4_1  20 bytes: d (fp16) | m (fp16) | qs[16]            w = d * q + m

Nibble order as ggml: byte t of qs holds weight t in its low nibble and weight t + 16 in its
high nibble. fp16 values are little-endian. A GGUF tensor of ggml type Q*_ with ne = (K, M)
is exactly these bytes, one row after another, so data read from a GGUF file is used as is
(`QuantizedTensor.from_ggml`) and data written here is what `gguf.GGUFWriter` expects
(`QuantizedTensor.data`, with raw_dtype = the ggml type).

quantize() reproduces ggml's reference quantizers (quantize_row_q8_0_ref & co. in
ggml-quants.c, and gguf-py's quants.py) bit for bit: the scale is computed in float32 and its
inverse taken before the fp16 rounding; Q8_0 rounds half away from zero, Q4_0 / Q4_1 truncate
after adding 8.5 / 0.5, clipped to [0, 15].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

QK = 32  # weights per block, every format here
QUANT_KEY = "quantized"  # ModelConfig.extra[QUANT_KEY]: {canonical weight name: qtype name}


@dataclass(frozen=True)
class QType:
    name: str  # q8_0 | q4_0 | q4_1
    ggml_type: int  # GGMLQuantizationType value
    block_bytes: int  # bytes per 32 weights
    code: int  # the kernels' integer code

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / QK


Q8_0 = QType("q8_0", 8, 34, 0)
Q4_0 = QType("q4_0", 2, 18, 1)
Q4_1 = QType("q4_1", 3, 20, 2)
QTYPES = {t.name: t for t in (Q8_0, Q4_0, Q4_1)}
BY_GGML = {t.ggml_type: t for t in QTYPES.values()}
BY_CODE = {t.code: t for t in QTYPES.values()}


def qtype_of(name) -> QType:
    """A QType from its name ('q4_1', 'Q4_1') or ggml type number; else InputError naming the choices."""
    if isinstance(name, QType):
        return name
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        t = BY_GGML.get(int(name))
    else:
        t = QTYPES.get(str(name).lower())
    if t is None:
        raise InputError(f"quantization type {name!r} is not supported (expected one of {sorted(QTYPES)})")
    return t


def row_bytes(qtype, K: int) -> int:
    """Bytes of one quantized row of K weights (K a multiple of 32)."""
    t = qtype_of(qtype)
    check_k(K, t, "K")
    return (K // QK) * t.block_bytes


def check_k(K: int, qtype, what: str):
    if K <= 0 or K % QK:
        raise InputError(f"{what}: {qtype_of(qtype).name.upper()} packs rows in blocks of {QK} weights, "
                         f"so the row length (in_features) must be a positive multiple of {QK}; got {K}")


@dataclass
class QuantizedTensor:
    """A (M, K) weight kept quantized: data (M, row_bytes) uint8 C-contiguous, ggml block layout."""

    qtype: QType
    shape: tuple  # (M, K): (out_features, in_features)
    data: np.ndarray

    def __post_init__(self):
        self.qtype = qtype_of(self.qtype)
        M, K = (int(s) for s in self.shape)
        self.shape = (M, K)
        check_k(K, self.qtype, "quantized tensor")
        want = (M, row_bytes(self.qtype, K))
        d = self.data
        if not isinstance(d, np.ndarray) or d.dtype != np.uint8:
            raise InputError(f"quantized tensor: data must be a uint8 array, got "
                             f"{getattr(d, 'dtype', type(d).__name__)}")
        if d.size != want[0] * want[1]:
            raise InputError(f"quantized tensor: {self.qtype.name.upper()} {self.shape} needs {want[0] * want[1]} "
                             f"bytes ({want[0]} rows of {want[1]}), got {d.size}")
        self.data = np.ascontiguousarray(d.reshape(want))

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def n_blocks(self) -> int:
        return self.shape[1] // QK

    def dequantize(self) -> np.ndarray:
        return dequantize(self)

    def take_rows(self, rows) -> "QuantizedTensor":
        """The rows `rows` (an index array) of this weight: rows are independent blocks, so this
        is exact (Q/K permutations of a GGUF, fused Q|K|V and gate|up concatenations)."""
        rows = np.asarray(rows, dtype=np.int64)
        return QuantizedTensor(self.qtype, (len(rows), self.shape[1]), self.data[rows])

    @classmethod
    def concat(cls, parts) -> "QuantizedTensor":
        """Row-wise concatenation of weights of one type and one K (e.g. Q | K | V)."""
        parts = list(parts)
        t, K = parts[0].qtype, parts[0].shape[1]
        for p in parts[1:]:
            if p.qtype != t or p.shape[1] != K:
                raise InputError(f"quantized concat: {p.qtype.name}{p.shape} does not match {t.name}(*, {K})")
        return cls(t, (sum(p.shape[0] for p in parts), K), np.concatenate([p.data for p in parts], axis=0))

    @classmethod
    def from_ggml(cls, ggml_type, shape, raw) -> "QuantizedTensor":
        """From a GGUF tensor: ggml type (number or name), (out, in) shape (numpy order, i.e.
        ne reversed) and its raw bytes (any uint8 array of the right size, e.g. a memory map)."""
        t = qtype_of(getattr(ggml_type, "value", ggml_type) if not isinstance(ggml_type, str) else ggml_type)
        if len(shape) != 2:
            raise InputError(f"quantized tensor: expected a 2-D (out, in) shape, got {tuple(shape)}")
        return cls(t, tuple(int(s) for s in shape), np.asarray(raw).view(np.uint8))

    def __repr__(self):
        return f"QuantizedTensor({self.qtype.name}, shape={self.shape}, {self.nbytes:,} bytes)"


# ---------------------------------------------------------------- quantize / dequantize


def _roundf(x):
    """C roundf: halves away from zero (ggml's Q8_0 rounding), elementwise float32."""
    a = np.abs(x)
    f = np.floor(a)
    return np.sign(x) * (f + np.floor(2 * (a - f)))


def _blocks(w, qtype, what):
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise InputError(f"{what}: expected a 2-D (out_features, in_features) weight, got shape {w.shape}")
    M, K = w.shape
    check_k(K, qtype, what)
    if not np.isfinite(w).all():
        raise InputError(f"{what}: the weight has NaN or infinite values; they cannot be quantized")
    return w.reshape(M * (K // QK), QK), M, K


def _pack_nibbles(q):
    # q (n, 32) uint8 in [0, 15] -> (n, 16): low nibble = weight t, high nibble = weight t + 16
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def quantize(w, qtype, what: str = "weight") -> QuantizedTensor:
    """Quantize a float (M, K) weight to Q8_0 / Q4_0 / Q4_1 exactly as ggml's reference does."""
    t = qtype_of(qtype)
    blocks, M, K = _blocks(w, t, what)
    with np.errstate(divide="ignore", invalid="ignore"):
        if t is Q8_0:
            d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
            qs = _roundf(blocks * inv).astype(np.int8).view(np.uint8)
            out = np.concatenate([d.astype(np.float16).view(np.uint8), qs], axis=1)
        elif t is Q4_0:
            imax = np.abs(blocks).argmax(axis=1)[:, None]
            mx = np.take_along_axis(blocks, imax, axis=1)
            d = mx / np.float32(-8)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
            q = np.clip(np.trunc(blocks * inv + np.float32(8.5)), 0, 15).astype(np.uint8)
            out = np.concatenate([d.astype(np.float16).view(np.uint8), _pack_nibbles(q)], axis=1)
        else:
            mx = blocks.max(axis=1, keepdims=True)
            mn = blocks.min(axis=1, keepdims=True)
            d = (mx - mn) / np.float32(15)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
            q = np.clip(np.trunc((blocks - mn) * inv + np.float32(0.5)), 0, 15).astype(np.uint8)
            out = np.concatenate([d.astype(np.float16).view(np.uint8), mn.astype(np.float16).view(np.uint8),
                                  _pack_nibbles(q)], axis=1)
    return QuantizedTensor(t, (M, K), out.reshape(M, -1))


def unpack(qt: QuantizedTensor) -> tuple:
    """(d, m, q): per-block scales d (M, nb) and offsets m (M, nb) as float32 (m = -8 d for Q4_0,
    0 for Q8_0) and the integer codes q (M, nb, 32), so that w = d * q + m."""
    t, (M, K) = qt.qtype, qt.shape
    nb = K // QK
    b = qt.data.reshape(M, nb, t.block_bytes)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    if t is Q8_0:
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.int32)
        return d, np.zeros_like(d), q
    if t is Q4_0:
        qs, m = b[..., 2:], -8 * d
    else:
        m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
        qs = b[..., 4:]
    q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1).astype(np.int32)
    return d, m, q


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """The float32 (M, K) weight a quantized tensor stands for (as ggml's dequantize_row_*)."""
    d, m, q = unpack(qt)
    M, K = qt.shape
    if qt.qtype is Q4_0:  # (q - 8) * d, as ggml computes it
        w = (q - 8).astype(np.float32) * d[..., None]
    else:
        w = q.astype(np.float32) * d[..., None] + m[..., None]
    return w.reshape(M, K).astype(np.float32)


def dequantize64(qt: QuantizedTensor) -> np.ndarray:
    """The exact (float64) values of a quantized weight: d * q + m with the stored fp16 d and m."""
    d, m, q = unpack(qt)
    M, K = qt.shape
    return (q.astype(np.float64) * d[..., None].astype(np.float64) + m[..., None].astype(np.float64)).reshape(M, K)
