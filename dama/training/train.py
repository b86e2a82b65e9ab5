"""`dama train`: build the policy, data and DAMA loss from one config and run DamaTrainer.

Start-up, in order, before a step runs: parse the config; decide what to do with output_dir
(dama.training.run_folder: a folder holding another run is refused, a complete run is reported and left alone);
check every row of train_file and eval_file (dama.data.validation; on_bad_row decides whether a bad row stops the
run or is left out); load the model. Only then is output_dir written: the old run removed under
--overwrite_output_dir, the run record and the list of rows left out (skipped_rows.json). Bad input found up to there
(dama.errors.DamaError) is one line, `dama train: error: ...`, and exit status 1; anything else keeps its traceback.
Before the start-up checks the run takes the lock on output_dir (dama.output_lock: a second launch into the same
folder is refused, naming the holder); while it trains, a signal of save_on_signal saves a checkpoint and stops it
(dama.training.preemption) and each checkpoint is checked for disk space first (dama.training.checkpoint_room); those
stops are one line too, with exit status 75 and 74.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import platform
from importlib import metadata
from pathlib import Path

from transformers import LlavaForConditionalGeneration
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from dama.command import run_command
from dama.data.collator import make_collator
from dama.data.dataset import PreferenceDataset, dataset_options
from dama.data.formats import metadata_path, read_hardness_mean, read_metadata
from dama.data.validation import CheckedInput, RowChecks, check_input
from dama.errors import DamaError
from dama.method.loss import DamaLoss
from dama.model.loading import apply_liger_patches, configure_trainable, load_llava
from dama.model.lora import apply_lora, trainable_parameter_counts
from dama.model.policy import DamaPolicy
from dama.output_lock import OutputLock
from dama.training.arguments import DamaTrainingArguments, parse_training_arguments, resolved_config
from dama.training.checkpoint_room import guarded_writes
from dama.training.preemption import stop_on_signal
from dama.training.run_folder import (
    SKIPPED_ROWS,
    RunFolderPlan,
    clear_run,
    finish_from_checkpoint,
    mark_complete,
    plan_run_folder,
    write_run_record,
)
from dama.training.show_example import format_example
from dama.training.trainer import DamaTrainer

logger = logging.getLogger(__name__)
SKIP_HINT = (f"Fix the row, or set on_bad_row: skip (--on_bad_row skip) to leave such rows out; they are listed in "
             f"output_dir/{SKIPPED_ROWS}.")
VERSIONED = ("torch", "triton", "transformers", "datasets", "accelerate", "deepspeed", "liger-kernel", "peft", "dama")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def dataset_hardness_mean(args: DamaTrainingArguments, dataset: PreferenceDataset) -> tuple[float | None, str]:
    """delta_bar for alpha_D and where it comes from: the config's hardness_mean (returned as None, DamaLoss reads it
    from the config), else the metadata beside the training data, else the mean over the training pairs.

    data_aware without a single pair that has a hardness is an error, not a run with alpha_D = 1 everywhere.
    """
    if not args.data_aware:
        return None, "data_aware off"
    if dataset.num_with_hardness == 0:
        raise DamaError(
            f"data_aware=True, but no pair of {args.train_file} has a hardness (no `hardness` column, nor "
            "`chosen_logits` / `rejected_logits`): score the data with `dama hardness` first, or pass "
            "--data_aware false"
        )
    if args.hardness_mean is not None:
        return None, "hardness_mean in the config"
    if metadata_path(args.train_file).is_file() and read_metadata(args.train_file).get("hardness_mean") is not None:
        return read_hardness_mean(args.train_file), str(metadata_path(args.train_file))
    return dataset.hardness_mean, f"mean over the {dataset.num_with_hardness} training pairs with a hardness"


def check_data_file(args: DamaTrainingArguments, name: str) -> CheckedInput:
    """Every row of the file in field `name` (train_file or eval_file) checked and the bad ones left out or raised."""
    path = getattr(args, name)
    if not Path(path).exists():
        raise DamaError(f"{name} {path} does not exist")
    checks = RowChecks(hardness=True, reference=args.reference == "precomputed")
    return check_input(path, checks, on_bad_row=args.on_bad_row, skip_hint=SKIP_HINT, image_folder=args.image_folder)


def prepare_models(args: DamaTrainingArguments, llava: LlavaForConditionalGeneration):
    """What trains in a loaded LLaVA (freezing, or LoRA) and the modules `dama train` runs.

    Returns (policy, ref_policy, adapters): the DamaPolicy that trains; the frozen copy that scores the reference
    online (None with LoRA, whose reference is the policy with its adapters off, and with a precomputed reference);
    peft's wrapper around the LLaVA (None without LoRA).
    """
    if args.liger_patches:
        apply_liger_patches(llava)
    packed = args.attention == "packed"
    if not packed:
        llava.set_attn_implementation({"text_config": args.attention})
    adapters, reference_llava = None, None
    if args.lora_rank:
        adapters = apply_lora(llava, args.lora_rank, args.lora_alpha, train_projector=not args.freeze_projector,
                              train_vision_tower=not args.freeze_vision_tower,
                              base_model_path=args.model_name_or_path and Path(args.model_name_or_path).resolve(),
                              seed=args.seed, fp32_trained=not args.deepspeed)
    else:
        # Copied after the kernels and the attention are set, so the reference runs exactly what the policy runs.
        reference_llava = copy.deepcopy(llava).requires_grad_(False) if args.reference == "online" else None
        configure_trainable(llava, freeze_vision_tower=args.freeze_vision_tower,
                            freeze_projector=args.freeze_projector, freeze_language_model=args.freeze_language_model)
    counts = trainable_parameter_counts(llava)  # after LoRA: peft leaves only the adapters and copies trainable
    logger.info("trainable parameters: %s (of %d)", ", ".join(f"{part} {n:,}" for part, n in counts.items() if n),
                sum(p.numel() for p in llava.parameters()))

    def policy_of(model):
        return DamaPolicy(model, head=args.head, impl=args.loss_impl, average_logps=args.average_logps,
                          packed_attention=packed, attention_impl=args.packed_attention_impl,
                          grad_filter_eps=args.grad_filter_eps)

    return policy_of(llava), None if reference_llava is None else policy_of(reference_llava), adapters


def build_trainer(args: DamaTrainingArguments) -> DamaTrainer:
    """The trainer, its data checked row by row (the rows left out are in `trainer.skip_reports`)."""
    if not args.model_name_or_path or not args.train_file:
        raise DamaError("model_name_or_path and train_file are required (in the YAML or on the command line)")
    if args.reference == "online" and is_deepspeed_zero3_enabled():
        raise DamaError("reference='online' is not supported under ZeRO-3 (the copy would hold partitioned weights "
                        "outside the engine): precompute the reference log-probs with `dama precompute-ref`")
    if args.lora_rank and args.model_dtype != "float32" and not (args.bf16 or args.fp16 or args.deepspeed):
        raise DamaError(f"lora_rank > 0 with model_dtype={args.model_dtype} needs --bf16 true (or --fp16 true): the "
                        "fp32 adapters then run under autocast beside the 16-bit frozen weights")
    # The rows are checked before the model loads: a bad row costs seconds, not a model load.
    checked = {name: check_data_file(args, name) for name in ("train_file", "eval_file") if getattr(args, name)}
    llava, processor = load_llava(args.model_name_or_path, args.model_dtype)
    policy, ref_policy, adapters = prepare_models(args, llava)
    pairs = {}
    for name, data in checked.items():
        path = getattr(args, name)
        record = read_metadata(path) if metadata_path(path).is_file() else None
        pairs[name] = PreferenceDataset(data.rows, processor, image_folder=data.image_folder,
                                        reference_record=record, **dataset_options(args.encoding))
        data.report.add_overlong(pairs[name])
        if data.report.skipped:
            logger.warning("%s %s: %s; listed in %s", name, path, data.report.summary(),
                           Path(args.output_dir) / SKIPPED_ROWS)
    hardness_mean, hardness_source = dataset_hardness_mean(args, pairs["train_file"])
    collator = make_collator(args.layout, processor.tokenizer.pad_token_id)
    trainer = DamaTrainer(
        model=policy,
        dama_loss=DamaLoss(args, hardness_mean=hardness_mean),
        ref_policy=ref_policy,
        adapters=adapters,
        args=args,
        train_dataset=pairs["train_file"],
        eval_dataset=pairs.get("eval_file"),
        data_collator=collator,
        processing_class=processor,
    )
    trainer.skip_reports = {name: data.report for name, data in checked.items()}
    trainer.hardness_source = hardness_source
    return trainer


def start_run(args: DamaTrainingArguments, plan: RunFolderPlan, trainer: DamaTrainer) -> None:
    """After the start-up checks: clear the old run (--overwrite_output_dir) and write the run record."""
    trainer.accelerator.wait_for_everyone()  # every process has read the folder before process 0 changes it
    if args.should_save:
        clear_run(plan)
        skipped = {name: {"path": str(getattr(args, name)), **report.as_dict()}
                   for name, report in trainer.skip_reports.items()}
        write_run_record(args.output_dir, resolved_config(args), package_versions(), skipped)
    trainer.accelerator.wait_for_everyone()


def start_summary(trainer: DamaTrainer) -> str:
    """What `dama train` prints before the first step: the first pair as the model sees it, counts and δ̄."""
    args, dataset = trainer.args, trainer.train_dataset
    delta_bar = f"{trainer.dama_loss.hardness_mean:.6g} ({trainer.hardness_source})" if args.data_aware else "off"
    report = trainer.skip_reports["train_file"]
    skipped = report.summary() if report.skipped else "none skipped"
    return f"{format_example(dataset, 0)}\n{len(dataset)} training pairs ({skipped}); data-aware delta_bar: {delta_bar}"


def prepare_training(args: DamaTrainingArguments) -> tuple[RunFolderPlan, DamaTrainer | None]:
    """Start-up: what to do with output_dir, then the trainer and the run record. No trainer when there is nothing to
    train: the run is complete, or it had reached its last step and its final model is now written. DamaError for bad
    input (config, data, model folder, output_dir), raised before anything is written."""
    plan = plan_run_folder(args.output_dir, resolved_config(args), resume=args.resume,
                           overwrite=args.overwrite_output_dir)
    if plan.action == "finish" and args.should_save:
        finish_from_checkpoint(plan)
    if plan.action in ("complete", "finish"):
        return plan, None
    trainer = build_trainer(args)
    start_run(args, plan, trainer)
    return plan, trainer


def run_training(trainer: DamaTrainer, plan: RunFolderPlan) -> None:
    """Show the first pair, train (from the plan's checkpoint when resuming), save the model and state, evaluate."""
    args = trainer.args
    if trainer.is_world_process_zero():
        # Like the usual trainers: a template or tokenization mistake shows before hours of training.
        print(start_summary(trainer), flush=True)
        if plan.checkpoint is not None:
            print(f"resuming from {plan.checkpoint}", flush=True)
        elif args.resume:
            print(f"no complete checkpoint in {args.output_dir} to resume from: training starts at step 0", flush=True)
    with guarded_writes(trainer):
        with stop_on_signal(trainer):
            trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint is not None else None)
        trainer.save_model(args.output_dir)
        trainer.save_state()  # trainer_state.json with the whole log history, beside the final model
        if trainer.eval_dataset is not None:
            trainer.evaluate()
        if args.should_save:
            mark_complete(args.output_dir, trainer.state.global_step)


def main(argv: list[str] | None = None) -> int:
    prepared = {}
    held = contextlib.ExitStack()

    def start_up() -> str | None:
        args = parse_training_arguments(argv)
        if os.environ.get("RANK", "0") == "0":  # one lock per run: the launcher's other processes are its own
            held.enter_context(OutputLock(args.output_dir, "train"))
        plan, trainer = prepare_training(args)
        if plan.action == "complete":
            return f"{args.output_dir}: this run is already complete; nothing to do"
        if plan.action == "finish":
            return (f"{args.output_dir}: training had reached its last step ({plan.checkpoint.name}) before it was "
                    "stopped; wrote the final model from that checkpoint, without another step")
        prepared.update(plan=plan, trainer=trainer)
        return None

    with held:
        code = run_command("train", start_up)
        if code == 0 and prepared:
            code = run_command("train", lambda: run_training(prepared["trainer"], prepared["plan"]))
    return code
