"""DamaTrainer: transformers.Trainer with the DAMA loss over preference batches (any layout of dama.data.batch).

compute_loss: DamaPolicy(batch) -> policy log-probs (S,) -> chosen/rejected -> DamaLoss (with the reference
log-probs from the batch, or from a frozen reference policy when reference="online"). What it adds to the Trainer:
- the DAMA metrics (TRL's names plus dama/*), averaged over each logging window;
- checkpoints that count only once complete, with the DamaLoss state (dama.training.checkpointing);
- the fused head's gradient filter watched: the share of d_logits tiles it filtered is logged per window
  (head/filtered_tile_share), and the next window's backward skips the filtered tiles in its gradient products when
  that share reaches dama_kernels.grad_filter.KEPT_PRODUCTS_MIN_SHARE, else runs them dense (the share is read at
  logging, where the Trainer reads the loss anyway; a resumed run starts dense until its first log);
- non-finite guard: a micro-batch whose policy log-probs are not finite (on any rank) is skipped before backward and
  counted (dama/nonfinite_steps); max_nonfinite_steps in a row stop the run with NonFiniteLossError.
  Under DeepSpeed a skipped micro-batch also shifts the gradient-accumulation boundary by one micro-batch.
It goes through the Trainer's public hooks (compute_loss, training_step, get_train_dataloader, save_model, train and
callbacks); the two private methods it overrides, and why, are in dama.training.private_overrides.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from transformers import Trainer, TrainerCallback

from dama.data.batch import PreferenceBatch
from dama.data.collator import TokenBudgetBatchSampler, layout_pair_lengths
from dama.method.distributed import all_reduce_sum
from dama.method.loss import DamaLoss
from dama.model.policy import DamaPolicy
from dama_kernels.grad_filter import KEPT_PRODUCTS_MIN_SHARE, FilteredTiles, count_filtered_tiles

from .checkpointing import CheckpointCompletion, newest_checkpoint, restore_dama_state, save_policy_folder
from .private_overrides import PolicyWeightLoading

logger = logging.getLogger(__name__)

class NonFiniteLossError(RuntimeError):
    """Raised after max_nonfinite_steps consecutive micro-batches with non-finite policy log-probs."""


class _EndOptimizerStep(TrainerCallback):
    """ema_update="optimizer_step": the running statistics move once per optimizer step."""

    def __init__(self, dama_loss: DamaLoss) -> None:
        self.dama_loss = dama_loss

    def on_step_end(self, args, state, control, **kwargs):
        self.dama_loss.end_optimizer_step()


class DamaTrainer(PolicyWeightLoading, Trainer):
    """Trainer for DamaPolicy models; see the module docstring. `args` is a DamaTrainingArguments."""

    def __init__(self, *, model: DamaPolicy, dama_loss: DamaLoss, ref_policy: DamaPolicy | None = None,
                 adapters=None, **trainer_kwargs) -> None:
        """adapters: peft's PeftModel around model.llava when it carries LoRA adapters (dama.model.lora); the
        checkpoints are then adapter folders, and the online reference is the policy with its adapters off."""
        super().__init__(model=model, **trainer_kwargs)
        if self.args.reference == "online" and ref_policy is None and adapters is None:
            raise ValueError("reference='online' needs a ref_policy (a frozen DamaPolicy of the starting model) or "
                             "LoRA adapters (whose base model is the reference)")
        self.adapters = adapters
        # The loss is normalised by the global selected count inside DamaLoss; the Trainer only divides by the
        # number of accumulated micro-batches.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        self.dama_loss = dama_loss.to(self.args.device)
        self.ref_policy = None
        if ref_policy is not None:
            self.ref_policy = ref_policy.to(self.args.device).eval().requires_grad_(False)
        self.nonfinite_in_a_row = 0
        self.nonfinite_steps = 0
        # The rows left out of train_file / eval_file by the row check (dama.data.validation.SkipReport), by field.
        self.skip_reports: dict[str, Any] = {}
        self._window_metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list),
                                                                   "eval": defaultdict(list)}
        self._head_tiles: FilteredTiles | None = None  # counting while train() runs
        self.add_callback(CheckpointCompletion(self))
        if self.args.ema_update == "optimizer_step":
            self.add_callback(_EndOptimizerStep(self.dama_loss))

    # ---- data ----

    def get_train_dataloader(self) -> DataLoader:
        """Batches of pairs: under a token budget (max_tokens_per_batch), else train_batch_size pairs each; in a
        seeded random order, or in file order with shuffle=False. accelerate shards the batches over processes."""
        if self.args.max_tokens_per_batch:
            dataset = self.train_dataset
            pair_lengths = layout_pair_lengths(dataset.pair_lengths, dataset.prompt_lengths, self.args.layout)
            batches = TokenBudgetBatchSampler(pair_lengths, self.args.max_tokens_per_batch, shuffle=self.args.shuffle,
                                              seed=self.args.seed, drop_last=self.args.dataloader_drop_last)
        elif self.args.shuffle:
            return super().get_train_dataloader()
        else:
            batches = BatchSampler(SequentialSampler(self.train_dataset), self.args.train_batch_size,
                                   drop_last=self.args.dataloader_drop_last)
        loader = DataLoader(self.train_dataset, batch_sampler=batches, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def floating_point_ops(self, inputs: PreferenceBatch) -> int:
        """The usual 6 x parameters x tokens estimate of a training step's FLOPs (for the Trainer's total_flos)."""
        if not hasattr(self, "_num_parameters"):
            self._num_parameters = sum(p.numel() for p in self.model.llava.parameters())
        return 6 * self._num_parameters * inputs.input_ids.numel()

    # ---- loss ----

    def _reference_logps(self, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_policy is not None:
            with torch.no_grad():
                return batch.split_chosen_rejected(self.ref_policy(batch))
        if self.args.reference == "online":
            return batch.split_chosen_rejected(self._base_model_logps(batch))
        if self.args.average_logps:
            chosen, rejected = batch.ref_chosen_mean_logps, batch.ref_rejected_mean_logps
        else:
            chosen, rejected = batch.ref_chosen_logps, batch.ref_rejected_logps
        if bool(torch.isnan(chosen).any() | torch.isnan(rejected).any()):
            raise ValueError(
                f"rows {batch.row_ids[:3]}... have no reference log-probs: run `dama precompute-ref` on the data "
                "first, or train with --reference online"
            )
        return chosen, rejected

    def _base_model_logps(self, batch: PreferenceBatch) -> torch.Tensor:
        """Log-probs (S,) of the starting model: the policy with its LoRA adapters (and trained copies) switched off."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.adapters.disable_adapter():
                return self.model(batch)
        finally:
            self.model.train(was_training)

    def compute_loss(self, model, inputs: PreferenceBatch, return_outputs: bool = False, num_items_in_batch=None):
        # The reference first: its forward then never runs beside the policy's saved activations.
        ref_chosen, ref_rejected = self._reference_logps(inputs)
        policy_logps = model(inputs)  # (S,)
        # Decided on the global batch, so every rank skips (or not) together and DamaLoss's collectives stay paired.
        nonfinite = all_reduce_sum((~torch.isfinite(policy_logps.detach())).sum().double())
        if float(nonfinite) > 0:
            loss = torch.full((), math.nan, device=policy_logps.device)
            return (loss, None) if return_outputs else loss
        policy_chosen, policy_rejected = inputs.split_chosen_rejected(policy_logps)
        hardness = inputs.hardness if self.args.data_aware else None
        output = self.dama_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, hardness=hardness)
        mode = "train" if self.model.training else "eval"
        for name, value in output.metrics.items():
            self._window_metrics[mode][name].append(float(value))
        # Engines average gradients over ranks; DamaLoss's per-rank losses must be summed (see dama.loss).
        loss = output.loss_for_ddp
        return (loss, output) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = inputs.to(self.args.device)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        if not torch.isfinite(loss):
            self.nonfinite_steps += 1
            self.nonfinite_in_a_row += 1
            logger.warning("non-finite policy log-probs at step %d (rows %s): micro-batch skipped (%d in a row)",
                           self.state.global_step, inputs.row_ids[:4], self.nonfinite_in_a_row)
            if self.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} micro-batches in a row had non-finite log-probs (step "
                    f"{self.state.global_step}); stopping. The last checkpoint in {self.args.output_dir} is intact: "
                    "lower the learning rate or check the data, then resume with --resume."
                )
            return torch.zeros((), device=self.args.device)
        self.nonfinite_in_a_row = 0
        loss = loss / self.current_gradient_accumulation_steps
        kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}
        self.accelerator.backward(loss, **kwargs)
        return loss.detach()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = inputs.to(self.args.device)
        # Evaluation must not move the running statistics.
        self.dama_loss.eval()
        try:
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
        finally:
            self.dama_loss.train()
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        window = self._window_metrics[mode]
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{name}": sum(values) / len(values) for name, values in window.items() if values})
        if mode == "train":
            logs["dama/nonfinite_steps"] = float(self.nonfinite_steps)
            self._watch_head_filter(logs)
        window.clear()
        super().log(logs, start_time)

    def _watch_head_filter(self, logs: dict[str, float]) -> None:
        """Logs the window's share of filtered d_logits tiles and picks the next window's gradient products."""
        tiles = self._head_tiles
        if tiles is None or not tiles.total:
            return
        share = tiles.skipped_share
        logs["head/filtered_tile_share"] = share
        self.model.head.skip_filtered_tiles = share >= KEPT_PRODUCTS_MIN_SHARE
        tiles.reset()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The LLaVA inside the policy as a loadable save_pretrained folder (with LoRA: the adapter folder), the
        processor and the training arguments (dama.training.checkpointing.save_policy_folder)."""
        state_dict = None
        if self.is_deepspeed_enabled:
            # Every rank takes part in gathering the weights (ZeRO-3 partitions them); the saving process writes.
            state_dict = self.accelerator.get_state_dict(self.model_wrapped)
        if self.args.should_save:
            save_policy_folder(self, output_dir if output_dir is not None else self.args.output_dir, state_dict)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = newest_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            self.nonfinite_steps = restore_dama_state(resume_from_checkpoint, self.dama_loss)
            resume_from_checkpoint = str(resume_from_checkpoint)
        with count_filtered_tiles() as self._head_tiles:
            try:
                return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)
            finally:
                self._head_tiles = None
