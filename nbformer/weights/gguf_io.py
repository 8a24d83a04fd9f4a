"""GGUF files: read through the `gguf` library (llama.cpp's own Python reader), validated first.

The container is parsed by `gguf.GGUFReader`; nbformer adds only the checks the library does not
make, so a hostile or damaged file fails with one WeightsError naming the file and what is wrong,
before anything large is allocated (the library memory-maps the file and trusts every count):

  * the fixed 24-byte header (magic 'GGUF', version 2 or 3, little-endian, tensor / metadata
    counts that a file of this size can hold) is checked before the library sees the file;
  * every read the library makes is bounds-checked against the file size (`_CheckedReader._get`):
    a string length, array length or dimension count that points past the end is an error, not a
    short view; a metadata array may hold at most MAX_ARRAY_LEN items;
  * every tensor record is checked before the library builds its view: a known ggml type, at most
    4 dimensions, a row length divisible by the block size, an aligned offset, and data that ends
    inside the file.

Interface shared with the quantized kernels (nbformer/quant/) and `nbformer quantize`
------------------------------------------------------------------------------------
    gf = GGUFFile(path)              # validated; gf.metadata: dict key -> python value
                                     # (str, int, float, bool, or a list of them)
    gf.tensors: dict name -> TensorRecord, in file order
    TensorRecord(name, type_name, shape, data, offset)
        name       GGUF tensor name, e.g. 'blk.0.attn_q.weight'
        type_name  ggml type name: 'F32' | 'F16' | 'BF16' | 'Q8_0' | 'Q4_0' | 'Q4_1' (other types
                   the gguf library can dequantize also load, as float32)
        shape      logical shape in PyTorch order: (out_features, in_features) for a matrix,
                   i.e. GGUF's ne reversed
        data       numpy array exactly as stored (a read-only view of the memory map):
                   F32 float32 / F16 float16 of `shape`; BF16 and block-quantized types uint8 of
                   shape (*shape[:-1], row_bytes) -- one row of packed blocks per output row
        offset     absolute byte offset of the data in the file
        n_bytes    bytes of data; record.rows(idx) / concat_rows([...]) give records of the same
                   type with rows picked / stacked (quantized blocks never straddle rows)
    tensor_to_float32(record) -> float32 C-contiguous array of record.shape (the ONE place that
        dequantizes; quantized types through gguf.quants.dequantize)
    linear_weight_from_record(record, name) -> what the model binds for the canonical linear
        weight `name` (h{i}.attn.qkv.w, h{i}.attn.out.w, h{i}.ffn.gate_up.w, h{i}.ffn.up.w,
        h{i}.ffn.down.w, lm_head.w). The record is already in nbformer's canonical layout: Q/K rows
        un-permuted back to the Hugging Face order and Q|K|V, gate|up stacked. Today it returns
        tensor_to_float32(record); the quantized-kernel code replaces this hook to keep
        Q8_0 / Q4_0 / Q4_1 weights quantized. Embeddings and norms always go through
        tensor_to_float32.
    load_gguf(path) -> weights.Checkpoint (config, params, GGUF-named rules, tokenizer factory);
        its .metadata: 'gguf_metadata' (the file's whole metadata), 'gguf_tensors' (name -> (type,
        shape, bytes)), 'gguf_types' (canonical name -> type), 'gguf_version', 'chat_template'.
        block_count must match the blk.N tensors present; every tensor's shape must match the
        metadata (param_shapes of the config); non-finite values are refused.
    write_tokenizer_metadata(writer, tokenizer_json_text, ...) is in weights.gguf_tokenizer: the
        tokenizer.ggml.* keys for a GGUFWriter, from a tokenizer.json (used by `nbformer quantize`).

Architectures run: 'llama' (RMSNorm, RoPE, SwiGLU, GQA; tied when there is no output.weight),
'qwen2' (the same with Q/K/V biases, Q/K rows not permuted: llama.cpp rotates its halves) and
'gpt2' (the llama.cpp layout: attn_qkv, position_embd); any other general.architecture is a
ConfigError naming it.

Rotary scaling as llama.cpp reads it: '{arch}.rope.scaling.type' none | linear (with
'{arch}.rope.scaling.factor': the frequencies divided by it; yarn / longrope are refused), and the
optional 'rope_freqs.weight' tensor (Llama 3.1 / 3.2 files: convert_hf_to_gguf's per-dimension
frequency divisors, F32 (HS/2,)), kept as ModelConfig.rope_freq_factors: inv_freq[i] =
base^(-2i/HS) / factor / rope_freqs[i].
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, WeightsError

MAX_ARRAY_LEN = 1 << 24  # metadata arrays (vocabularies are ~50k-260k entries)
MAX_DIMS = 4  # GGML_MAX_DIMS
NATIVE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
GGUF_MAGIC = 0x46554747  # b"GGUF" little-endian
SUPPORTED_VERSIONS = (2, 3)
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 4 + 8  # name length, 1-byte name, n_dims, type, offset


class _Past(Exception):
    """A read the library asked for runs past the end of the file."""


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - a declared dependency
        raise WeightsError("reading .gguf files needs the 'gguf' package: pip install gguf") from None
    return gguf


@dataclass(frozen=True)
class TensorRecord:
    name: str
    type_name: str
    shape: tuple
    data: np.ndarray
    offset: int = -1

    @property
    def n_bytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def quantized(self) -> bool:
        return self.type_name not in ("F32", "F16", "F64")

    def rows(self, idx, name: str | None = None) -> "TensorRecord":
        """The same tensor with its output rows (first axis) taken in the order idx."""
        idx = np.asarray(idx)
        return TensorRecord(name or self.name, self.type_name, (len(idx),) + tuple(self.shape[1:]),
                            np.ascontiguousarray(self.data[idx]), -1)


def concat_rows(records, name: str) -> TensorRecord:
    """Records of one type stacked along the output rows (Q|K|V, gate|up): quantized blocks never
    straddle rows, so packed data stacks as it is. Mixed types are dequantized to F32 first."""
    records = list(records)
    types = {r.type_name for r in records}
    if len(types) > 1:
        records = [TensorRecord(r.name, "F32", r.shape, tensor_to_float32(r)) for r in records]
    tail = {tuple(r.shape[1:]) for r in records}
    if len(tail) > 1:
        raise WeightsError(f"tensors {[r.name for r in records]} cannot be stacked: shapes "
                           f"{[tuple(r.shape) for r in records]}")
    rows = sum(int(r.shape[0]) for r in records)
    return TensorRecord(name, records[0].type_name, (rows,) + tuple(records[0].shape[1:]),
                        np.concatenate([r.data for r in records], axis=0), -1)


def tensor_to_float32(record: TensorRecord) -> np.ndarray:
    """The one place GGUF data becomes float32 (record.shape, C-contiguous)."""
    t = record.type_name
    if t == "F32":
        out = np.array(record.data, dtype=np.float32)
    elif t in ("F16", "F64"):
        out = record.data.astype(np.float32)
    elif t == "BF16":
        u16 = np.ascontiguousarray(record.data).view(np.uint16).astype(np.uint32)
        out = (u16 << 16).view(np.float32)
    else:
        gguf = _gguf()
        try:
            out = gguf.quants.dequantize(np.ascontiguousarray(record.data), gguf.GGMLQuantizationType[t])
        except (NotImplementedError, KeyError, ValueError) as e:
            raise WeightsError(f"tensor '{record.name}': ggml type {t} cannot be dequantized ({e})") from None
        out = out.astype(np.float32, copy=False)
    return np.ascontiguousarray(out.reshape(record.shape), dtype=np.float32)


def linear_weight_from_record(record: TensorRecord, name: str):
    """What the model binds for canonical linear weight `name` (see the module docstring):
    Q8_0 / Q4_0 / Q4_1 matrices stay quantized (an nbformer.quant.QuantizedTensor over the
    stored bytes, run by the qlinear kernels); every other type becomes float32."""
    from ..quant import KEEP_QUANTIZED, QuantizedTensor

    if record.type_name.lower() in KEEP_QUANTIZED and len(record.shape) == 2:
        return QuantizedTensor.from_ggml(record.type_name, record.shape, record.data)
    return tensor_to_float32(record)


def _checked_reader_class():
    gguf = _gguf()
    VT = gguf.GGUFValueType
    scalar_bytes = {int(k): np.dtype(v).itemsize for k, v in gguf.GGUFReader.gguf_scalar_to_np.items()}
    known_types = frozenset(int(v) for v in VT)
    ARRAY = int(VT.ARRAY)
    LONG = (int(VT.STRING), ARRAY)

    class _CheckedReader(gguf.GGUFReader):
        """GGUFReader whose every read is bounds-checked and whose tensor records are validated
        before the library builds views of them."""

        def __init__(self, path, size: int):
            self._size, self._path, self.last_key = size, path, None
            super().__init__(path, "r")

        def _get(self, offset, dtype, count=1, override_order=None):
            # the library's _get, bounds-checked, slicing a plain ndarray view of its memory map:
            # np.memmap's __getitem__ / __array_finalize__ made up half of the load time of a
            # 49k-token vocabulary (the same bytes, no copy)
            offset, count = int(offset), int(count)
            dt = np.dtype(dtype)
            n = dt.itemsize * count
            if offset < 0 or count < 0 or offset + n > self._size:
                raise _Past(f"a read of {n} bytes at offset {offset}")
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            arr = plain[offset:offset + n].view(dt)
            order = self.byte_order if override_order is None else override_order
            return arr if order in ("I", "<") and dt.byteorder in ("=", "|", "<") else \
                arr.view(arr.dtype.newbyteorder(order))

        def _push_field(self, field, skip_sum=False):
            self.last_key = field.name
            return super()._push_field(field, skip_sum)

        def _get_field_parts(self, orig_offs, raw_type):
            raw_type = int(raw_type)
            if raw_type not in known_types:
                raise WeightsError(f"{self._path}: metadata value type {raw_type} is unknown "
                                   f"(after key {self.last_key!r})")
            if raw_type == ARRAY:
                itype = int(self._get(orig_offs, np.uint32)[0])
                n = int(self._get(orig_offs + 4, np.uint64)[0])
                if itype not in known_types:
                    raise WeightsError(f"{self._path}: metadata array item type {itype} is unknown "
                                       f"(after key {self.last_key!r})")
                least = 8 if itype in LONG else scalar_bytes[itype]
                if n > MAX_ARRAY_LEN or orig_offs + 12 + n * least > self._size:
                    raise WeightsError(f"{self._path}: a metadata array (after key {self.last_key!r}) "
                                       f"declares {n} items, more than the file's {self._size} bytes can "
                                       f"hold (at most {MAX_ARRAY_LEN} items allowed)")
            return super()._get_field_parts(orig_offs, raw_type)

        def _build_tensors(self, start_offs, fields):
            for f in fields:
                _nl, name_data, n_dims, dims, raw_dtype, off = f.parts
                try:
                    name = bytes(name_data).decode("utf-8")
                except UnicodeDecodeError:
                    raise WeightsError(f"{self._path}: a tensor name is not UTF-8") from None
                nd = int(n_dims[0])
                shape = [int(d) for d in dims]
                if nd > MAX_DIMS or nd < 1:
                    raise WeightsError(f"{self._path}: tensor '{name}' has {nd} dimensions (1 to {MAX_DIMS} "
                                       f"expected)")
                code = int(raw_dtype[0])
                try:
                    qt = gguf.GGMLQuantizationType(code)
                    block, type_size = gguf.GGML_QUANT_SIZES[qt]
                except (ValueError, KeyError):
                    raise WeightsError(f"{self._path}: tensor '{name}' has unknown ggml type {code} "
                                       f"(known: F32, F16, BF16, Q8_0, Q4_0, Q4_1, ...)") from None
                n = 1
                for d in shape:
                    if d < 1:
                        raise WeightsError(f"{self._path}: tensor '{name}' has a dimension of size {d} "
                                           f"(ne = {shape})")
                    n *= d
                if shape[0] % block:
                    raise WeightsError(f"{self._path}: tensor '{name}' ({qt.name}) has rows of {shape[0]} "
                                       f"values, not a multiple of its block size {block}")
                n_bytes = n // block * type_size
                rel = int(off[0])
                if rel % self.alignment:
                    raise WeightsError(f"{self._path}: tensor '{name}' data offset {rel} is not a multiple "
                                       f"of the alignment {self.alignment}")
                begin = int(start_offs) + rel
                if begin + n_bytes > self._size:
                    raise WeightsError(f"{self._path}: tensor '{name}' ({qt.name}, ne = {shape}) needs bytes "
                                       f"{begin}..{begin + n_bytes} but the file ends at {self._size}: "
                                       f"truncated or corrupt")
            super()._build_tensors(start_offs, fields)

    return _CheckedReader


def _check_header(path: Path, size: int):
    if size < 24:
        raise WeightsError(f"{path}: {size} bytes is too short for a GGUF file (truncated?)")
    with open(path, "rb") as fh:
        head = fh.read(24)
    magic = int.from_bytes(head[0:4], "little")
    if magic != GGUF_MAGIC:
        raise WeightsError(f"{path}: not a GGUF file (magic {head[0:4]!r}, expected b'GGUF')")
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0 and version:
        raise WeightsError(f"{path}: a big-endian GGUF file; only little-endian files are supported")
    if version not in SUPPORTED_VERSIONS:
        raise WeightsError(f"{path}: GGUF version {version} is not supported (expected "
                           f"{' or '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors = int.from_bytes(head[8:16], "little")
    n_kv = int.from_bytes(head[16:24], "little")
    need = 24 + n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES
    if need > size:
        raise WeightsError(f"{path}: header declares {n_tensors} tensors and {n_kv} metadata entries, more "
                           f"than a file of {size} bytes can hold (truncated or corrupt)")
    return version, n_tensors, n_kv


class GGUFFile:
    """A validated GGUF file: .metadata (dict), .tensors (name -> TensorRecord), .version."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise WeightsError(f"{self.path}: cannot read ({e.strerror})") from None
        self.size = size
        self.version, n_tensors, n_kv = _check_header(self.path, size)
        Reader = _checked_reader_class()
        reader = None
        try:
            reader = Reader(str(self.path), size)
            self.metadata = {}
            for k, f in reader.fields.items():
                if k.startswith("GGUF."):
                    continue
                try:
                    self.metadata[k] = f.contents()
                except UnicodeDecodeError:
                    raise WeightsError(f"{self.path}: metadata '{k}' holds a string that is not UTF-8") from None
        except WeightsError:
            raise
        except _Past as e:
            where = f" after key {reader.last_key!r}" if reader is not None and reader.last_key else ""
            last = getattr(e, "args", [""])[0]
            raise WeightsError(f"{self.path}: the header runs past the end of the file ({last}{where}): "
                               f"truncated, or a string / array length is corrupt") from None
        except (ValueError, KeyError, IndexError, UnicodeDecodeError, OverflowError, TypeError) as e:
            raise WeightsError(f"{self.path}: not a valid GGUF file ({type(e).__name__}: {e})") from None
        self._reader = reader
        self.alignment = int(reader.alignment)
        self.data_offset = int(reader.data_offset)
        self.tensors = {}
        for t in reader.tensors:
            ne = [int(d) for d in t.shape]
            self.tensors[t.name] = TensorRecord(t.name, t.tensor_type.name, tuple(reversed(ne)), t.data,
                                                int(t.data_offset))

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    @property
    def architecture(self):
        return self.metadata.get("general.architecture")


# ---------------------------------------------------------------- GGUF model -> Checkpoint
ARCHITECTURES = ("llama", "qwen2", "gpt2")
# llama.cpp rotates these in the rotate-half ("NEOX") layout, so their converter writes Q/K unpermuted
ROTATE_HALF_ARCHITECTURES = ("qwen2",)


def permute_gguf_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permute of Q (n_heads = NH) or K (n_heads = NKV) rows: the
    Hugging Face rotate-half order -> interleaved pairs (the inverse of hf_llama.unpermute_gguf_qk)."""
    w = np.asarray(w)
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _qk_order(rows: int, n_heads: int) -> np.ndarray:
    """Row indices that un-permute a GGUF Q/K tensor (works on packed quantized rows too)."""
    from .hf_llama import unpermute_gguf_qk

    return unpermute_gguf_qk(np.arange(rows), n_heads)


class _Meta:
    def __init__(self, gf: GGUFFile, arch: str):
        self.gf, self.arch, self.where = gf, arch, str(gf.path)

    def raw(self, key):
        return self.gf.metadata.get(f"{self.arch}.{key}")

    def int(self, key, default=None, minimum=1):
        v = self.raw(key)
        if v is None:
            if default is None:
                raise ConfigError(f"{self.where}: metadata '{self.arch}.{key}' is missing")
            return default
        if isinstance(v, list):
            raise ConfigError(f"{self.where}: metadata '{self.arch}.{key}' is a per-layer list {v[:4]}...; "
                              f"only one value for all layers is supported")
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"{self.where}: metadata '{self.arch}.{key}' = {v!r}, expected an integer "
                              f">= {minimum}")
        return int(v)

    def float(self, key, default):
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise ConfigError(f"{self.where}: metadata '{self.arch}.{key}' = {v!r}, expected a positive number")
        return float(v)


def _token_id(gf: GGUFFile, key: str, V: int):
    v = gf.metadata.get(f"tokenizer.ggml.{key}")
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < V else None


ROPE_FREQS = "rope_freqs.weight"  # gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


def _rope_freq_factors(gf: GGUFFile, rec: TensorRecord, HS: int) -> tuple:
    """llama.cpp's rope_freqs tensor (Llama 3.1 files): HS/2 'freq_factors' that divide the rotary
    frequencies, theta_i = pos * base^(-2i/HS) / ff[i] (ggml_rope_ext). Validated: F32 or F16,
    shape (HS/2,), finite, > 0."""
    if rec.type_name not in ("F32", "F16"):
        raise WeightsError(f"{gf.path}: tensor '{rec.name}' has ggml type {rec.type_name}, expected F32 or F16")
    if tuple(rec.shape) != (HS // 2,):
        raise WeightsError(f"{gf.path}: tensor '{rec.name}' has shape {tuple(rec.shape)}, expected ({HS // 2},) "
                           f"(head size {HS} / 2 rotary frequencies)")
    ff = tensor_to_float32(rec).astype(np.float64)
    if not np.isfinite(ff).all() or not (ff > 0).all():
        bad = ff[~(np.isfinite(ff) & (ff > 0))]
        raise WeightsError(f"{gf.path}: tensor '{rec.name}' holds {float(bad[0])}: rotary frequency factors must be "
                           f"finite and > 0")
    return tuple(float(v) for v in ff)


def config_from_gguf(gf: GGUFFile):
    """ModelConfig from a GGUF file's metadata (and which optional tensors it has)."""
    from ..config import ModelConfig

    arch = gf.architecture
    if not isinstance(arch, str):
        raise ConfigError(f"{gf.path}: metadata 'general.architecture' is "
                          f"{'missing' if arch is None else repr(arch) + ', not a string'}: not a model GGUF file")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{gf.path}: GGUF architecture {arch!r} is not supported (nbformer runs: "
                          f"{', '.join(ARCHITECTURES)})")
    m = _Meta(gf, arch)
    T = gf.tensors
    n_blocks = m.int("block_count", minimum=0)
    present = {int(n.split(".")[1]) for n in T if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if n_blocks != len(present) or (present and max(present) != n_blocks - 1):
        raise WeightsError(f"{gf.path}: metadata '{arch}.block_count' = {n_blocks} but the file has tensors for "
                           f"{len(present)} blocks (blk.0 .. blk.{max(present) if present else -1})")
    emb = T.get("token_embd.weight")
    if emb is None:
        raise WeightsError(f"{gf.path}: tensor 'token_embd.weight' is missing")
    C = m.int("embedding_length")
    NH = m.int("attention.head_count")
    tokens = gf.metadata.get("tokenizer.ggml.tokens")
    V = m.int("vocab_size", default=len(tokens) if isinstance(tokens, list) and tokens else emb.shape[0])
    common = dict(vocab_size=V, d_model=C, n_heads=NH, n_layers=n_blocks,
                  d_ff=m.int("feed_forward_length"), max_positions=m.int("context_length"), norm="pre",
                  embedding_layernorm=False, final_layernorm=True, lm_head=True,
                  tie_word_embeddings="output.weight" not in T,
                  bos_token_id=_token_id(gf, "bos_token_id", V), eos_token_id=_token_id(gf, "eos_token_id", V),
                  pad_token_id=_token_id(gf, "padding_token_id", V))
    extra = {"gguf": {"architecture": arch, "name": gf.metadata.get("general.name")}}
    try:
        if arch == "gpt2":
            return ModelConfig(arch="decoder", family="gpt2", activation="gelu_tanh", positions="learned",
                               layer_norm_eps=m.float("attention.layer_norm_epsilon", 1e-5), extra=extra, **common)
        NKV = m.int("attention.head_count_kv", default=NH)
        HS = m.int("attention.key_length", default=C // NH if C % NH == 0 else 0)
        if HS == 0:
            raise ConfigError(f"{gf.path}: embedding_length {C} is not divisible by head_count {NH} and "
                              f"'{arch}.attention.key_length' is missing")
        vlen = m.int("attention.value_length", default=HS)
        if vlen != HS:
            raise ConfigError(f"{gf.path}: '{arch}.attention.value_length' = {vlen} differs from key_length {HS}: "
                              f"not supported")
        rot = m.int("rope.dimension_count", default=HS)
        if rot != HS:
            raise ConfigError(f"{gf.path}: '{arch}.rope.dimension_count' = {rot} but heads have {HS} dimensions: "
                              f"partial rotary embeddings are not supported")
        if NH % NKV:
            raise ConfigError(f"{gf.path}: '{arch}.attention.head_count_kv' = {NKV} does not divide head_count {NH}")
        rope = {"rope_theta": m.float("rope.freq_base", 10000.0)}
        kind = m.raw("rope.scaling.type") or "none"
        if kind == "linear":
            rope.update(rope_scaling="linear", rope_factor=m.float("rope.scaling.factor", 1.0))
        elif kind != "none":
            raise ConfigError(f"{gf.path}: '{arch}.rope.scaling.type' = {kind!r} is not supported (supported: "
                              f"none, linear; Llama 3.1 scaling comes as the rope_freqs.weight tensor)")
        if ROPE_FREQS in T:
            rope["rope_freq_factors"] = _rope_freq_factors(gf, T[ROPE_FREQS], HS)
        b = "blk.0."
        return ModelConfig(
            arch="decoder", family="llama", norm_type="rmsnorm", activation="silu", ffn_type="glu",
            positions="rope", n_kv_heads=None if NKV == NH else NKV,
            head_dim=None if C % NH == 0 and HS == C // NH else HS,
            qkv_bias=b + "attn_q.bias" in T, attn_out_bias=b + "attn_output.bias" in T,
            ffn_bias=b + "ffn_down.bias" in T,
            layer_norm_eps=m.float("attention.layer_norm_rms_epsilon", 1e-5), extra=extra, **rope, **common)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(str(gf.path)) else f"{gf.path}: {msg}") from None


def _gguf_rule_class():
    from .mapping import Rule

    @dataclass(frozen=True)
    class GGUFRule(Rule):
        """A Rule whose sources are GGUF tensor names; permute[i] = heads of a Q/K source whose rows
        llama.cpp permuted (0: none), so gradients come back in the file's own layout."""
        permute: tuple = ()

        def inverse(self, canonical_array):
            out = super().inverse(canonical_array)
            for s, nh in zip(self.sources, self.permute):
                if nh:
                    out[s] = permute_gguf_qk(out[s], nh)
            return out

    return GGUFRule


def _rules(cfg) -> list:
    """canonical name -> GGUF sources (Q/K permutes recorded), in param_shapes order."""
    R = _gguf_rule_class()
    r = [R("tok_emb", ("token_embd.weight",))]
    if cfg.family == "gpt2":
        r.append(R("pos_emb", ("position_embd.weight",)))
    NH, NKV, HS, F = cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.d_ff
    ln = cfg.norm_type == "layernorm"
    arch = (cfg.extra or {}).get("gguf", {}).get("architecture", "llama")
    perm = (0, 0, 0) if arch in ROTATE_HALF_ARCHITECTURES else (NH, NKV, 0)
    for i in range(cfg.n_layers):
        b, h = f"blk.{i}.", f"h{i}."
        r.append(R(h + "ln1.w", (b + "attn_norm.weight",)))
        if ln:
            r.append(R(h + "ln1.b", (b + "attn_norm.bias",)))
        if cfg.family == "gpt2":
            r.append(R(h + "attn.qkv.w", (b + "attn_qkv.weight",)))
            r.append(R(h + "attn.qkv.b", (b + "attn_qkv.bias",)))
        else:
            sizes = (NH * HS, NKV * HS, NKV * HS)
            src = (b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight")
            r.append(R(h + "attn.qkv.w", src, "cat0", sizes, permute=perm))
            if cfg.qkv_bias:
                src = (b + "attn_q.bias", b + "attn_k.bias", b + "attn_v.bias")
                r.append(R(h + "attn.qkv.b", src, "cat0", sizes, permute=perm))
        r.append(R(h + "attn.out.w", (b + "attn_output.weight",)))
        if cfg.attn_out_bias:
            r.append(R(h + "attn.out.b", (b + "attn_output.bias",)))
        r.append(R(h + "ln2.w", (b + "ffn_norm.weight",)))
        if ln:
            r.append(R(h + "ln2.b", (b + "ffn_norm.bias",)))
        if cfg.ffn_type == "glu":
            r.append(R(h + "ffn.gate_up.w", (b + "ffn_gate.weight", b + "ffn_up.weight"), "cat0", (F, F)))
            if cfg.ffn_bias:
                r.append(R(h + "ffn.gate_up.b", (b + "ffn_gate.bias", b + "ffn_up.bias"), "cat0", (F, F)))
        else:
            r.append(R(h + "ffn.up.w", (b + "ffn_up.weight",)))
            if cfg.ffn_bias:
                r.append(R(h + "ffn.up.b", (b + "ffn_up.bias",)))
        r.append(R(h + "ffn.down.w", (b + "ffn_down.weight",)))
        if cfg.ffn_bias:
            r.append(R(h + "ffn.down.b", (b + "ffn_down.bias",)))
    r.append(R("final_ln.w", ("output_norm.weight",)))
    if ln:
        r.append(R("final_ln.b", ("output_norm.bias",)))
    if not cfg.tie_word_embeddings:
        r.append(R("lm_head.w", ("output.weight",)))
    return r


LINEAR_SUFFIXES = (".attn.qkv.w", ".attn.out.w", ".ffn.gate_up.w", ".ffn.up.w", ".ffn.down.w")


def is_linear(canonical: str) -> bool:
    return canonical == "lm_head.w" or canonical.endswith(LINEAR_SUFFIXES)


def canonical_record(gf: GGUFFile, rule) -> TensorRecord:
    """One record in nbformer's canonical layout for a rule: Q/K rows un-permuted, parts stacked."""
    parts = []
    for s, nh in zip(rule.sources, getattr(rule, "permute", ()) or (0,) * len(rule.sources)):
        rec = gf.tensors.get(s)
        if rec is None:
            raise WeightsError(f"{gf.path}: tensor '{s}' is missing (needed for {rule.canonical})")
        if nh:
            if rec.shape[0] % nh or (rec.shape[0] // nh) % 2:
                raise WeightsError(f"{gf.path}: tensor '{s}' has {rec.shape[0]} rows, not {nh} heads of an even "
                                   f"size as the metadata says")
            rec = rec.rows(_qk_order(rec.shape[0], nh))
        parts.append(rec)
    return parts[0] if len(parts) == 1 else concat_rows(parts, rule.canonical)


def load_gguf(path):
    """A GGUF model file -> weights.Checkpoint (params keyed by canonical names; rules map them to
    the GGUF tensor names, so gradients come back keyed by those)."""
    from . import Checkpoint
    from .params import param_shapes

    gf = GGUFFile(path)
    cfg = config_from_gguf(gf)
    shapes = param_shapes(cfg)
    rules = _rules(cfg)
    params, types = {}, {}
    for rule in rules:
        want = tuple(shapes[rule.canonical])
        for s in rule.sources:
            if s not in gf.tensors:
                raise WeightsError(f"{gf.path}: tensor '{s}' is missing (needed for {rule.canonical})")
        rec = canonical_record(gf, rule)
        if tuple(rec.shape) != want:
            got = ", ".join(f"'{s}' {gf.tensors[s].shape}" for s in rule.sources)
            raise WeightsError(f"{gf.path}: tensor {got} disagrees with the metadata: expected {want} for "
                               f"{rule.canonical} (PyTorch order; GGUF ne is reversed)")
        if rec.type_name not in NATIVE_TYPES and rec.type_name not in _dequantizable():
            raise WeightsError(f"{gf.path}: tensor '{rule.sources[0]}' has ggml type {rec.type_name}, which "
                               f"nbformer cannot read")
        arr = linear_weight_from_record(rec, rule.canonical) if is_linear(rule.canonical) else tensor_to_float32(rec)
        if isinstance(arr, np.ndarray) and not np.isfinite(arr).all():
            raise WeightsError(f"{gf.path}: tensor {list(rule.sources)} contains NaN or Inf")
        params[rule.canonical] = arr
        types[rule.canonical] = rec.type_name
    quantized = {}
    emb = gf.tensors.get("token_embd.weight")
    if cfg.lm_head and cfg.tie_word_embeddings and emb is not None and "tok_emb" in params:
        head = linear_weight_from_record(emb, "tok_emb")  # the tied output head reads the table quantized
        if not isinstance(head, np.ndarray):
            quantized["tok_emb"] = head
    from .gguf_tokenizer import has_tokenizer, tokenizer_json_from_gguf

    md, where = gf.metadata, str(gf.path)  # the factory keeps the metadata, not the reader's memory map
    factory = (lambda: tokenizer_json_from_gguf(md, where)) if has_tokenizer(md) else None
    meta = {"gguf_types": types, "gguf_metadata": gf.metadata, "gguf_version": gf.version,
            "gguf_tensors": {n: (r.type_name, tuple(r.shape), r.n_bytes) for n, r in gf.tensors.items()}}
    tmpl = gf.metadata.get("tokenizer.chat_template")
    if isinstance(tmpl, str):
        meta["chat_template"] = tmpl
    return Checkpoint(cfg, params, rules, path=gf.path, model_dir=gf.path.parent, tokenizer_file=None,
                      metadata=meta, tokenizer_json=factory, quantized=quantized)


def _small_metadata(md: dict) -> dict:
    """Metadata without the big arrays (vocabulary, merges, scores): for display and `inspect`."""
    return {k: (f"[{len(v)} items]" if isinstance(v, list) and len(v) > 16 else v) for k, v in md.items()}


def _dequantizable() -> tuple:
    gguf = _gguf()
    names = []
    for qt in gguf.GGMLQuantizationType:
        if qt.name in NATIVE_TYPES or qt.name.startswith(("I", "F64")) and qt.name[:2] != "IQ":
            continue
        names.append(qt.name)
    return tuple(names)


def bytes_per_token(ckpt) -> dict:
    """Weight bytes a decoder reads to produce one token: every matrix once, the input embedding's
    one row only (unless tied to the output projection). 'stored': with the file's own types (what
    kernels that keep the blocks quantized read); 'loaded': with what the model binds now."""
    stored_tensors = (ckpt.metadata or {}).get("gguf_tensors") or {}
    tied = ckpt.config.tie_word_embeddings
    stored = 0
    for name, (_t, shape, nb) in stored_tensors.items():
        if name == "token_embd.weight" and not tied:
            nb = nb // max(int(shape[0]), 1)
        stored += nb
    quantized = getattr(ckpt, "quantized", None) or {}  # weights the model keeps quantized (nbformer.quant)
    loaded = sum(int(getattr(q, "nbytes", 0)) for q in quantized.values())
    for name, a in ckpt.params.items():
        nb = int(getattr(a, "nbytes", 0))
        if name == "tok_emb" and (not tied or "tok_emb" in quantized):  # the lookup reads one row only
            nb = nb // max(int(ckpt.config.vocab_size), 1)
        loaded += nb
    return {"stored": stored, "loaded": loaded}


def summary_lines(ckpt) -> list:
    """What `nbformer inspect file.gguf` prints about the file itself."""
    from collections import Counter

    md = _small_metadata((ckpt.metadata or {}).get("gguf_metadata") or {})
    tensors = (ckpt.metadata or {}).get("gguf_tensors") or {}
    arch = md.get("general.architecture")
    lines = [f"GGUF v{ckpt.metadata.get('gguf_version')}: {len(tensors)} tensors, {len(md)} metadata keys; "
             f"architecture {arch!r}, name {md.get('general.name')!r}"]
    keys = [k for k in md if k.startswith(f"{arch}.")] + [
        k for k in ("general.file_type", "general.quantization_version", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                    "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token")
        if k in md]
    for k in keys:
        lines.append(f"  {k} = {md[k]}")
    tmpl = md.get("tokenizer.chat_template")
    if isinstance(tmpl, str):
        lines.append(f"  tokenizer.chat_template = {len(tmpl)} characters: {tmpl[:60]!r}...")
    by_type = Counter()
    bytes_by_type = Counter()
    for _n, (t, _s, nb) in tensors.items():
        by_type[t] += 1
        bytes_by_type[t] += nb
    parts = [f"{t} x{by_type[t]} ({bytes_by_type[t] / 2**20:.1f} MiB)" for t in sorted(by_type)]
    lines.append("tensor types: " + ", ".join(parts))
    bpt = bytes_per_token(ckpt)
    lines.append(f"weight bytes read per decoded token: {bpt['stored'] / 2**20:.1f} MiB as stored in the file, "
                 f"{bpt['loaded'] / 2**20:.1f} MiB as loaded now")
    return lines
