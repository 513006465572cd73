"""ModelSpec: the shape of a decoder-only transformer, as the planner's models need it.

A spec comes from a preset name, a tandem ``GPTConfig`` (object or JSON), or a Hugging Face
``config.json`` (the file, or the directory holding it): see ``tandem.plan.model_input``.
Parameter counts are exact for tandem's GPT and Llama-class models: every weight and bias,
LayerNorm (weight and bias) or RMSNorm (weight), learned position embeddings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["ModelSpec"]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A decoder-only transformer: L blocks of attention + MLP between an embedding and a head."""

    name: str = "model"
    """what the tables call it"""
    num_layers: int
    """transformer blocks L"""
    hidden_size: int
    """model width h"""
    num_heads: int
    """query heads a"""
    vocab_size: int
    """vocabulary V (as stored: padded where the framework pads it)"""
    num_kv_heads: int | None = None
    """key/value heads g for grouped-query attention (None: a)"""
    ffn_hidden_size: int | None = None
    """MLP width f (None: 4h)"""
    max_seq_len: int = 2048
    """longest sequence (learned position embeddings have this many rows)"""
    gated_mlp: bool = False
    """SwiGLU MLP (gate and up projections, f each) instead of one GeLU projection"""
    norm: str = "layernorm"
    """"layernorm" (weight and bias) or "rmsnorm" (weight)"""
    bias: bool = True
    """biases in the linear layers"""
    position: str = "learned"
    """"learned" position embeddings or "rope" (no parameters)"""
    tie_embeddings: bool = False
    """the LM head multiplies by the token embedding's weight"""

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_heads", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelSpec {self.name!r}: {name} must be an int >= 1, got {value!r}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ModelSpec {self.name!r}: hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelSpec {self.name!r}: num_heads={self.num_heads} is not divisible by "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.ffn_hidden_size < 1:
            raise ValueError(f"ModelSpec {self.name!r}: ffn_hidden_size must be >= 1, got {self.ffn_hidden_size}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"ModelSpec {self.name!r}: norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.position not in ("learned", "rope"):
            raise ValueError(f"ModelSpec {self.name!r}: position must be 'learned' or 'rope', got {self.position!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_size(self) -> int:
        """Width of the key (and of the value) projection: g * head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_in_width(self) -> int:
        """Output width of the MLP's first GEMM: f, or 2f (gate and up) when gated."""
        return self.ffn_hidden_size * (2 if self.gated_mlp else 1)

    @property
    def norm_params(self) -> int:
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    def layer_params(self) -> int:
        """Parameters of one block: q, k, v, o projections, the MLP, two norms."""
        h, kv, f = self.hidden_size, self.kv_size, self.ffn_hidden_size
        attn = h * (h + 2 * kv) + h * h + (h + 2 * kv + h if self.bias else 0)
        mlp = h * self.mlp_in_width + f * h + (self.mlp_in_width + h if self.bias else 0)
        return attn + mlp + 2 * self.norm_params

    def embedding_params(self) -> int:
        """Token embedding, plus learned position embeddings."""
        pos = self.max_seq_len * self.hidden_size if self.position == "learned" else 0
        return self.vocab_size * self.hidden_size + pos

    def head_params(self) -> int:
        """Final norm and the LM head's own weight (none when tied)."""
        return self.norm_params + (0 if self.tie_embeddings else self.vocab_size * self.hidden_size)

    def num_params(self) -> int:
        return self.num_layers * self.layer_params() + self.embedding_params() + self.head_params()

    def to_dict(self) -> dict:
        return asdict(self)

    def gpt_config_fields(self, seq_len: int) -> dict | None:
        """The fields of a tandem ``GPTConfig`` for this model at ``seq_len``, or None when
        tandem's GPT cannot express it (SwiGLU, RMSNorm, RoPE)."""
        if self.gated_mlp or self.norm != "layernorm" or self.position != "learned":
            return None
        return dict(vocab_size=self.vocab_size, max_seq_len=seq_len, num_layers=self.num_layers,
                    hidden_size=self.hidden_size, num_heads=self.num_heads,
                    num_kv_heads=None if self.num_kv_heads == self.num_heads else self.num_kv_heads,
                    ffn_hidden_size=self.ffn_hidden_size, tie_embeddings=self.tie_embeddings, bias=self.bias)
