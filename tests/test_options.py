"""Every command that takes a config reads it one way (dama.option_loader): a YAML, then the command line over it.

For each command: `--config=file` and `--config file` give the same options; a command-line value wins over the
YAML's whether written `--key value` or `--key=value`, with dashes or underscores, even when it equals the default;
a YAML key may use dashes too; an unknown key (YAML) or option (command line) is an error.
"""

import re
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from dama.errors import DamaError
from dama.evaluation import generate, make_pairs
from dama.offline import hardness, reference
from dama.options import BAD_ROW_POLICIES, LAYOUTS, OVERLONG_POLICIES, EncodingOptions, RowOptions
from dama.planning import plan_command
from dama.training import show_example
from dama.training.arguments import DamaTrainingArguments, parse_training_arguments, resolved_config


def _training(argv):
    return resolved_config(parse_training_arguments(argv, check_devices=False))


def _plan(argv):
    plan_options, training = plan_command.parse_options(argv)
    return {**asdict(plan_options), **resolved_config(training)}


def _show_example(argv):
    options, training = show_example.parse_options(argv)
    return {**asdict(options), **resolved_config(training)}


def _generate(argv):
    options, decoding = generate.parse_options(argv)
    return {**asdict(options), **asdict(decoding)}


def _make_pairs(argv):
    options, sampling = make_pairs.parse_options(argv)
    return {**asdict(options), **asdict(sampling)}


TRAINING_YAML = {"model_name_or_path": "model", "train_file": "train.parquet", "output_dir": "out", "beta": 0.2,
                 "learning-rate": 1.0e-6}
# command: (parse, YAML, the key overridden, its YAML value, the value given on the command line, its default)
COMMANDS = {
    "train": (_training, TRAINING_YAML, "max_length", 512, 1024, 2048),
    "plan": (_plan, {**TRAINING_YAML, "gpu_memory": "24GiB"}, "num_gpus", 4, 2, 1),
    "show-example": (_show_example, TRAINING_YAML, "index", 3, 1, 0),
    "hardness": (hardness.parse_options, {"input": "in.parquet", "output": "out.parquet", "clip": "clip",
                                          "on-bad-row": "skip"}, "batch_size", 4, 2, 16),
    "precompute-ref": (reference.parse_options, {"input": "in.parquet", "output": "out.parquet", "model": "llava",
                                                 "layout": "packed"}, "max_length", 512, 256, 2048),
    "generate": (_generate, {"input": "in.jsonl", "output": "out.jsonl", "model": "llava", "sample": True},
                 "max_new_tokens", 5, 7, 512),
    "make-pairs": (_make_pairs, {"input": "in.jsonl", "output": "out.parquet", "model": "llava",
                                 "annotations": ["instances.json"], "temperature": 0.7}, "samples", 3, 5, 4),
}


def _resolved(parse, argv):
    resolved = parse(argv)
    return dict(resolved) if isinstance(resolved, dict) else asdict(resolved)


def _config(tmp_path, values):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_both_config_forms_give_the_same_options_and_the_command_line_wins(command, tmp_path):
    parse, values, key, in_yaml, given, default = COMMANDS[command]
    config = _config(tmp_path, {**values, key: in_yaml})
    separate = _resolved(parse, ["--config", config])
    joined = _resolved(parse, [f"--config={config}"])
    assert separate == joined
    assert separate[key] == in_yaml
    for name, yaml_value in values.items():
        if name.replace("-", "_") in separate:
            assert separate[name.replace("-", "_")] == yaml_value  # dashed YAML keys are read as underscores
    dashed = key.replace("_", "-")
    for override in ([f"--{key}", str(given)], [f"--{key}={given}"], [f"--{dashed}", str(given)],
                     [f"--{dashed}={given}"]):
        for config_form in (["--config", config], [f"--config={config}"]):
            # The config may come before or after the override: the command line wins either way.
            for argv in (config_form + override, override + config_form):
                resolved = _resolved(parse, argv)
                assert resolved == {**separate, key: given}, argv
    # A command-line value equal to the default still replaces the YAML's.
    assert _resolved(parse, ["--config", config, f"--{key}", str(default)])[key] == default


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unknown_keys_are_errors(command, tmp_path, capsys):
    parse, values, *_ = COMMANDS[command]
    config = _config(tmp_path, {**values, "nonsense-key": 1})
    with pytest.raises(DamaError, match=r"unknown keys \['nonsense_key'\]"):
        parse([f"--config={config}"])
    with pytest.raises(SystemExit) as exit_info:
        parse(["--config", _config(tmp_path, values), "--nonsense", "1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "unrecognized arguments: --nonsense 1" in error
    with pytest.raises(DamaError, match="no such file"):
        parse([f"--config={tmp_path / 'missing.yaml'}"])


def test_options_are_not_abbreviated(tmp_path):
    # `--model` is show-example's own option, not an abbreviation of training's --model_name_or_path.
    with pytest.raises(SystemExit):
        parse_training_arguments(["--model", "x", "--output_dir", str(tmp_path)])


def test_plan_keeps_the_yaml_deepspeed_config_without_initialising_deepspeed(tmp_path, monkeypatch):
    """`dama plan` reads a DeepSpeed recipe on a machine that need not have DeepSpeed (planning comes first)."""
    import transformers.integrations.deepspeed as hf_deepspeed

    def no_deepspeed(*args, **kwargs):
        raise TypeError("object.__init__() takes exactly one argument")  # what a missing DeepSpeed gives

    monkeypatch.setattr(hf_deepspeed, "HfTrainerDeepSpeedConfig", no_deepspeed)
    config = _config(tmp_path, {**TRAINING_YAML, "deepspeed": "configs/deepspeed/zero3.json", "bf16": True})
    for argv in (["--config", config], [f"--config={config}"]):
        plan_options, training = plan_command.parse_options([*argv, "--gpu-memory", "80GiB", "--num-gpus", "4"])
        assert training.deepspeed == "configs/deepspeed/zero3.json" and training.deepspeed_plugin is None
        assert training.model_name_or_path == "model" and plan_options.num_gpus == 4


def test_select_is_repeatable_on_the_command_line_and_a_list_in_yaml(tmp_path):
    values = {"input": "in.parquet", "output": "out.parquet", "clip": "clip"}
    argv = ["--select", "idx~1", "--select", "question~cat"]
    assert hardness.parse_options([f"--config={_config(tmp_path, values)}", *argv]).select == ["idx~1", "question~cat"]
    listed = _config(tmp_path, {**values, "select": ["idx~1", "question~cat"]})
    assert hardness.parse_options(["--config", listed]).select == ["idx~1", "question~cat"]


def test_each_allowed_values_set_is_the_one_every_command_offers():
    assert hardness.HardnessOptions(input="a", output="b", clip="c").on_bad_row in BAD_ROW_POLICIES
    for policy in BAD_ROW_POLICIES:
        RowOptions(on_bad_row=policy)
    with pytest.raises(DamaError, match=r"on_bad_row must be one of \('error', 'skip'\), got 'ignore'"):
        RowOptions(on_bad_row="ignore")
    for group in (EncodingOptions, DamaTrainingArguments):
        with pytest.raises(DamaError, match=r"overlong must be one of \('error', 'skip'\)"):
            group(overlong="truncate")
        with pytest.raises(DamaError, match="max_length must be at least 2, got 1"):
            group(max_length=1)
    assert set(reference.REFERENCE_LAYOUTS) < set(LAYOUTS) and OVERLONG_POLICIES == ("error", "skip")
    with pytest.raises(DamaError, match=r"layout must be one of \('prefix_shared', 'packed'\), got 'padded'"):
        reference.ReferenceOptions(input="a", output="b", model="m", layout="padded")


def test_the_encoding_group_is_passed_whole(tmp_path):
    options = reference.parse_options(["--input", "a.parquet", "--output", "b.parquet", "--model", "m",
                                       "--max-length", "300", "--image_aspect_ratio=pad"])
    assert options.encoding == EncodingOptions(max_length=300, image_aspect_ratio="pad")
    training = parse_training_arguments(["--output_dir", str(tmp_path), "--max-length=300", "--image-aspect-ratio",
                                         "pad"])
    assert training.encoding == options.encoding


README = Path(__file__).resolve().parents[1] / "README.md"
README_PARSERS = {
    "train": lambda argv: parse_training_arguments(argv, check_devices=False),
    "plan": plan_command.parse_options,
    "show-example": show_example.parse_options,
    "hardness": hardness.parse_options,
    "precompute-ref": reference.parse_options,
    "generate": generate.parse_options,
    "make-pairs": make_pairs.parse_options,
}


def _readme_commands() -> list[tuple[str, list[str]]]:
    """(command, arguments) of every `dama <command>` line in README's shell blocks, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", README.read_text())
    commands = []
    for line in text.splitlines():
        match = re.match(r"(?:deepspeed .*-m dama\.cli|dama) ([a-z-]+) (.*)", line.strip())
        if match and match.group(1) in README_PARSERS:
            commands.append((match.group(1), shlex.split(match.group(2), comments=True)))
    return commands


def test_the_readme_commands_parse(monkeypatch):
    monkeypatch.chdir(README.parent)  # the configs they name are the repository's
    commands = _readme_commands()
    assert {command for command, _ in commands} == set(README_PARSERS)
    for command, argv in commands:
        README_PARSERS[command](argv)
