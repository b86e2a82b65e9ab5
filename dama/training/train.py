"""`dama train`: build the policy, data and DAMA loss from one config and run DamaTrainer."""

from __future__ import annotations

import copy
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from dama.data.collator import PackedCollator, PaddedCollator
from dama.data.dataset import ConversationTemplate, PreferenceDataset
from dama.data.formats import metadata_path, read_hardness_mean, read_metadata
from dama.method.loss import DamaLoss
from dama.model.loading import apply_liger_patches, apply_lora, configure_trainable, load_llava
from dama.model.policy import DamaPolicy
from dama.training.arguments import DamaTrainingArguments, parse_training_arguments, resolved_config
from dama.training.checkpointing import newest_checkpoint
from dama.training.show_example import format_example
from dama.training.trainer import DamaTrainer

VERSIONED = ("torch", "triton", "transformers", "datasets", "accelerate", "deepspeed", "liger-kernel", "dama")


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
        raise ValueError(
            f"data_aware=True, but no pair of {args.train_file} has a hardness (no `hardness` column, nor "
            "`chosen_logits` / `rejected_logits`): score the data with `dama hardness` first, or pass "
            "--data_aware false"
        )
    if args.hardness_mean is not None:
        return None, "hardness_mean in the config"
    if metadata_path(args.train_file).is_file() and read_metadata(args.train_file).get("hardness_mean") is not None:
        return read_hardness_mean(args.train_file), str(metadata_path(args.train_file))
    return dataset.hardness_mean, f"mean over the {dataset.num_with_hardness} training pairs with a hardness"


def build_trainer(args: DamaTrainingArguments) -> DamaTrainer:
    if not args.model_name_or_path or not args.train_file:
        raise ValueError("model_name_or_path and train_file are required (in the YAML or on the command line)")
    if args.reference == "online" and is_deepspeed_zero3_enabled():
        raise ValueError("reference='online' is not supported under ZeRO-3 (the copy would hold partitioned weights "
                         "outside the engine): precompute the reference log-probs with `dama precompute-ref`")
    llava, processor = load_llava(args.model_name_or_path, args.model_dtype)
    configure_trainable(llava, freeze_vision_tower=args.freeze_vision_tower, freeze_projector=args.freeze_projector,
                        freeze_language_model=args.freeze_language_model)
    if args.liger_patches:
        apply_liger_patches(llava)
    packed = args.attention == "packed"
    if not packed:
        llava.set_attn_implementation({"text_config": args.attention})
    # Copied after the kernels and the attention are set, so the reference runs exactly what the policy runs; LoRA
    # comes after the copy, so the reference stays the starting model.
    reference_llava = copy.deepcopy(llava).requires_grad_(False) if args.reference == "online" else None
    if args.lora_rank:
        llava = apply_lora(llava, args.lora_rank, args.lora_alpha)

    def policy_of(model):
        return DamaPolicy(model, head=args.head, impl=args.loss_impl, average_logps=args.average_logps,
                          packed_attention=packed)

    data_options = dict(image_folder=args.image_folder, max_length=args.max_length, overlong=args.overlong,
                        image_aspect_ratio=args.image_aspect_ratio,
                        template=ConversationTemplate(system=args.system_prompt))
    train_dataset = PreferenceDataset.from_path(args.train_file, processor, **data_options)
    eval_dataset = PreferenceDataset.from_path(args.eval_file, processor, **data_options) if args.eval_file else None
    hardness_mean, hardness_source = dataset_hardness_mean(args, train_dataset)
    collator = PackedCollator() if args.layout == "packed" else PaddedCollator(processor.tokenizer.pad_token_id)
    trainer = DamaTrainer(
        model=policy_of(llava),
        dama_loss=DamaLoss(args, hardness_mean=hardness_mean),
        ref_policy=policy_of(reference_llava) if reference_llava is not None else None,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
    )
    trainer.hardness_source = hardness_source
    return trainer


def write_run_record(args: DamaTrainingArguments) -> None:
    """The resolved config and the package versions, beside the checkpoints."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "resolved_config.json").write_text(json.dumps(resolved_config(args), indent=2, sort_keys=True))
    (output_dir / "versions.json").write_text(json.dumps(package_versions(), indent=2))


def start_summary(trainer: DamaTrainer) -> str:
    """What `dama train` prints before the first step: the first pair as the model sees it, counts and δ̄."""
    args, dataset = trainer.args, trainer.train_dataset
    delta_bar = f"{trainer.dama_loss.hardness_mean:.6g} ({trainer.hardness_source})" if args.data_aware else "off"
    return (f"{format_example(dataset, 0)}\n{len(dataset)} training pairs ({dataset.num_skipped} over-long skipped); "
            f"data-aware delta_bar: {delta_bar}")


def prepare_training(args: DamaTrainingArguments) -> DamaTrainer:
    """The run record and the trainer; ValueError for bad input (config, data, model folder)."""
    write_run_record(args)
    return build_trainer(args)


def run_training(trainer: DamaTrainer) -> None:
    """Show the first pair, train (or resume), save the model and the state, evaluate."""
    args = trainer.args
    if trainer.is_world_process_zero():
        # Like the usual trainers: a template or tokenization mistake shows before hours of training.
        print(start_summary(trainer), flush=True)
        if args.resume:
            checkpoint = newest_checkpoint(args.output_dir)
            print(f"resuming from {checkpoint}" if checkpoint else f"no complete checkpoint in {args.output_dir} to "
                  "resume from: training starts at step 0", flush=True)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json with the whole log history, beside the final model
    if trainer.eval_dataset is not None:
        trainer.evaluate()


def main(argv: list[str] | None = None) -> int:
    try:
        trainer = prepare_training(parse_training_arguments(argv))
    except ValueError as error:
        print(f"dama train: error: {error}", file=sys.stderr)
        return 1
    run_training(trainer)
    return 0
