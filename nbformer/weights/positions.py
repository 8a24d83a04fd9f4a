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


def rope_inv_freq(head_size: int, theta: float, scaling: str = "none", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_positions: int = 0) -> np.ndarray:
    """(HS/2,) float64 rotary inverse frequencies theta^(-2i/HS), rescaled as Hugging Face's
    rope_type says: 'linear' divides them all by factor; 'llama3' divides the low frequencies
    (wavelength > original_max_positions / low_freq_factor) by factor, keeps the high ones
    (wavelength < original_max_positions / high_freq_factor) and interpolates in between."""
    inv = 1.0 / np.power(float(theta), np.arange(0, head_size, 2, dtype=np.float64) / head_size)
    if scaling == "none":
        return inv
    if scaling == "linear":
        return inv / factor
    if scaling == "llama3":
        old = float(original_max_positions)
        low_wl, high_wl = old / low_freq_factor, old / high_freq_factor
        wl = 2 * np.pi / inv
        scaled = np.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        return np.where(medium, smoothed, scaled)
    raise ValueError(f"rope_inv_freq: scaling must be none | linear | llama3, got {scaling!r}")


def rope_inv_freq_of(cfg) -> np.ndarray:
    """rope_inv_freq for a ModelConfig with positions = 'rope', then divided by the per-dimension
    rope_freq_factors when the config has them (llama.cpp's rope_freqs: theta_i = pos * inv_i / ff_i)."""
    inv = rope_inv_freq(cfg.head_size, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor,
                        cfg.rope_high_freq_factor, cfg.rope_original_max_positions)
    ff = getattr(cfg, "rope_freq_factors", ())
    return inv / np.asarray(ff, dtype=np.float64) if len(ff) else inv


def rope_freq_factors_of(cfg) -> np.ndarray:
    """(HS/2,) float64 divisors d with rope_inv_freq_of(cfg) = base / d, where base is theta^(-2i/HS)
    with only a 'linear' rope_scaling applied (GGUF keeps that one as rope.scaling.type / factor):
    what llama.cpp's rope_freqs tensor holds. All 1 for a model without llama3 scaling or factors."""
    lin = cfg.rope_scaling == "linear"
    base = rope_inv_freq(cfg.head_size, cfg.rope_theta, "linear" if lin else "none", cfg.rope_factor)
    return base / rope_inv_freq_of(cfg)
