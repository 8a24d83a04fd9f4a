"""ModelConfig: everything the graph builders need to know about a transformer, validated
on construction so that a bad config fails here, with the field named, and not in a kernel."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from .errors import ConfigError

ARCHES = ("encoder", "decoder", "encoder_decoder")
NORMS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
# sinusoidal: PE(p, 2i) = sin, PE(p, 2i+1) = cos (Vaswani et al.); sinusoidal_split: the sines in the
# first half of the vector, the cosines in the second (Marian / fairseq layout); both static tables.
# rope: rotary position embeddings (Su et al.) applied to queries and keys inside attention, in the
# Hugging Face "rotate half" layout (dimension i pairs with i + HS/2). GGUF files store Q/K rows
# permuted for llama.cpp's interleaved pairs (2i, 2i+1); a GGUF loader undoes that permutation
# (weights.hf_llama.unpermute_gguf_qk), so one rotation layout serves every checkpoint.
POSITIONS = ("learned", "sinusoidal", "sinusoidal_split", "rope", "none")
NORM_TYPES = ("layernorm", "rmsnorm")
# mlp: down(act(up(x))); glu: down(act(gate(x)) * up(x)) with gate|up one fused (2F, C) weight
# (act = silu: SwiGLU, as Llama; gelu / gelu_tanh: GeGLU)
FFN_TYPES = ("mlp", "glu")
# rope_scaling: how the rotary inverse frequencies are rescaled for long contexts (Hugging Face
# rope_type): none | linear (all divided by rope_factor) | llama3 (Llama 3.1's banded rescaling)
ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # encoder | decoder | encoder_decoder
    vocab_size: int
    d_model: int  # C
    n_heads: int  # NH
    n_layers: int  # encoder layers for encoder / encoder_decoder, decoder layers for decoder
    d_ff: int
    max_positions: int  # length of the position table (learned) or the longest allowed T
    norm: str = "post"  # where the norm sits: post = LN(x + f(x)), pre = x + f(LN(x))
    activation: str = "gelu"
    positions: str = "learned"
    type_vocab_size: int = 0  # token-type (segment) embeddings, BERT style; 0 = none
    tie_word_embeddings: bool = True  # output projection reuses the token embedding
    layer_norm_eps: float = 1e-5  # eps of every norm layer, LayerNorm or RMSNorm (Llama: rms_norm_eps)
    embedding_layernorm: bool = False  # LN right after the embedding sum (BERT)
    final_layernorm: bool = False  # LN after the last layer (pre-LN models: GPT-2)
    embedding_scale: float = 1.0  # sqrt(d_model) in the original Transformer
    qkv_bias: bool = True
    lm_head: bool = True  # decoders produce logits; encoders return hidden states
    lm_head_bias: bool = False
    n_decoder_layers: int = 0  # encoder_decoder only
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None  # encoder_decoder: first decoder input (Marian: pad)
    padding_idx: int | None = None  # nn.Embedding(padding_idx=...): this token row gets no gradient
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    family: str = "nbformer"  # the checkpoint naming scheme: bert | gpt2 | marian | llama | nbformer
    # ---- Llama-style models (the defaults keep every other model as it was)
    norm_type: str = "layernorm"  # layernorm: (x - mean) * rstd * w + b; rmsnorm: x * rstd * w (no bias)
    ffn_type: str = "mlp"  # mlp | glu (see FFN_TYPES); glu uses `activation` for the gate
    n_kv_heads: int | None = None  # grouped-query attention: NKV key/value heads, dividing n_heads (None = n_heads)
    head_dim: int | None = None  # HS when it is not d_model / n_heads (Llama's head_dim); None = d_model / n_heads
    attn_out_bias: bool = True  # the attention output projection has a bias
    ffn_bias: bool = True  # the FFN projections (up / gate|up, down) have biases
    rope_theta: float = 10000.0  # positions = 'rope': inverse frequencies theta^(-2i/HS)
    rope_scaling: str = "none"  # none | linear | llama3 (see ROPE_SCALINGS)
    rope_factor: float = 1.0  # linear / llama3: the scaling factor
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_positions: int = 0  # llama3 only: the pre-training context length
    # llama.cpp's rope_freqs (GGUF 'rope_freqs.weight', Llama 3.1 files): HS/2 per-dimension divisors of the
    # inverse frequencies, applied after rope_scaling (inv_freq[i] = scaled[i] / rope_freq_factors[i]); () = none
    rope_freq_factors: tuple = ()
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        def bad(name, expected):
            raise ConfigError(f"model config: '{name}' = {getattr(self, name)!r}, expected {expected}")

        if self.arch not in ARCHES:
            bad("arch", " | ".join(ARCHES))
        if self.norm not in NORMS:
            bad("norm", " | ".join(NORMS))
        if self.activation not in ACTIVATIONS:
            bad("activation", " | ".join(ACTIVATIONS))
        if self.positions not in POSITIONS:
            bad("positions", " | ".join(POSITIONS))
        if self.norm_type not in NORM_TYPES:
            bad("norm_type", " | ".join(NORM_TYPES))
        if self.ffn_type not in FFN_TYPES:
            bad("ffn_type", " | ".join(FFN_TYPES))
        if self.rope_scaling not in ROPE_SCALINGS:
            bad("rope_scaling", " | ".join(ROPE_SCALINGS))
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "max_positions"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "a positive integer")
        if not isinstance(self.n_layers, int) or self.n_layers < 0:
            bad("n_layers", "a non-negative integer")
        for name in ("n_kv_heads", "head_dim"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                bad(name, "None or a positive integer")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model config: d_model = {self.d_model} is not divisible by n_heads = {self.n_heads} "
                f"(set head_dim for heads of another size)")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model config: 'n_kv_heads' = {self.n_kv_heads} does not divide "
                              f"n_heads = {self.n_heads}")
        if self.arch == "encoder_decoder" and (self.kv_heads != self.n_heads or self.attn_width != self.d_model):
            bad("n_kv_heads" if self.kv_heads != self.n_heads else "head_dim",
                "None for an encoder_decoder model (grouped-query attention and head_dim are for "
                "encoders and decoders)")
        if self.positions == "rope":
            if self.head_size % 2:
                bad("head_dim" if self.head_dim is not None else "n_heads",
                    f"an even head size for rotary positions (head size is {self.head_size})")
            if self.arch == "encoder_decoder":
                bad("positions", "learned | sinusoidal | sinusoidal_split | none for an encoder_decoder model")
        for name in ("rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                bad(name, "a positive number")
        if self.rope_scaling != "none" and self.positions != "rope":
            bad("rope_scaling", "'none' unless positions is 'rope'")
        if self.rope_freq_factors is None or isinstance(self.rope_freq_factors, (str, bytes)):
            bad("rope_freq_factors", "a sequence of positive numbers (or empty)")
        try:  # a list from JSON -> a tuple of floats (the config stays hashable)
            ff = tuple(float(v) for v in self.rope_freq_factors)
        except (TypeError, ValueError):
            bad("rope_freq_factors", "a sequence of positive numbers (or empty)")
        object.__setattr__(self, "rope_freq_factors", ff)
        if ff:
            if self.positions != "rope":
                bad("rope_freq_factors", "empty unless positions is 'rope'")
            if len(ff) != self.head_size // 2:
                raise ConfigError(f"model config: 'rope_freq_factors' has {len(ff)} entries, expected head size / 2 "
                                  f"= {self.head_size // 2}")
            if not all(math.isfinite(v) and v > 0 for v in ff):
                bad("rope_freq_factors", "finite positive numbers")
        if self.rope_scaling == "llama3":
            if not isinstance(self.rope_original_max_positions, int) or self.rope_original_max_positions <= 0:
                bad("rope_original_max_positions", "a positive integer for rope_scaling 'llama3'")
            if self.rope_high_freq_factor <= self.rope_low_freq_factor:
                bad("rope_high_freq_factor", f"a number > rope_low_freq_factor = {self.rope_low_freq_factor}")
        if self.sinusoidal and self.d_model % 2:
            bad("d_model", "an even number for sinusoidal positions")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            bad("type_vocab_size", "a non-negative integer")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            bad("layer_norm_eps", "a positive number")
        if self.arch == "encoder_decoder" and self.n_decoder_layers <= 0:
            bad("n_decoder_layers", "a positive integer for an encoder_decoder model")
        if self.arch != "encoder_decoder" and self.n_decoder_layers:
            bad("n_decoder_layers", "0 unless arch is encoder_decoder")
        for name in ("pad_token_id", "padding_idx", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            v = getattr(self, name)
            if v is not None and not (0 <= v < self.vocab_size):
                bad(name, f"None or an id in [0, {self.vocab_size})")

    @property
    def sinusoidal(self) -> bool:
        """Positions come from a static sine table (a const tensor, not a parameter)."""
        return self.positions in ("sinusoidal", "sinusoidal_split")

    @property
    def head_size(self) -> int:  # HS
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:  # NKV: key/value heads (grouped-query attention when < n_heads)
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def attn_width(self) -> int:  # NH * HS: width of the attention output (= d_model unless head_dim says otherwise)
        return self.n_heads * self.head_size

    @property
    def qkv_width(self) -> int:  # (NH + 2 NKV) * HS: rows of the fused Q|K|V projection
        return (self.n_heads + 2 * self.kv_heads) * self.head_size

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {unknown}")
        try:
            return cls(**d)
        except TypeError as e:  # missing required fields
            raise ConfigError(f"model config: {e}") from None
