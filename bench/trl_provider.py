"""TRL's DPOTrainer as a provider of the end-to-end benchmark: the DPO step of the library most DPO users run.

TRL 1.16's DPOTrainer with its defaults for vision data, built around the benchmark's model: plain DPO (sigmoid loss,
beta 0.1), a live reference model (a frozen copy of the policy that runs a forward per step; TRL refuses precomputed
reference log-probs for vision data), the S = 2P sequences padded to the longest (chosen block, then rejected
block), each sequence with its own copy of its pair's image (so each image goes through the vision tower twice per
model), its chunked fused LM head, and its default activation checkpointing. A step is the core of the trainer's own
training step (its compute_loss with the reference forward, its accelerator's backward) and then the same torch AdamW
step as the other providers.

Data: TRL's vision collator tokenizes text with the model's processor; the benchmark's pairs are token ids, so
`trl_inputs` hands the trainer the batch that collator makes of them: input_ids and attention_mask padded after each
sequence, completion_mask on the response tokens, pixel_values once per sequence. The trainer is built with a small
offline LlavaProcessor only because it requires one; the processor never tokenizes the benchmark's data.

Precision: the model's weights are in the run's dtype, as for the other providers; TRL's bf16 autocast default is
switched off so that every provider computes in the same dtype.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dama.data.batch import IGNORE_INDEX, PreferenceExample

PROVIDER = "trl_dpo"


def trl_missing_reason() -> str | None:
    """Why the TRL provider cannot run here (None when it can)."""
    try:
        import trl
    except ImportError:
        return "trl is not installed (pip install -e '.[test]' installs it)"
    return None if hasattr(trl, "DPOTrainer") else f"trl {trl.__version__} has no DPOTrainer"


@dataclass
class TrlSetup:
    """A DPOTrainer around the policy, its optimizer, and the trainable parameters (in the model's order)."""

    trainer: object
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]


def build_trl_setup(llava: nn.Module, pad_id: int, image_size: int, patch_size: int, learning_rate: float,
                    device: torch.device) -> TrlSetup:
    """DPOTrainer(model=llava, ref_model=a frozen copy) with TRL's defaults but the run's precision and device."""
    import datasets
    from PIL import Image
    from trl import DPOConfig, DPOTrainer

    from dama.demo.tiny_llava import build_tiny_processor, train_tiny_tokenizer

    reference = copy.deepcopy(llava).requires_grad_(False)
    processor = build_tiny_processor(train_tiny_tokenizer(["a picture of a shape"]), image_size, patch_size)
    # One row that marks the data as vision data (TRL reads its keys); the benchmark's own pairs are fed per step.
    marker = datasets.Dataset.from_list([{"image": Image.new("RGB", (image_size, image_size)), "prompt": "a",
                                          "chosen": "b", "rejected": "c"}])
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl_dpo_"), report_to="none", bf16=False, fp16=False,
                     use_cpu=device.type == "cpu", learning_rate=learning_rate, beta=0.1, max_length=None,
                     per_device_train_batch_size=1)
    trainer = DPOTrainer(model=llava, ref_model=reference, args=args, train_dataset=marker,
                         processing_class=processor)
    # TRL set the tokenizer's pad id on the model; the benchmark's sequences pad with their own.
    llava.config.get_text_config().pad_token_id = pad_id
    if args.activation_checkpointing:
        # What Trainer.train() switches on before its first step (TRL's default).
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=args.activation_checkpointing_kwargs)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    return TrlSetup(trainer, optimizer, params)


def trl_inputs(examples: Sequence[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """The batch TRL's vision collator makes of these pairs (module docstring).

    Shapes: input_ids, attention_mask, completion_mask (S, T) int64, S = 2P rows, chosen block then rejected block,
    T the longest sequence; pixel_values (S, 3, h, w), row s showing pair s mod P's image.
    """
    sequences = [(e.chosen_input_ids, e.chosen_labels) for e in examples] + [
        (e.rejected_input_ids, e.rejected_labels) for e in examples]
    length = max(ids.shape[0] for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, (ids, labels) in enumerate(sequences):
        input_ids[row, : ids.shape[0]] = ids
        attention_mask[row, : ids.shape[0]] = 1
        completion_mask[row, : ids.shape[0]] = (labels != IGNORE_INDEX).long()
    pixel_values = torch.stack([e.pixel_values for e in examples]).repeat(2, 1, 1, 1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "pixel_values": pixel_values}


def trl_forward_backward(setup: TrlSetup, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The core of TRL's training step: its compute_loss (policy and reference forward, DPO loss, its metrics) and its
    accelerator's backward. Inputs on the model's device. Returns the loss, detached."""
    trainer = setup.trainer
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    trainer.accelerator.backward(loss)
    return loss.detach()


def trl_sequence_logps(setup: TrlSetup, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The policy's summed response log-probs (S,) as TRL's loss computes them (its fused LM head)."""
    model = setup.trainer.model
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    model_inputs = {k: v for k, v in inputs.items() if k != "completion_mask"}
    outputs = model(**model_inputs, labels=labels, fused_lm_head=True, use_cache=False)
    return outputs.log_probs.sum(dim=1)
