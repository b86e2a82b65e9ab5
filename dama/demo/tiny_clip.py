"""A tiny random CLIP (model + processor) built offline from configs, for tests and the demo.

The real scorer is LLaVA-1.5's vision tower, openai/clip-vit-large-patch14-336; no package ships its weights, and
nothing here may download them. This module builds a model of the same class with a few thousand parameters and a
CLIP-style tokenizer trained in-process on a small caption corpus, and saves both with `save_pretrained`, so that
the code under test loads them exactly as it would load the real ones (`CLIPModel.from_pretrained(path)`,
`CLIPProcessor.from_pretrained(path)`). Its scores are random but deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP marks the last piece of each word with this suffix, so "cat" and the "cat" inside "cats" differ.
END_OF_WORD = "</w>"
# The pre-tokenizer of CLIP's own tokenizer: letter runs, contractions, single digits, runs of other symbols.
_CLIP_SPLIT = Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")

CAPTIONS = (
    "A photo of a cat sitting on a red sofa next to a window.",
    "Two dogs are playing with a blue ball on the green grass.",
    "The kitchen has a white table, four wooden chairs and a vase of yellow flowers.",
    "A man in a black jacket is riding a bicycle down the street.",
    "There are 3 apples and 2.5 bananas on the plate, e.g. fruit for breakfast.",
    "The sign says \"No parking\" in large letters; a car is parked anyway.",
    "A small boat floats on the lake while the sun sets behind the mountains.",
    "The image shows a bus, a truck, a taxi, etc. waiting at the traffic light.",
    "A woman holds an umbrella because it is raining, and people walk past her.",
    "The bedroom contains a bed with striped sheets, which is next to a lamp.",
)


def train_clip_tokenizer(corpus: tuple[str, ...] | list[str] = CAPTIONS, merges: int = 200) -> CLIPTokenizer:
    """A byte-level BPE tokenizer with CLIP's normaliser, pre-tokenizer, word suffix and special tokens.

    The vocabulary is laid out as CLIP's is: the 256 byte symbols, the same with the end-of-word suffix (so any
    text encodes without unknown tokens), the learned merges, then bos and eos last (eos is the largest id,
    which is what CLIP's text pooling relies on in old configs).
    """
    tokenizer = Tokenizer(models.BPE(unk_token=EOS_TOKEN, end_of_word_suffix=END_OF_WORD))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(_CLIP_SPLIT, behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(alphabet) + merges,
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    learned = [tuple(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]

    vocab: dict[str, int] = {}
    for symbol in [*alphabet, *(char + END_OF_WORD for char in alphabet), *(left + right for left, right in learned)]:
        vocab.setdefault(symbol, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=learned, model_max_length=77)


def tiny_clip_config(
    tokenizer: CLIPTokenizer, image_size: int = 32, patch_size: int = 8, hidden: int = 32
) -> CLIPConfig:
    """A two-layer CLIP whose text tower matches `tokenizer` (vocabulary, special ids, 77 positions)."""
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=hidden // 2)


def build_tiny_clip(output_dir: str | Path, seed: int = 0, image_size: int = 32,
                    corpus: Sequence[str] = CAPTIONS) -> Path:
    """Build a random tiny CLIPModel and its CLIPProcessor and save both to `output_dir`; returns the folder.

    Images are processed as LLaVA-1.5's CLIP does it (shortest side resized, then a centre crop), at
    `image_size` pixels instead of 336. The tokenizer is trained on `corpus`.
    """
    if image_size < 8 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of the patch size 8, got {image_size}")
    output_dir = Path(output_dir)
    tokenizer = train_clip_tokenizer(list(corpus))
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(tokenizer, image_size=image_size)).eval()
    model.save_pretrained(output_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(output_dir)
    return output_dir


@dataclass(frozen=True)
class CaptionedImage:
    """An image with statements that are true of it and statements that are not (its hard negatives)."""

    image: Image.Image
    true: tuple[str, ...]
    false: tuple[str, ...]


def contrastive_warm_up(clip_dir: str | Path, examples: Sequence[CaptionedImage], steps: int, batch_size: int = 32,
                        learning_rate: float = 2e-3, seed: int = 0) -> float:
    """Train the CLIP saved in `clip_dir` with CLIP's symmetric contrastive loss, in place; returns the last loss.

    Each step draws `batch_size` images, one true statement of each and one false statement of each (when it has
    any). An image is scored against every statement of the batch and must pick its own true one; a statement that
    is also true of that image (two scenes with the same background, say) is left out of its candidates rather than
    counted as a wrong answer. Each true statement must likewise pick its image among the batch's images.
    Hard negatives teach CLIP what the hardness pass needs: to score a wrong statement about an image below a right
    one, not only to tell images apart.
    """
    if steps < 0 or batch_size < 2:
        raise ValueError(f"need steps >= 0 and batch_size >= 2, got {steps} and {batch_size}")
    if len(examples) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} examples, got {len(examples)}")
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).train()
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    pixels = processor.image_processor(images=[e.image for e in examples], return_tensors="pt")["pixel_values"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    rng, loss = random.Random(seed), torch.tensor(float("nan"))
    for _ in range(steps):
        chosen = rng.sample(range(len(examples)), batch_size)
        texts = [rng.choice(examples[i].true) for i in chosen]
        texts += [rng.choice(examples[i].false) for i in chosen if examples[i].false]
        tokens = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        output = model(**tokens, pixel_values=pixels[chosen])
        # Statements (other than its own target) that are true of an image are not wrong answers for it.
        also_true = torch.tensor([[column != row and text in examples[i].true for column, text in enumerate(texts)]
                                  for row, i in enumerate(chosen)])  # (B, T)
        per_image = output.logits_per_image.masked_fill(also_true, float("-inf"))  # (B, T)
        per_text = output.logits_per_text[:batch_size, :].masked_fill(also_true[:, :batch_size].T, float("-inf"))
        targets = torch.arange(batch_size)
        loss = (torch.nn.functional.cross_entropy(per_image, targets)
                + torch.nn.functional.cross_entropy(per_text, targets)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(clip_dir)
    return float(loss.detach())
