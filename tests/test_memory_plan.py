"""`dama plan`: parameter counts and saved activations against the real modules, and the command on the shipped
configs (the recipes fit their GPU with the token budget the plan chose)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from dama.data.batch import IGNORE_INDEX, PreferenceExample
from dama.data.collator import make_collator
from dama.planning import activations as act
from dama.planning.advice import largest_fitting
from dama.planning.model_shape import ModelShape, read_model_shape
from dama.planning.plan_command import parse_bytes, run_plan
from dama.training.arguments import parse_training_arguments
from dama.training.train import prepare_models

REPO = Path(__file__).resolve().parents[1]
SHIPPED_7B = REPO / "configs" / "models" / "llava-1.5-7b-hf"
IMAGE_TOKEN = 511


def tiny_config(kv_heads: int = 2) -> LlavaConfig:
    """A LLaVA small enough for autograd's saved tensors to be counted exactly: grouped-query attention (4 query
    heads on 2 key/value heads), 32-px images in 8-px patches (16 image tokens)."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=16,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)


def example(generator: torch.Generator, index: int) -> PreferenceExample:
    prompt = torch.cat([torch.tensor([1]), torch.full((16,), IMAGE_TOKEN), torch.randint(3, 500, (7,),
                                                                                         generator=generator)])

    def sequence(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        response = torch.randint(3, 500, (length,), generator=generator)
        return torch.cat([prompt, response]), torch.cat([torch.full_like(prompt, IGNORE_INDEX), response])

    chosen, chosen_labels = sequence(9 + index)
    rejected, rejected_labels = sequence(14 - index)
    return PreferenceExample(row_id=str(index), prompt_length=prompt.numel(), chosen_input_ids=chosen,
                             chosen_labels=chosen_labels, rejected_input_ids=rejected, rejected_labels=rejected_labels,
                             pixel_values=torch.randn(3, 32, 32, generator=generator), ref_chosen_logps=0.0,
                             ref_rejected_logps=0.0, ref_chosen_mean_logps=0.0, ref_rejected_mean_logps=0.0,
                             hardness=0.0)


def saved_bytes_of_layer(policy, batch, layer: int, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves inside decoder layer `layer` (weights apart)."""
    owner = ["outside"]
    module = policy.llava.model.language_model.layers[layer]
    module.register_forward_pre_hook(lambda *_: owner.append("layer") and None)
    module.register_forward_hook(lambda *_: owner.pop() and None)
    weights = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    seen: dict[int, tuple[int, str]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (storage.nbytes(), owner[-1])
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        policy(batch)
    return sum(nbytes for nbytes, where in seen.values() if where == "layer")


CASES = {
    "full fine-tuning, packed": (["--layout", "packed"], "segments"),
    "LoRA, packed": (["--layout", "packed", "--lora_rank", "4", "--freeze_language_model", "true"], "segments"),
    "projector only, packed": (["--layout", "packed", "--freeze_language_model", "true"], "segments"),
    "full fine-tuning, padded": (["--layout", "padded", "--attention", "sdpa"], "padded"),
    "LoRA, prefix-shared": (["--lora_rank", "4", "--freeze_language_model", "true", "--layout", "prefix_shared"],
                            "segments"),
    "LoRA, bf16 weights under autocast": (["--layout", "packed", "--lora_rank", "4", "--freeze_language_model",
                                           "true", "--model_dtype", "bfloat16", "--bf16", "true"], "segments"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_decoder_layers_saved_activations_are_what_the_plan_counts(case, tmp_path):
    extra, attention = CASES[case]
    args = parse_training_arguments(["--output_dir", str(tmp_path), "--use_cpu", "true", *extra])
    config = tiny_config()
    torch.manual_seed(0)
    dtype = getattr(torch, args.model_dtype)
    policy, _, _ = prepare_models(args, LlavaForConditionalGeneration(config).to(dtype).train())
    generator = torch.Generator().manual_seed(0)
    examples = [example(generator, k) for k in range(3)]
    batch = make_collator(args.layout, 0)(examples)
    # Layer 1: layer 0 also holds what all layers share (the rotary tables), first saved there.
    measured = saved_bytes_of_layer(policy, batch, 1, autocast=args.bf16)

    shape = ModelShape.from_config(config)
    weight = 2 if args.bf16 else 4
    precision = act.Precision(weight, weight)
    grads = act.Grads(weights=not args.freeze_language_model, lora_rank=args.lora_rank, input=True)
    tokens = batch.input_ids.numel()
    predicted = tokens * act.layer_saved_per_token(shape, precision, grads, attention)
    predicted += act.layer_weight_copies(shape, precision, args.lora_rank, 4 if args.lora_rank else weight)
    if attention == "padded":
        predicted += act.padded_mask_per_layer(precision, batch.input_ids.shape[0], batch.input_ids.shape[1])
    if args.layout == "prefix_shared":
        predicted += act.gathered_keys_per_layer(shape, precision, attention, batch.key_index.numel() - tokens)
        queries, keys = (batch.cu_seqlens.diff(), batch.cu_seqlens_k.diff())
        predicted += int((queries * keys)[queries != keys].sum()) * precision.compute_bytes
    assert predicted == measured


@pytest.mark.parametrize("config", ["llava-1.5-7b", "tiny"])
def test_parameter_counts_are_the_models(config):
    llava_config = LlavaConfig.from_json_file(str(SHIPPED_7B / "config.json")) if config == "llava-1.5-7b" \
        else tiny_config()
    shape = ModelShape.from_config(llava_config)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config)
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    assert shape.vision_tower_params() == sum(p.numel() for p in model.model.vision_tower.parameters())
    assert shape.projector_params() == sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    if config == "llava-1.5-7b":
        assert read_model_shape(SHIPPED_7B) == shape
        assert shape.image_tokens == 576 and shape.total_params() == 7_063_427_072


def test_memory_sizes_parse():
    assert parse_bytes("24GiB") == 24 << 30 and parse_bytes("80 GB") == 80 * 10**9 and parse_bytes("16g") == 16 << 30
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes("lots")


def test_largest_fitting_is_the_boundary():
    assert largest_fitting(lambda n: n <= 1234, 10, 1 << 20) == 1234
    assert largest_fitting(lambda n: n <= 5, 10, 100) is None


def dama_plan(*argv: str) -> str:
    """`dama plan`'s output (run in this process: the command's own behaviour is tested once, below)."""
    return run_plan(list(argv))


def total_line(output: str) -> tuple[float, float, bool]:
    match = re.search(r"\*\*total per GPU\*\* \| \*\*([0-9.]+)\*\* of ([0-9.]+): (fits|does NOT fit)", output)
    assert match, output
    return float(match.group(1)), float(match.group(2)), match.group(3) == "fits"


@pytest.mark.parametrize("recipe, gpu", [("llava15_7b_dama_lora_24gb.yaml", "24GiB"),
                                         ("llava15_7b_dama_lora_16gb.yaml", "16GiB")])
def test_each_small_gpu_recipe_fits_with_the_budget_the_plan_chose(recipe, gpu, tmp_path):
    output = dama_plan("--config", f"configs/{recipe}", "--gpu-memory", gpu)
    assert total_line(output)[2]
    largest = int(re.search(r"largest max_tokens_per_batch that fits: (\d+)", output).group(1))
    budget = parse_training_arguments(["--config", f"{REPO}/configs/{recipe}", "--output_dir", str(tmp_path)],
                                      check_devices=False).max_tokens_per_batch
    # The recipe's budget is the plan's largest, rounded down to a multiple of 1024.
    assert budget == largest // 1024 * 1024


def test_full_recipe_on_four_80gb_gpus_and_advice_when_it_does_not_fit():
    output = dama_plan("--config", "configs/llava15_7b_dama.yaml", "--gpu-memory", "80GiB", "--num-gpus", "4")
    assert "DeepSpeed ZeRO-3" in output and total_line(output)[2]
    # The same full fine-tune on one 24 GiB GPU without DeepSpeed does not fit; the plan says what would.
    output = dama_plan("--config", "configs/llava15_7b_dama.yaml", "--gpu-memory", "24GiB", "--deepspeed", "",
                       "--reference", "online")
    assert not total_line(output)[2]
    names = re.findall(r"^- ([^:]+): [0-9.]+ GiB", output, flags=re.MULTILINE)
    assert names[0] == "precomputed reference" and "LoRA" in names and "activation checkpointing" not in names


def test_the_plan_reads_a_saved_models_config(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    output = dama_plan("--config", "configs/tiny_demo.yaml", "--gpu-memory", "4GiB", "--model_name_or_path",
                       str(tmp_path), "--max_tokens_per_batch", "512")
    assert f"model from {tmp_path / 'config.json'}" in output and total_line(output)[2]


def test_the_command_reports_bad_input_in_one_line(tmp_path):
    (tmp_path / "model").mkdir()
    argv = ["plan", "--config", "configs/llava15_7b_dama_lora_24gb.yaml", "--gpu-memory", "24GiB",
            "--model_name_or_path", str(tmp_path / "model")]
    done = subprocess.run([sys.executable, "-m", "dama.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout
    assert done.stderr.startswith("dama plan: error:") and "config.json" in done.stderr
    assert "Traceback" not in done.stderr
