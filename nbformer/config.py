"""ModelConfig: everything the graph builders need to know about a transformer, validated
on construction so that a bad config fails here, with the field named, and not in a kernel."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .errors import ConfigError

ARCHES = ("encoder", "decoder", "encoder_decoder")
NORMS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
# sinusoidal: PE(p, 2i) = sin, PE(p, 2i+1) = cos (Vaswani et al.); sinusoidal_split: the sines in the
# first half of the vector, the cosines in the second (Marian / fairseq layout); both static tables.
POSITIONS = ("learned", "sinusoidal", "sinusoidal_split", "none")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # encoder | decoder | encoder_decoder
    vocab_size: int
    d_model: int  # C
    n_heads: int  # NH
    n_layers: int  # encoder layers for encoder / encoder_decoder, decoder layers for decoder
    d_ff: int
    max_positions: int  # length of the position table (learned) or the longest allowed T
    norm: str = "post"  # where LayerNorm sits: post = LN(x + f(x)), pre = x + f(LN(x))
    activation: str = "gelu"
    positions: str = "learned"
    type_vocab_size: int = 0  # token-type (segment) embeddings, BERT style; 0 = none
    tie_word_embeddings: bool = True  # output projection reuses the token embedding
    layer_norm_eps: float = 1e-5
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
    family: str = "nbformer"  # the checkpoint naming scheme: bert | gpt2 | nbformer
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
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "max_positions"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "a positive integer")
        if not isinstance(self.n_layers, int) or self.n_layers < 0:
            bad("n_layers", "a non-negative integer")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model config: d_model = {self.d_model} is not divisible by n_heads = {self.n_heads}")
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
        return self.d_model // self.n_heads

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
