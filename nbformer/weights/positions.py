"""Static position tables (host arrays, computed once per model and bound as the const 'pos_emb')."""
import numpy as np


def sinusoidal_table(n_pos: int, C: int, layout: str = "interleaved") -> np.ndarray:
    """(n_pos, C) float32 sine table with angle(pos, i) = pos / 10000^(2i/C), i < C/2.

    interleaved: PE(pos, 2i) = sin, PE(pos, 2i+1) = cos (Vaswani et al.);
    split: PE(pos, i) = sin, PE(pos, C/2 + i) = cos (Marian, fairseq)."""
    pos = np.arange(n_pos, dtype=np.float64)[:, None]
    i2 = np.arange(0, C, 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, i2 / C)
    pe = np.empty((n_pos, C), dtype=np.float64)
    if layout == "interleaved":
        pe[:, 0::2] = np.sin(angle)
        pe[:, 1::2] = np.cos(angle)
    elif layout == "split":
        pe[:, : C // 2] = np.sin(angle)
        pe[:, C // 2:] = np.cos(angle)
    else:
        raise ValueError(f"sinusoidal_table: layout must be 'interleaved' or 'split', got {layout!r}")
    return pe.astype(np.float32)


def position_table(cfg) -> np.ndarray:
    """The static position table of a model with sinusoidal positions (bound as const 'pos_emb')."""
    layout = "split" if cfg.positions == "sinusoidal_split" else "interleaved"
    return sinusoidal_table(cfg.max_positions, cfg.d_model, layout)
