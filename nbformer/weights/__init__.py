"""Weight loading: Hugging Face model directories and nbformer's own safetensors checkpoints.

Everything is read with our own validated safetensors parser; nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, WeightsError
from . import hf_bert, hf_gpt2, hf_llama, hf_marian
from .mapping import Rule, apply_rules
from .params import param_shapes
from .safetensors_io import SafetensorsFile

FAMILIES = {"bert": hf_bert, "gpt2": hf_gpt2, "marian": hf_marian, "llama": hf_llama}
NATIVE_CONFIG_KEY = "nbformer_config"


@dataclass
class Checkpoint:
    config: ModelConfig
    params: dict  # canonical name -> float32 C-contiguous array
    rules: list  # how checkpoint names map to canonical ones (identity for native checkpoints)
    path: Path
    model_dir: Path | None = None  # where tokenizer.json / modules.json live
    tokenizer_file: Path | None = None
    metadata: dict = field(default_factory=dict)
    # linear weights kept quantized (nbformer.quant.QuantizedTensor), by canonical name; absent from params
    # (except 'tok_emb' of a tied head: params keeps the float32 table for the lookup)
    quantized: dict = field(default_factory=dict)
    tokenizer_json: object = None  # callable -> tokenizer.json text, built on first use (GGUF metadata)

    def to_checkpoint_names(self, canonical: dict) -> dict:
        """Re-key canonical arrays (e.g. gradients) by the checkpoint's own tensor names."""
        out = {}
        for r in self.rules:
            if r.canonical in canonical:
                out.update(r.inverse(canonical[r.canonical]))
        return out


class _Shards:
    """One view over model.safetensors or a sharded model-0000x-of-0000y.safetensors set."""

    def __init__(self, files):
        self.files = files
        self.where = {}
        for f in files:
            for k in f.keys():
                self.where.setdefault(k, f)

    def has(self, k):
        return k in self.where

    def get(self, k):
        return self.where[k].get(k)


def _read_json(path: Path, what: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: {what} must be a JSON object")
    return d


def _transformer_dir(d: Path) -> Path:
    """sentence-transformers may keep the encoder in a sub-folder named by modules.json."""
    mj = d / "modules.json"
    if (d / "config.json").exists() or not mj.exists():
        return d
    try:
        mods = json.loads(mj.read_text(encoding="utf-8"))
        for m in mods:
            if str(m.get("type", "")).endswith("models.Transformer") and m.get("path"):
                return d / m["path"]
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return d


def _shard_paths(d: Path, index: Path, weight_map: dict) -> list:
    """The shard files an index names, every one checked to lie inside the model folder before any
    is opened: an index may not reach elsewhere with '../', an absolute path or a symlink out of the
    folder. The one symlink allowed out is the Hugging Face hub cache's own layout, where
    snapshots/<rev>/<shard> links to ../../blobs/<hash> of the same cached repository."""
    root = d.resolve()
    rev = next((a for a in (root, *root.parents) if a.parent.name == "snapshots"), None)
    hub_blobs = rev.parent.parent / "blobs" if rev is not None else None
    names = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name.strip():
            raise WeightsError(f"{index}: 'weight_map' gives tensor '{tensor}' the shard {name!r}, "
                               f"expected a file name")
        names.add(name)
    out = []
    for name in sorted(names):
        lexical = os.path.normpath(d / name)
        inside = not Path(name).is_absolute() and Path(lexical).is_relative_to(os.path.normpath(d))
        target = Path(lexical).resolve()
        if inside and not target.is_relative_to(root):
            inside = hub_blobs is not None and target.parent == hub_blobs
        if not inside:
            raise WeightsError(f"{index}: shard {name!r} lies outside the model folder {d} "
                               f"(resolves to {target}); refusing to open it")
        out.append(d / name)
    return out


def _shards_in(d: Path) -> _Shards:
    index = d / "model.safetensors.index.json"
    single = d / "model.safetensors"
    if single.exists():
        return _Shards([SafetensorsFile(single)])
    if index.exists():
        wm = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(wm, dict):
            raise WeightsError(f"{index}: missing 'weight_map'")
        return _Shards([SafetensorsFile(f) for f in _shard_paths(d, index, wm)])
    if any((d / n).exists() for n in ("pytorch_model.bin", "model.bin", "tf_model.h5", "flax_model.msgpack")):
        raise WeightsError(f"{d}: has no model.safetensors, only pickle/TF/Flax weights, which nbformer does "
                           f"not read; convert them with transformers' save_pretrained(safe_serialization=True)")
    raise WeightsError(f"{d}: no model.safetensors (or model.safetensors.index.json) found")


def _load_hf_dir(d: Path) -> Checkpoint:
    d = _transformer_dir(d)
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"{d}: no config.json: not a Hugging Face model directory")
    raw = _read_json(cfg_path, "config.json")
    mt = raw.get("model_type")
    if mt not in FAMILIES:
        raise ConfigError(f"{cfg_path}: model_type {mt!r} is not supported (expected one of {sorted(FAMILIES)})")
    fam = FAMILIES[mt]
    try:
        cfg = fam.config_from_hf(raw, str(cfg_path))
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(str(cfg_path)) else f"{cfg_path}: {msg}") from None
    shards = _shards_in(d)
    prefix = next((p for p in fam.PREFIXES if shards.has(p + fam.PROBE)), None)
    if prefix is None:
        raise WeightsError(f"{d}: tensor '{fam.PROBE}' is missing: the weights do not look like a "
                           f"{mt} checkpoint")
    if mt == "marian" and not shards.has("final_logits_bias"):
        cfg = cfg.replace(lm_head_bias=False)  # transformers treats a missing bias as zeros
    rules = fam.rules(cfg, prefix)
    if mt == "marian":
        gen_path = d / "generation_config.json"
        if gen_path.exists():  # transformers lets generation_config.json override config.json
            gen = dict(cfg.extra.get("generation", {}))
            raw_gen = _read_json(gen_path, "generation_config.json")
            gen.update({k: raw_gen[k] for k in hf_marian.GENERATION_KEYS if raw_gen.get(k) is not None})
            cfg = cfg.replace(extra={**cfg.extra, "generation": gen})
    if mt in ("gpt2", "marian", "llama") and cfg.tie_word_embeddings is False and not shards.has("lm_head.weight"):
        raise WeightsError(f"{d}: tensor 'lm_head.weight' is missing and tie_word_embeddings is false")
    where = str(d / "model.safetensors") if len(shards.files) == 1 else str(d)
    params = apply_rules(rules, shards.get, shards.has, param_shapes(cfg), where)
    tok = d / "tokenizer.json"
    if not tok.exists() and (d.parent / "tokenizer.json").exists():
        tok = d.parent / "tokenizer.json"
    return Checkpoint(cfg, params, rules, path=d, model_dir=d,
                      tokenizer_file=tok if tok.exists() else None)


def _load_native(path: Path) -> Checkpoint:
    f = SafetensorsFile(path)
    text = f.metadata.get(NATIVE_CONFIG_KEY)
    if text is None:
        cfg_dir = path.parent
        if (cfg_dir / "config.json").exists():
            return _load_hf_dir(cfg_dir)
        raise ConfigError(f"{path}: has no '{NATIVE_CONFIG_KEY}' metadata and no config.json beside it")
    try:
        cfg = ModelConfig.from_dict(json.loads(text))
    except json.JSONDecodeError:
        raise ConfigError(f"{path}: '{NATIVE_CONFIG_KEY}' metadata is not valid JSON") from None
    shapes = param_shapes(cfg)
    rules = [Rule(k, (k,)) for k in shapes]
    params = apply_rules(rules, f.get, lambda k: k in f.keys(), shapes, str(path))
    tok = path.with_name("tokenizer.json")
    return Checkpoint(cfg, params, rules, path=path, model_dir=path.parent,
                      tokenizer_file=tok if tok.exists() else None, metadata=dict(f.metadata))


NATIVE_FILES = ("model.safetensors", "checkpoint.safetensors")  # what `nbformer train` writes, preferred first


def _load_dir(d: Path) -> Checkpoint:
    """A Hugging Face directory (config.json), else a folder `nbformer train` wrote: its
    model.safetensors, or failing that its checkpoint.safetensors, carrying the config (and the
    tokenizer) in the header metadata."""
    if (_transformer_dir(d) / "config.json").exists():
        return _load_hf_dir(d)
    problems = []
    for name in NATIVE_FILES:
        f = d / name
        if not f.exists():
            continue
        try:
            has_config = NATIVE_CONFIG_KEY in SafetensorsFile(f).metadata
        except WeightsError as e:
            problems.append(str(e))
            continue
        if has_config:
            return _load_native(f)
        problems.append(f"{name} has no '{NATIVE_CONFIG_KEY}' metadata")
    why = f" ({'; '.join(problems)})" if problems else ""
    raise ConfigError(f"{d}: no config.json, so not a Hugging Face model directory, and no nbformer "
                      f"model.safetensors or checkpoint.safetensors (config in its metadata) either{why}")


def load_checkpoint(path) -> Checkpoint:
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"{p}: no such file or directory")
    if p.is_dir():
        return _load_dir(p)
    if p.suffix == ".safetensors":
        return _load_native(p)
    if p.suffix == ".gguf":
        from .gguf_io import load_gguf

        return load_gguf(p)
    raise WeightsError(f"{p}: expected a model directory, a .safetensors file or a .gguf file")


def save_native(path, cfg: ModelConfig, params: dict, metadata: dict | None = None):
    """Write an nbformer checkpoint: canonical tensors + config JSON in the header metadata."""
    from .safetensors_io import save_file

    meta = dict(metadata or {})
    meta[NATIVE_CONFIG_KEY] = json.dumps(cfg.to_dict(), sort_keys=True)
    save_file({k: np.asarray(v, dtype=np.float32) for k, v in params.items()}, path, meta)
