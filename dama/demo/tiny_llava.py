"""A tiny random LLaVA-1.5 (model + processor) built offline from configs, for tests and the demo.

LLaVA-1.5 is a CLIP ViT-L/14-336 vision tower, a two-layer MLP projector and a Llama (Vicuna) language model; its
processor is a Llama tokenizer with an `<image>` token plus a CLIPImageProcessor (shortest side resized to 336,
centre crop). Nothing here downloads anything: the tokenizer is a byte-level BPE trained in-process on a corpus the
caller gives (the demo's: `dama.demo.data.demo_corpus`), the image processor is built from its arguments, and the model
is random, so the code under test loads all of it exactly as it would load the real one
(`LlavaForConditionalGeneration.from_pretrained(path)`, `LlavaProcessor.from_pretrained(path)`).

Sizes: 32-px images in 8-px patches give 16 image tokens (576 for the real model); the language model has 2 layers,
hidden size 64 and grouped-query attention (4 query heads, 2 key/value heads), so that code paths for
num_key_value_heads < num_attention_heads are exercised. A forward and backward of a few pairs takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN = "<unk>", "<s>", "</s>", "<pad>", "<image>"
# Trained first, so they take ids 0-4 in this order.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)
def train_tiny_tokenizer(corpus: list[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with LLaVA's special tokens, wrapped as a fast tokenizer.

    Byte-level, so any text encodes without `<unk>`; like Llama's tokenizer it puts `<s>` in front when called with
    add_special_tokens=True. `<image>` is a special token, so it is never split or merged with its neighbours.
    `corpus` is the text the merges are learned from: the data's vocabulary and the conversation template.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(
            f"vocab_size must leave room for the {len(SPECIAL_TOKENS)} special tokens and the {len(alphabet)} byte "
            f"symbols (>= {len(SPECIAL_TOKENS) + len(alphabet)}), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN],
        model_max_length=2048,
    )


def build_tiny_processor(
    tokenizer: PreTrainedTokenizerFast, image_size: int = 32, patch_size: int = 8
) -> LlavaProcessor:
    """A LlavaProcessor as LLaVA-1.5's: CLIP preprocessing (shortest side to `image_size`, centre crop, CLIP mean
    and std) and one `<image>` token per patch (the CLS feature is dropped, vision_feature_select_strategy
    "default")."""
    if image_size < patch_size or image_size % patch_size:
        raise ValueError(f"image_size must be a positive multiple of patch_size={patch_size}, got {image_size}")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        # The CLIP tower emits a CLS feature besides the patches; "default" drops it again.
        num_additional_image_tokens=1,
    )


def tiny_llava_config(
    processor: LlavaProcessor,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_key_value_heads: int = 2,
    vision_hidden_size: int = 32,
) -> LlavaConfig:
    """A LlavaConfig shaped like LLaVA-1.5's (CLIP tower read at layer -2, CLS dropped, GELU projector, untied
    head), sized for tests, whose vocabulary, special ids, image size and patch size match `processor`."""
    tokenizer = processor.tokenizer
    crop = processor.image_processor.crop_size
    if crop["height"] != crop["width"]:
        raise ValueError(f"the CLIP tower needs square crops, the processor crops to {crop}")
    image_size, patch_size = crop["height"], processor.patch_size
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=processor.image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def build_tiny_llava(
    corpus: list[str], output_dir: str | Path | None = None, seed: int = 0, image_size: int = 32, patch_size: int = 8
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random tiny LLaVA and its processor, its tokenizer trained on `corpus`; saved with `save_pretrained` to
    `output_dir` when one is given.

    The weights are a function of `seed`; the model is returned in eval mode, in float32.
    """
    processor = build_tiny_processor(train_tiny_tokenizer(corpus), image_size=image_size, patch_size=patch_size)
    config = tiny_llava_config(processor)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlavaForConditionalGeneration(config).eval()
    finally:
        # Building a test fixture should not move the caller's random stream.
        torch.random.set_rng_state(generator_state)
    if output_dir is not None:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return model, processor
