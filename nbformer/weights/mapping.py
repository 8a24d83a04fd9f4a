"""How a checkpoint's own tensors become nbformer's canonical ones, and back.

A Rule says: canonical tensor = how(sources). The inverse is used to key gradients and
exported weights by the checkpoint's own names.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import WeightsError


@dataclass(frozen=True)
class Rule:
    canonical: str
    sources: tuple  # checkpoint names
    how: str = "copy"  # copy | transpose (Conv1D (in, out) -> (out, in)) | cat0 (stack rows) | flat ((1, n) -> (n,))
    sizes: tuple = ()  # cat0 of unequal parts (grouped-query Q|K|V): rows of each source, for the inverse

    def forward(self, arrays: list) -> np.ndarray:
        if self.how == "copy":
            out = arrays[0]
        elif self.how == "transpose":
            out = arrays[0].T
        elif self.how == "cat0":
            out = np.concatenate(arrays, axis=0)
        elif self.how == "flat":
            out = arrays[0].reshape(-1)
        else:  # pragma: no cover - rules are written by us
            raise AssertionError(self.how)
        return np.ascontiguousarray(out, dtype=np.float32)

    def inverse(self, canonical_array: np.ndarray) -> dict:
        a = canonical_array
        if self.how == "copy":
            return {self.sources[0]: a}
        if self.how == "transpose":
            return {self.sources[0]: np.ascontiguousarray(a.T)}
        if self.how == "flat":
            return {self.sources[0]: a.reshape(1, -1)}
        if self.sizes:
            parts = np.split(a, np.cumsum(self.sizes)[:-1], axis=0)
        else:
            parts = np.split(a, len(self.sources), axis=0)
        return {s: np.ascontiguousarray(p) for s, p in zip(self.sources, parts)}


def apply_rules(rules, get, has, expected_shapes: dict, where: str) -> dict:
    """Build canonical params with shape checks that name both shapes.

    get(name) -> array, has(name) -> bool read the checkpoint; expected_shapes comes from the config.
    """
    params = {}
    for r in rules:
        missing = [s for s in r.sources if not has(s)]
        if missing:
            raise WeightsError(f"{where}: tensor '{missing[0]}' is missing (needed for {r.canonical})")
        arrays = [np.asarray(get(s)) for s in r.sources]
        for s, a in zip(r.sources, arrays):
            if a.dtype.kind != "f":
                raise WeightsError(f"{where}: tensor '{s}' has dtype {a.dtype}, expected a float type")
        try:
            arr = r.forward(arrays)
        except ValueError:
            raise WeightsError(f"{where}: tensors {list(r.sources)} have incompatible shapes "
                               f"{[a.shape for a in arrays]}") from None
        want = tuple(expected_shapes[r.canonical])
        if arr.shape != want:
            src_shapes = ", ".join(f"'{s}' {tuple(a.shape)}" for s, a in zip(r.sources, arrays))
            if r.how == "transpose":
                want_src = want[::-1]
            elif r.how == "cat0" and r.sizes:
                want_src = " + ".join(str((n,) + want[1:]) for n in r.sizes)
            elif r.how == "cat0":
                want_src = (want[0] // len(r.sources),) + want[1:]
            else:
                want_src = want
            raise WeightsError(f"{where}: tensor {src_shapes} has shape that disagrees with config.json: "
                               f"expected {want_src}")
        if not np.isfinite(arr).all():
            raise WeightsError(f"{where}: tensor {list(r.sources)} contains NaN or Inf")
        params[r.canonical] = arr
    missing = sorted(set(expected_shapes) - set(params))
    if missing:  # pragma: no cover - a rule set out of sync with param_shapes is our bug
        raise WeightsError(f"{where}: no rule provides {missing}")
    return params
