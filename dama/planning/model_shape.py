"""The sizes of a LLaVA that set its training memory, read from its config.json alone (never its weights).

config.json goes through transformers' LlavaConfig, so every size the file leaves out takes the default the model
itself would get (llava-hf/llava-1.5-7b-hf's file names only a few text sizes and relies on LlamaConfig's defaults
for the rest). Parameter counts are computed from the sizes, layer by layer, as transformers builds the modules:
the Llama language model (embeddings, decoder layers, final norm, lm_head), the CLIP vision tower and the two-layer
projector.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import LlavaConfig

from dama.errors import DamaError

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a LLaVA: the Llama language model (H, I, L, heads, V), the CLIP tower (Hv, Iv, Lv) and the images."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    projector_bias: bool
    drops_cls_token: bool

    @classmethod
    def from_config(cls, config: LlavaConfig) -> ModelShape:
        text, vision = config.text_config, config.vision_config
        if not isinstance(config.vision_feature_layer, int):
            raise DamaError("the plan knows one vision feature layer (LLaVA-1.5's); this config concatenates several")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads or text.num_attention_heads, head_dim=head_dim,
            attention_bias=bool(getattr(text, "attention_bias", False)),
            mlp_bias=bool(getattr(text, "mlp_bias", False)),
            tie_word_embeddings=bool(text.tie_word_embeddings),
            vision_hidden_size=vision.hidden_size, vision_intermediate_size=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers, vision_heads=vision.num_attention_heads,
            image_size=vision.image_size, patch_size=vision.patch_size,
            projector_bias=bool(getattr(config, "multimodal_projector_bias", True)),
            drops_cls_token=config.vision_feature_select_strategy == "default",
        )

    # ---- token counts ----

    @property
    def vision_tokens(self) -> int:
        """Tokens of one image inside the vision tower: the patches and the CLS token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def image_tokens(self) -> int:
        """Image tokens one image puts into the language model's sequence."""
        return self.vision_tokens - 1 if self.drops_cls_token else self.vision_tokens

    # ---- parameter counts ----

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, \
            self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def decoder_layer_linear_params(self) -> int:
        """Weights and biases of one decoder layer's seven projections."""
        total = 0
        for name, (fan_in, fan_out) in self.linear_shapes().items():
            bias = self.mlp_bias if name in ("gate_proj", "up_proj", "down_proj") else self.attention_bias
            total += fan_in * fan_out + (fan_out if bias else 0)
        return total

    def decoder_layer_params(self) -> int:
        return self.decoder_layer_linear_params() + 2 * self.hidden_size  # + the two RMSNorm weights

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """The head's own weight: 0 when it is tied to the embeddings."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def language_model_params(self) -> int:
        """Embeddings, decoder layers and final norm (the lm_head apart)."""
        return self.embedding_params() + self.num_layers * self.decoder_layer_params() + self.hidden_size

    def vision_tower_params(self) -> int:
        hv, iv = self.vision_hidden_size, self.vision_intermediate_size
        embeddings = 3 * self.patch_size ** 2 * hv + hv + self.vision_tokens * hv  # patch conv, CLS, positions
        layer = 4 * (hv * hv + hv) + (hv * iv + iv) + (iv * hv + hv) + 2 * 2 * hv  # attention, MLP, 2 LayerNorms
        return embeddings + 2 * hv + self.vision_layers * layer + 2 * hv  # pre- and post-LayerNorm

    def projector_params(self) -> int:
        hv, h = self.vision_hidden_size, self.hidden_size
        return hv * h + h * h + (2 * h if self.projector_bias else 0)

    def total_params(self) -> int:
        return self.language_model_params() + self.lm_head_params() + self.vision_tower_params() + \
            self.projector_params()

    def lora_params(self, rank: int) -> int:
        """Parameters of rank-r adapters on the seven projections of every decoder layer."""
        return self.num_layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in self.linear_shapes().values())


def read_model_shape(model_path: str | Path) -> ModelShape:
    """The ModelShape of the LLaVA saved in `model_path` (its config.json only)."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        raise DamaError(f"{model_path} holds no config.json: give the folder of a saved LlavaForConditionalGeneration")
    config = LlavaConfig.from_json_file(str(config_file))
    if config.text_config.model_type != "llama":
        raise DamaError(f"the plan knows Llama language models, {config_file} has {config.text_config.model_type!r}")
    return ModelShape.from_config(config)
