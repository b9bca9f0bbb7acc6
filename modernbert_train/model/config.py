"""The model's hyperparameters: a dataclass whose field names are transformers' ModernBertConfig's."""

import dataclasses
from dataclasses import dataclass

ATTN_BACKENDS = ("auto", "sdpa", "flex", "varlen", "flash")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")


class ModelConfigError(ValueError):
    """A model config value that cannot work; the message names the field."""


def pad_vocab_size(n: int, multiple: int = 64) -> int:
    """Round a tokenizer's vocabulary up so the embedding/decoder matmuls tile well on GPUs."""
    return -(-n // multiple) * multiple


@dataclass
class ModernBertConfig:
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int = 50283
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    mask_token_id: int = 50284
    global_rope_theta: float = 160000.0
    # None means local layers use global_rope_theta, as in transformers.
    local_rope_theta: float | None = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    global_attn_every_n_layers: int = 3
    # Local layers see local_attention // 2 tokens on each side.
    local_attention: int = 128
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    decoder_bias: bool = True
    classifier_activation: str = "gelu"
    classifier_bias: bool = False
    attn_backend: str = "auto"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def fail(field: str, why: str):
            raise ModelConfigError(f"model config: {field}={getattr(self, field)!r} {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "global_attn_every_n_layers", "local_attention",
                     "max_position_embeddings"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            fail("hidden_size", f"is not divisible by num_attention_heads={self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            fail("num_attention_heads", "gives an odd head dimension; rotary embeddings need an even one")
        if self.local_attention < 2:
            fail("local_attention", "must be at least 2 (the window spans local_attention // 2 each side)")
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                fail(name, f"must be a token id in [0, vocab_size={self.vocab_size})")
        for name in ("initializer_range", "initializer_cutoff_factor", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                fail(name, "must be a positive number")
        for name in ("attention_dropout", "embedding_dropout", "mlp_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, "must be in [0, 1)")
        for name in ("global_rope_theta", "local_rope_theta"):
            value = getattr(self, name)
            if value is not None and not (0 < value < float("inf")):  # NaN too
                fail(name, "must be a positive, finite number")
        for name in ("hidden_activation", "classifier_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                fail(name, f"is not one of {', '.join(ACTIVATIONS)}")
        if self.attn_backend not in ATTN_BACKENDS:
            fail("attn_backend", f"is not one of {', '.join(ATTN_BACKENDS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_global_layer(self, layer_id: int) -> bool:
        return layer_id % self.global_attn_every_n_layers == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModernBertConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelConfigError(f"model config: unknown key {unknown[0]!r}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModernBertConfig":
        if name not in PRESETS:
            raise ModelConfigError(f"model config: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS = {
    # ModernBERT-base and -large as released.
    "base": dict(hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12),
    "large": dict(hidden_size=1024, intermediate_size=2624, num_hidden_layers=28, num_attention_heads=16),
    # Small enough to train on a CPU.
    "mini": dict(hidden_size=256, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4),
    # For tests: one global and two local layers.
    "tiny": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, local_attention=16
    ),
}
