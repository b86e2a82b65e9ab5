"""The prefix_shared layout is exact: the same per-sequence log-probs and gradients as the packed layout on the same
pairs (fp32 round-off), the same `dama train` losses over 20 steps, and the token budget counts the prompt once.

Edge cases: responses of equal length and responses hundreds of tokens apart, an empty question, many pairs in one
row. The vision tower is trainable here (as in the demo config), so its gradients are compared too.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from dama.data.batch import IGNORE_INDEX, PreferenceExample
from dama.data.collator import PackedCollator, PrefixSharedCollator, layout_pair_lengths
from dama.data.dataset import PreferenceDataset
from dama.demo.data import demo_corpus, make_demo_data, make_rows, write_parquet
from dama.demo.tiny_llava import build_tiny_llava
from dama.model.policy import DamaPolicy
from dama.training.arguments import parse_training_arguments
from dama.training.train import build_trainer

LOGPS_RTOL = 1e-5
GRAD_TOL = 1e-5  # of the largest gradient of the same parameter
# The key bias of an attention layer gets a zero gradient in exact arithmetic (softmax ignores a constant added to
# every score of a row); in fp32 it is round-off of order 1e-9 in both layouts, so it is compared to zero instead.
ZERO_GRADIENT_SUFFIX = "k_proj.bias"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaVA (also saved, for `dama train`), its processor, the demo pairs and a dataset with one empty
    question."""
    root = tmp_path_factory.mktemp("prefix")
    model, processor = build_tiny_llava(demo_corpus(), root / "model", seed=2)
    paths = make_demo_data(root / "data", num_train=6, num_eval=0, image_size=32)
    rows = make_rows(3, seed=5, image_size=32, split="train")
    rows[1]["question"] = ""
    write_parquet(rows, root / "empty_question.parquet")
    options = {"cache_dir": root / "cache", "max_length": 1024}
    demo = PreferenceDataset.from_path(paths["train"], processor, **options)
    empty = PreferenceDataset.from_path(root / "empty_question.parquet", processor, **options)
    return {"model": model, "processor": processor, "demo": demo, "empty": empty, "root": root, "paths": paths}


def _with_responses(example: PreferenceExample, chosen: int, rejected: int, generator: torch.Generator,
                    vocab: int) -> PreferenceExample:
    """The example's prompt and image with random responses of the given lengths (ending in its own last token)."""
    prompt = example.chosen_input_ids[: example.prompt_length]
    eos = example.chosen_input_ids[-1:]

    def sequence(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Ids above the tiny vocabulary's special tokens (0-3) and its image token (4).
        response = torch.cat([torch.randint(5, vocab, (length - 1,), generator=generator), eos])
        labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), response])
        return torch.cat([prompt, response]), labels

    chosen_ids, chosen_labels = sequence(chosen)
    rejected_ids, rejected_labels = sequence(rejected)
    return dataclasses.replace(example, chosen_input_ids=chosen_ids, chosen_labels=chosen_labels,
                        rejected_input_ids=rejected_ids, rejected_labels=rejected_labels)


def _cases(tiny) -> dict[str, list[PreferenceExample]]:
    demo, empty = tiny["demo"], tiny["empty"]
    vocab = len(tiny["processor"].tokenizer)
    assert max(tiny["processor"].tokenizer.all_special_ids) == tiny["processor"].image_token_id == 4
    generator = torch.Generator().manual_seed(0)
    first = demo[0]
    return {
        "demo_pairs": [demo[i] for i in range(3)],
        "empty_question": [empty[i] for i in range(len(empty))],
        "equal_lengths": [_with_responses(first, n, n, generator, vocab) for n in (1, 7, 40)],
        "hundreds_apart": [_with_responses(first, 2, 340, generator, vocab),
                           _with_responses(demo[1], 420, 1, generator, vocab)],
        "many_pairs": [demo[i % len(demo)] for i in range(6)] + [empty[i] for i in range(len(empty))] * 3,
    }


CASES = ("demo_pairs", "empty_question", "equal_lengths", "hundreds_apart", "many_pairs")


@pytest.mark.parametrize("case", CASES)
def test_prefix_shared_equals_packed_log_probs_and_gradients(tiny, case):
    examples = _cases(tiny)[case]
    if case == "empty_question":
        # Row 1's question slot is really empty: its prompt is the template's around an empty question.
        empty_prompt = tiny["empty"].encoder.encode_prompts([""])[0]
        assert tiny["empty"].prompt_lengths[1] == len(empty_prompt) == min(tiny["empty"].prompt_lengths)
    policies, logps = {}, {}
    for name, collator in (("packed", PackedCollator()), ("prefix_shared", PrefixSharedCollator())):
        policies[name] = DamaPolicy(copy.deepcopy(tiny["model"]).train())
        batch = collator(examples)
        logps[name] = policies[name](batch)
    shared_batch = PrefixSharedCollator()(examples)
    assert shared_batch.num_tokens < PackedCollator()(examples).num_tokens
    torch.testing.assert_close(logps["prefix_shared"], logps["packed"], rtol=LOGPS_RTOL, atol=0)

    weights = torch.randn(logps["packed"].shape, generator=torch.Generator().manual_seed(1))
    for name in policies:
        (logps[name] * weights).sum().backward()
    packed_params = dict(policies["packed"].named_parameters())
    largest = max(p.grad.abs().max() for p in packed_params.values() if p.grad is not None)
    checked = set()
    for name, param in policies["prefix_shared"].named_parameters():
        expected = packed_params[name].grad
        if expected is None:
            # CLIP's last layer and post-layernorm: LLaVA reads the features at layer -2.
            assert param.grad is None, name
            continue
        if name.endswith(ZERO_GRADIENT_SUFFIX):
            assert param.grad.abs().max() <= 1e-6 * largest and expected.abs().max() <= 1e-6 * largest, name
            continue
        scale = expected.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(param.grad, expected, rtol=0, atol=GRAD_TOL * float(scale), msg=name)
        checked.add(name.split(".")[2])
    assert {"vision_tower", "multi_modal_projector", "language_model"} <= checked


def test_token_budget_counts_the_prompt_once(tiny):
    dataset = tiny["demo"]
    lengths = layout_pair_lengths(dataset.pair_lengths, dataset.prompt_lengths, "prefix_shared")
    assert lengths == [n - p for n, p in zip(dataset.pair_lengths, dataset.prompt_lengths, strict=True)]
    assert layout_pair_lengths(dataset.pair_lengths, dataset.prompt_lengths, "packed") == dataset.pair_lengths
    examples = [dataset[i] for i in range(4)]
    assert PrefixSharedCollator()(examples).num_tokens == sum(lengths[:4])
    assert PackedCollator()(examples).num_tokens == sum(dataset.pair_lengths[:4])


def _train(tiny, output_dir, layout: str, *extra: str):
    args = parse_training_arguments([
        "--output_dir", str(output_dir), "--model_name_or_path", str(tiny["root"] / "model"),
        "--train_file", str(tiny["paths"]["train"]), "--reference", "online", "--data_aware", "false",
        "--freeze_vision_tower", "false", "--layout", layout, "--learning_rate", "1e-3", "--logging_steps", "1",
        "--report_to", "none", "--use_cpu", "true", "--seed", "0", "--save_strategy", "no", *extra,
    ])
    trainer = build_trainer(args)
    trainer.train()
    return trainer


def test_dama_train_gives_the_same_losses_under_both_layouts(tiny, tmp_path):
    history = {}
    for layout in ("packed", "prefix_shared"):
        trainer = _train(tiny, tmp_path / layout, layout, "--max_steps", "20", "--per_device_train_batch_size", "2")
        history[layout] = [(e["step"], e["loss"], e["rewards/margins"]) for e in trainer.state.log_history
                           if "loss" in e]
    assert len(history["packed"]) == 20
    for (step, loss, margin), (step_b, loss_b, margin_b) in zip(history["packed"], history["prefix_shared"],
                                                                strict=True):
        assert step == step_b
        assert loss_b == pytest.approx(loss, abs=1e-5), f"step {step}"
        assert margin_b == pytest.approx(margin, abs=1e-5), f"step {step}"
    # The policy really moved, so the comparison covers training, not 20 copies of step 0.
    assert abs(history["packed"][-1][2]) > 1e-3


def test_trainer_token_budget_uses_the_layout_lengths(tiny, tmp_path):
    dataset = tiny["demo"]
    budget = 2 * max(dataset.pair_lengths)
    args = parse_training_arguments([
        "--output_dir", str(tmp_path), "--model_name_or_path", str(tiny["root"] / "model"),
        "--train_file", str(tiny["paths"]["train"]), "--reference", "online", "--max_tokens_per_batch", str(budget),
        "--data_aware", "false", "--shuffle", "false", "--report_to", "none", "--use_cpu", "true",
    ])
    batches = list(build_trainer(args).get_train_dataloader())
    assert all(batch.num_tokens <= budget for batch in batches)
    # Counted once, the prompts leave room for a third pair that the packed count would not admit.
    assert max(batch.num_pairs for batch in batches) >= 3
    assert sum(batch.num_pairs for batch in batches) == len(dataset)


def test_prefix_shared_is_the_default_and_needs_packed_attention(tiny, tmp_path):
    base = ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "true"]
    args = parse_training_arguments(base)
    assert (args.layout, args.attention) == ("prefix_shared", "packed")
    with pytest.raises(ValueError, match="does not fit layout='prefix_shared'"):
        parse_training_arguments([*base, "--attention", "sdpa"])
    with pytest.raises(ValueError, match="does not fit layout='padded'"):
        parse_training_arguments([*base, "--layout", "padded"])
    llava = copy.deepcopy(tiny["model"])
    llava.set_attn_implementation({"text_config": "sdpa"})
    with pytest.raises(ValueError, match="needs dama_packed attention"):
        DamaPolicy(llava, packed_attention=False)(PrefixSharedCollator()([tiny["demo"][0]]))
