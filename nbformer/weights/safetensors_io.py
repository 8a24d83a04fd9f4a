"""Reading and writing .safetensors files without torch and without trusting the file.

Format: 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data.
Every field is checked before any array is made, so a truncated file, a git-lfs pointer, an
HTML error page or a corrupt header gives a WeightsError naming the file, never a crash.
"""
from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np

from ..errors import WeightsError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 * 1024 * 1024


def _sniff(head: bytes) -> str:
    """A hint at what a non-safetensors file really is."""
    h = head.lstrip()[:64].lower()
    if h.startswith(b"version https://git-lfs"):
        return " (it is a git-lfs pointer: run `git lfs pull` to fetch the real file)"
    if h.startswith(b"<!doctype html") or h.startswith(b"<html"):
        return " (it is an HTML page, probably an error page saved instead of the file)"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return " (it looks like a pickled PyTorch checkpoint, which nbformer never unpickles)"
    return ""


class SafetensorsFile:
    """Lazily maps a .safetensors file; `tensors()` returns name -> read-only numpy array."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
            f = open(self.path, "rb")
        except OSError as e:
            raise WeightsError(f"{self.path}: cannot open weight file ({e.strerror})") from None
        with f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{self.path}: not a safetensors file: only {size} bytes{_sniff(head)}")
            n = int.from_bytes(head, "little")
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                more = f.read(56)
                raise WeightsError(
                    f"{self.path}: not a valid safetensors file: header length {n} does not fit in "
                    f"{size} bytes{_sniff(head + more) or ' (truncated or garbage header)'}")
            raw = f.read(n)
            try:
                header = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise WeightsError(f"{self.path}: safetensors header is not valid JSON{_sniff(head + raw)}") from None
            if not isinstance(header, dict):
                raise WeightsError(f"{self.path}: safetensors header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            data_len = size - 8 - n
            self._entries = {}
            spans = []
            for name, e in header.items():
                self._check_entry(name, e, data_len)
                self._entries[name] = e
                spans.append(tuple(e["data_offsets"]))
            spans.sort()
            for (b0, e0), (b1, e1) in zip(spans, spans[1:]):
                if b1 < e0:
                    raise WeightsError(f"{self.path}: tensors overlap in the data section at byte {b1}")
            self._data_start = 8 + n
            self._size = size
            self._mm = None

    def _check_entry(self, name, e, data_len):
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise WeightsError(f"{where}: header entry must have dtype, shape and data_offsets")
        if e["dtype"] not in _ITEMSIZE:
            raise WeightsError(f"{where}: unsupported dtype {e['dtype']!r}")
        shape, offs = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise WeightsError(f"{where}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise WeightsError(f"{where}: bad data_offsets {offs!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[e["dtype"]]
        if offs[1] - offs[0] != nbytes:
            raise WeightsError(f"{where}: data_offsets span {offs[1] - offs[0]} bytes but shape {shape} "
                               f"of {e['dtype']} needs {nbytes}")
        if offs[1] > data_len:
            raise WeightsError(f"{where}: data ends at byte {offs[1]} but the file has only {data_len} "
                               f"bytes of data (the file is truncated)")

    def keys(self):
        return list(self._entries)

    def shape(self, name):
        return tuple(self._entries[name]["shape"])

    def dtype(self, name):
        return self._entries[name]["dtype"]

    def get(self, name) -> np.ndarray:
        """The tensor as a numpy array (zero-copy view of the mapped file for F32)."""
        e = self._entries.get(name)
        if e is None:
            raise WeightsError(f"{self.path}: no tensor named '{name}'")
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self._size else b""
        b0, b1 = e["data_offsets"]
        buf = memoryview(self._mm)[self._data_start + b0: self._data_start + b1]
        if e["dtype"] == "BF16":
            u16 = np.frombuffer(buf, dtype="<u2")
            arr = (u16.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, dtype=np.dtype(_DTYPES[e["dtype"]]).newbyteorder("<"))
        return arr.reshape(e["shape"])

    def tensors(self) -> dict:
        return {k: self.get(k) for k in self._entries}


def load_file(path) -> dict:
    return SafetensorsFile(path).tensors()


def save_file(tensors: dict, path, metadata: dict | None = None):
    """Write tensors with the `safetensors` library (contiguous copies, string metadata)."""
    from safetensors.numpy import save_file as _save

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    _save(arrays, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})
