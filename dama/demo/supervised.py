"""The demo's supervised stage: next-token training of the tiny LLaVA on captions, standing in for LLaVA-1.5's SFT.

A random LLaVA knows neither language nor images. Real DAMA starts from LLaVA-1.5, a model that was taught to
describe images; the demo teaches its tiny LLaVA the same way, on `{image, question, chosen}` rows (the `chosen`
column holds the caption), vision tower included, so that it learns to see the drawn objects. The prompt is the
training template (`PairEncoder`), so the model answers `dama generate`'s prompts as it was taught.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from dama.data.batch import IGNORE_INDEX
from dama.data.dataset import PairEncoder
from dama.data.formats import PairRow, default_image_folder, load_preference_rows
from dama.model.loading import load_llava


@dataclass(frozen=True)
class SupervisedSettings:
    """Steps of `batch_size` captions; the learning rate decays linearly to zero after `warmup_steps`."""

    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    seed: int = 0


def _padded(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(sequence) for sequence in sequences)
    return torch.tensor([sequence + [value] * (width - len(sequence)) for sequence in sequences], dtype=torch.long)


def supervised_fine_tune(model_dir: str | Path, train_file: str | Path, settings: SupervisedSettings) -> float:
    """Train the LLaVA saved in `model_dir` on the captions of `train_file`, in place; returns the last token loss."""
    if settings.steps < 0 or settings.batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got {settings.steps} and {settings.batch_size}")
    model, processor = load_llava(model_dir)
    model.set_attn_implementation("sdpa")
    encoder = PairEncoder(processor)
    folder = default_image_folder(train_file)
    pairs = [PairRow.from_record(record, folder) for record in load_preference_rows(train_file)]
    prompts = encoder.encode_prompts([pair.question for pair in pairs])
    responses = encoder.encode_responses([pair.chosen for pair in pairs])
    pixels = processor.image_processor(images=[pair.load_image() for pair in pairs],
                                       return_tensors="pt")["pixel_values"]  # (R, 3, side, side)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / max(1, settings.warmup_steps), max(0.0, (settings.steps - step) / max(1, settings.steps))))
    rng, loss = random.Random(settings.seed), torch.tensor(float("nan"))
    pad_id = processor.tokenizer.pad_token_id
    for _ in range(settings.steps):
        rows = rng.sample(range(len(pairs)), min(settings.batch_size, len(pairs)))
        input_ids = _padded([prompts[i] + responses[i] for i in rows], pad_id)  # (B, L)
        labels = _padded([[IGNORE_INDEX] * len(prompts[i]) + responses[i] for i in rows], IGNORE_INDEX)  # (B, L)
        attention_mask = _padded([[1] * (len(prompts[i]) + len(responses[i])) for i in rows], 0)  # (B, L)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels[rows], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval().save_pretrained(model_dir)
    return float(loss.detach())
