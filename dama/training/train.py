"""`dama train`: build the policy, data and DAMA loss from one config and run DamaTrainer."""

from __future__ import annotations

import copy
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from dama.data.collator import make_collator
from dama.data.dataset import PreferenceDataset
from dama.data.formats import metadata_path, read_hardness_mean
from dama.method.loss import DamaLoss
from dama.model.loading import apply_liger_patches, apply_lora, configure_trainable, load_llava
from dama.model.policy import DamaPolicy
from dama.training.arguments import DamaTrainingArguments, parse_training_arguments, resolved_config
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


def dataset_hardness_mean(args: DamaTrainingArguments) -> float | None:
    """delta_bar for alpha_D: the config override, else the metadata written beside the training data."""
    if not args.data_aware or args.hardness_mean is not None:
        return None
    if not metadata_path(args.train_file).is_file():
        raise ValueError(
            f"data_aware=True needs the dataset's mean hardness: no {metadata_path(args.train_file)}. Score the data "
            "with `dama hardness` (which writes it), set --hardness_mean, or pass --data_aware false."
        )
    return read_hardness_mean(args.train_file)


def build_trainer(args: DamaTrainingArguments) -> DamaTrainer:
    if not args.model_name_or_path or not args.train_file:
        raise ValueError("model_name_or_path and train_file are required (in the YAML or on the command line)")
    if args.reference == "online" and is_deepspeed_zero3_enabled():
        raise ValueError("reference='online' is not supported under ZeRO-3 (the copy would hold partitioned weights "
                         "outside the engine): precompute the reference log-probs with `dama precompute-ref`")
    llava, processor = load_llava(args.model_name_or_path, args.model_dtype)
    reference_llava = copy.deepcopy(llava) if args.reference == "online" else None
    configure_trainable(llava, freeze_vision_tower=args.freeze_vision_tower, freeze_projector=args.freeze_projector,
                        freeze_language_model=args.freeze_language_model)
    if args.lora_rank:
        llava = apply_lora(llava, args.lora_rank, args.lora_alpha)
    if args.liger_patches:
        apply_liger_patches(llava)
    packed = args.attention == "packed"
    if not packed:
        llava.set_attn_implementation({"text_config": args.attention})

    def policy_of(model):
        return DamaPolicy(model, head=args.head, impl=args.loss_impl, average_logps=args.average_logps,
                          packed_attention=packed)

    data_options = dict(image_folder=args.image_folder, max_length=args.max_length, overlong=args.overlong)
    train_dataset = PreferenceDataset.from_path(args.train_file, processor, **data_options)
    eval_dataset = PreferenceDataset.from_path(args.eval_file, processor, **data_options) if args.eval_file else None
    collator = make_collator(args.layout, processor.tokenizer.pad_token_id)
    return DamaTrainer(
        model=policy_of(llava),
        dama_loss=DamaLoss(args, hardness_mean=dataset_hardness_mean(args)),
        ref_policy=policy_of(reference_llava) if reference_llava is not None else None,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
    )


def write_run_record(args: DamaTrainingArguments) -> None:
    """The resolved config and the package versions, beside the checkpoints."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "resolved_config.json").write_text(json.dumps(resolved_config(args), indent=2, sort_keys=True))
    (output_dir / "versions.json").write_text(json.dumps(package_versions(), indent=2))


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_training_arguments(argv)
        write_run_record(args)
        trainer = build_trainer(args)
    except ValueError as error:
        print(f"dama train: error: {error}", file=sys.stderr)
        return 1
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json with the whole log history, beside the final model
    if trainer.eval_dataset is not None:
        trainer.evaluate()
    return 0
