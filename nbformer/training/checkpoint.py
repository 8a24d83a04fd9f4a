"""Training checkpoints: safetensors written atomically (temp file, fsync, rename).

checkpoint.safetensors holds parameters (canonical names), Adam moments (`optim.m`, `optim.v`,
flat) and metadata: model config, tokenizer JSON, training options, step, seed and the data
fingerprint. model.safetensors holds the parameters, config and tokenizer only: it is what
`nbformer.load` / `nbformer generate` read.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import NbformerError, WeightsError
from ..weights import NATIVE_CONFIG_KEY
from ..weights.safetensors_io import SafetensorsFile, save_file

TOKENIZER_KEY = "nbformer_tokenizer"
STATE_KEY = "nbformer_train_state"


class CheckpointError(NbformerError):
    pass


def atomic_save(path: Path, tensors: dict, metadata: dict):
    """Write to a temp file in the same folder, fsync it, then rename over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise CheckpointError(f"{path.parent}: cannot write checkpoints there ({e.strerror})") from None
    try:
        save_file(tensors, tmp, metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are ordinary files
        os.replace(tmp, path)
        try:
            dfd = os.open(path.parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        except OSError:
            pass
    except (OSError, Exception) as e:  # disk full, permissions, safetensors' own errors
        try:
            os.unlink(tmp)
        except OSError:
            pass
        msg = getattr(e, "strerror", None) or str(e)
        raise CheckpointError(f"{path}: writing the checkpoint failed ({msg}); the previous checkpoint "
                              f"is left intact") from None


def save_training(dirpath: Path, cfg: ModelConfig, params: dict, m: np.ndarray, v: np.ndarray,
                  tokenizer_json: str, state: dict):
    base = {NATIVE_CONFIG_KEY: json.dumps(cfg.to_dict(), sort_keys=True), TOKENIZER_KEY: tokenizer_json}
    atomic_save(Path(dirpath) / "checkpoint.safetensors", {**params, "optim.m": m, "optim.v": v},
                {**base, STATE_KEY: json.dumps(state, sort_keys=True)})
    atomic_save(Path(dirpath) / "model.safetensors", params, base)


def load_training(path: Path):
    """-> (config, params, m, v, tokenizer_json, state) from a checkpoint.safetensors."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    f = SafetensorsFile(path)
    meta = f.metadata
    for key in (NATIVE_CONFIG_KEY, STATE_KEY, TOKENIZER_KEY):
        if key not in meta:
            raise CheckpointError(f"{path}: not a training checkpoint (metadata '{key}' is missing)")
    try:
        cfg = ModelConfig.from_dict(json.loads(meta[NATIVE_CONFIG_KEY]))
        state = json.loads(meta[STATE_KEY])
    except (ValueError, NbformerError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({e})") from None
    from ..weights.params import param_shapes

    params = {}
    for name, shape in param_shapes(cfg).items():
        if name not in f.keys():
            raise WeightsError(f"{path}: tensor '{name}' is missing")
        a = f.get(name)
        if tuple(a.shape) != tuple(shape):
            raise WeightsError(f"{path}: tensor '{name}' has shape {tuple(a.shape)}, expected {tuple(shape)}")
        params[name] = np.array(a, dtype=np.float32)
    for name in ("optim.m", "optim.v"):
        if name not in f.keys():
            raise WeightsError(f"{path}: tensor '{name}' (optimizer state) is missing")
    return cfg, params, np.array(f.get("optim.m")), np.array(f.get("optim.v")), meta[TOKENIZER_KEY], state
