"""A checkpoint shaped like `llava-hf/llava-1.5-7b-hf` in everything but width and depth, for tests.

What it shares with the real folder: `LlavaForConditionalGeneration`; the text model a Llama with vocab_size 32064,
rms_norm_eps 1e-5, max_position_embeddings 4096 and an untied lm_head; a CLIP vision tower at 336 px with 14-px
patches, read at layer -2 with the CLS feature dropped ("default"), so one `<image>` stands for (336 / 14)^2 = 576
image tokens; a GELU projector; `image_token_index` 32000 and `pad_token_id` 32001. The tokenizer is Llama 2's
32000-piece SentencePiece vocabulary (tests/fixtures/llama2-tokenizer) plus `<image>` (32000) and `<pad>` (32001),
non-legacy (`legacy: false` in its tokenizer_config, as in the real folder); the image processor is CLIP's (shortest
side resized to 336, centre crop to 336, CLIP mean and std); the processor has patch_size 14 and
num_additional_image_tokens 1.

What differs: hidden sizes of 32 and two layers in both towers, random weights. Everything is written with
`save_pretrained`, so the code under test loads it through the same calls as the real checkpoint
(`dama.model.loading.load_llava`: LlavaForConditionalGeneration / LlavaProcessor.from_pretrained).
"""

from __future__ import annotations

import json
import lzma
from functools import cache
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "llama2-tokenizer"
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
IMAGE_TOKEN_INDEX, PAD_TOKEN_ID = 32000, 32001
# The real checkpoint's embedding and lm_head have 32064 rows: 32002 tokens, padded to a multiple of 64.
TEXT_VOCAB_SIZE = 32064
IMAGE_SIZE, PATCH_SIZE = 336, 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2


@cache
def llama2_tokenizer_json() -> dict:
    """The fixture's tokenizer.json (the Llama 2 vocabulary and its BPE merges), decompressed."""
    with lzma.open(FIXTURE / "tokenizer.json.xz", "rt", encoding="utf-8") as handle:
        return json.load(handle)


def llama2_vocabulary() -> dict[str, int]:
    """Piece -> id of the 32000 Llama 2 pieces (a copy)."""
    return dict(llama2_tokenizer_json()["model"]["vocab"])


def build_llava15_tokenizer() -> LlamaTokenizer:
    """Llama 2's SentencePiece tokenizer, non-legacy, `<s>` in front of every call made with special tokens, with
    LLaVA-1.5's `<image>` (32000) and `<pad>` (32001)."""
    model = llama2_tokenizer_json()["model"]
    tokenizer = LlamaTokenizer(vocab=dict(model["vocab"]), merges=[tuple(pair) for pair in model["merges"]],
                               legacy=False, add_bos_token=True)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, PAD_TOKEN])
    if ids != [IMAGE_TOKEN_INDEX, PAD_TOKEN_ID]:
        raise AssertionError(f"<image> and <pad> got ids {ids}, expected [32000, 32001]")
    return tokenizer


def build_llava15_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_llava15_tokenizer(), patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1)


def llava15_shaped_config(hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4) -> LlavaConfig:
    vision_config = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                     num_hidden_layers=num_layers, num_attention_heads=2, image_size=IMAGE_SIZE,
                                     patch_size=PATCH_SIZE, projection_dim=hidden_size, hidden_act="quick_gelu")
    text_config = LlamaConfig(vocab_size=TEXT_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                              num_hidden_layers=num_layers, num_attention_heads=num_heads,
                              num_key_value_heads=num_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                              bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN_ID, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=IMAGE_TOKEN_INDEX,
                       image_seq_length=NUM_IMAGE_TOKENS, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=False, pad_token_id=PAD_TOKEN_ID)


def build_llava15_shaped(output_dir: str | Path, seed: int = 0) -> Path:
    """Writes the random checkpoint and its processor to `output_dir` with save_pretrained; returns the folder."""
    output_dir = Path(output_dir)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlavaForConditionalGeneration(llava15_shaped_config()).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(output_dir)
    build_llava15_processor().save_pretrained(output_dir)
    # transformers 5 does not write `legacy` back; the real folder states it, and so does this one.
    config_path = output_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["legacy"] = False
    config_path.write_text(json.dumps(tokenizer_config, indent=2))
    return output_dir
