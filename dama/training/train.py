"""`dama train`: build the policy, data and DAMA loss from one config and run DamaTrainer."""

from __future__ import annotations

import copy
import json
import logging
import platform
import sys
from importlib import metadata
from pathlib import Path

from transformers import LlavaForConditionalGeneration
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from dama.data.collator import PackedCollator, PaddedCollator
from dama.data.dataset import PreferenceDataset
from dama.data.formats import metadata_path, read_hardness_mean
from dama.method.loss import DamaLoss
from dama.model.loading import apply_liger_patches, configure_trainable, load_llava
from dama.model.lora import apply_lora, trainable_parameter_counts
from dama.model.policy import DamaPolicy
from dama.training.arguments import DamaTrainingArguments, parse_training_arguments, resolved_config
from dama.training.trainer import DamaTrainer

logger = logging.getLogger(__name__)

VERSIONED = ("torch", "triton", "transformers", "datasets", "accelerate", "deepspeed", "liger-kernel", "peft", "dama")


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


def prepare_models(args: DamaTrainingArguments, llava: LlavaForConditionalGeneration):
    """What trains in a loaded LLaVA (freezing, or LoRA) and the modules `dama train` runs.

    Returns (policy, ref_policy, adapters): the DamaPolicy that trains; the frozen copy that scores the reference
    online (None with LoRA, whose reference is the policy with its adapters off, and with a precomputed reference);
    peft's wrapper around the LLaVA (None without LoRA).
    """
    adapters, reference_llava = None, None
    if args.lora_rank:
        adapters = apply_lora(llava, args.lora_rank, args.lora_alpha, train_projector=not args.freeze_projector,
                              train_vision_tower=not args.freeze_vision_tower,
                              base_model_path=args.model_name_or_path and Path(args.model_name_or_path).resolve(),
                              seed=args.seed)
    else:
        reference_llava = copy.deepcopy(llava) if args.reference == "online" else None
        configure_trainable(llava, freeze_vision_tower=args.freeze_vision_tower,
                            freeze_projector=args.freeze_projector, freeze_language_model=args.freeze_language_model)
    counts = trainable_parameter_counts(llava)  # after LoRA: peft leaves only the adapters and copies trainable
    logger.info("trainable parameters: %s (of %d)", ", ".join(f"{part} {n:,}" for part, n in counts.items() if n),
                sum(p.numel() for p in llava.parameters()))
    if args.liger_patches:
        apply_liger_patches(llava)
    packed = args.attention == "packed"
    if not packed:
        llava.set_attn_implementation({"text_config": args.attention})

    def policy_of(model):
        return DamaPolicy(model, head=args.head, impl=args.loss_impl, average_logps=args.average_logps,
                          packed_attention=packed)

    return policy_of(llava), None if reference_llava is None else policy_of(reference_llava), adapters


def build_trainer(args: DamaTrainingArguments) -> DamaTrainer:
    if not args.model_name_or_path or not args.train_file:
        raise ValueError("model_name_or_path and train_file are required (in the YAML or on the command line)")
    if args.reference == "online" and is_deepspeed_zero3_enabled():
        raise ValueError("reference='online' is not supported under ZeRO-3 (the copy would hold partitioned weights "
                         "outside the engine): precompute the reference log-probs with `dama precompute-ref`")
    if args.lora_rank and args.model_dtype != "float32" and not (args.bf16 or args.fp16 or args.deepspeed):
        raise ValueError(f"lora_rank > 0 with model_dtype={args.model_dtype} needs --bf16 true (or --fp16 true): the "
                         "fp32 adapters then run under autocast beside the 16-bit frozen weights")
    llava, processor = load_llava(args.model_name_or_path, args.model_dtype)
    policy, ref_policy, adapters = prepare_models(args, llava)
    data_options = dict(image_folder=args.image_folder, max_length=args.max_length, overlong=args.overlong,
                        image_aspect_ratio=args.image_aspect_ratio)
    train_dataset = PreferenceDataset.from_path(args.train_file, processor, **data_options)
    eval_dataset = PreferenceDataset.from_path(args.eval_file, processor, **data_options) if args.eval_file else None
    collator = PackedCollator() if args.layout == "packed" else PaddedCollator(processor.tokenizer.pad_token_id)
    return DamaTrainer(
        model=policy,
        dama_loss=DamaLoss(args, hardness_mean=dataset_hardness_mean(args)),
        ref_policy=ref_policy,
        adapters=adapters,
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
