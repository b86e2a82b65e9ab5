"""`dama generate` on a tiny random LLaVA: training's prompt ids, greedy decoding that does not depend on the batch,
seeded sampling, the output schema, resuming after a crash, and errors."""

import base64
import io
import json

import pytest
from PIL import Image

import dama.evaluation.generate as generate
from dama.cli import main
from dama.data.dataset import PairEncoder
from dama.demo.data import demo_corpus, make_demo_data
from dama.demo.tiny_llava import build_tiny_llava
from dama.errors import DamaError
from dama.evaluation.generate import (
    DecodingSettings,
    GenerateOptions,
    ResponseGenerator,
    generate_responses,
    load_generation_model,
)
from dama.evaluation.prompts import iter_prompt_rows

COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (240, 220, 40), (15, 15, 15))
QUESTIONS = ("Describe the image.", "What is shown?", "What colour is the background of this picture?",
             "Describe it.", "What do you see in this picture?")
SHORT = DecodingSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaVA and a JSONL of five questions: four images by relative path (two with ids), one in base64."""
    root = tmp_path_factory.mktemp("generate")
    build_tiny_llava(demo_corpus(), root / "model", seed=3)
    (root / "images").mkdir()
    lines = []
    for number, (colour, question) in enumerate(zip(COLOURS, QUESTIONS, strict=True)):
        image = Image.new("RGB", (40, 48), colour)
        if number == 4:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            lines.append({"image": base64.b64encode(buffer.getvalue()).decode(), "question": question,
                          "image_id": 404})
            continue
        image.save(root / "images" / f"{number}.png")
        lines.append({"image": f"images/{number}.png", "question": question, **({"id": f"q{number}", "image_id":
                                                                                 100 + number} if number < 2 else {})})
    (root / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def _options(setup, output, **options):
    """GenerateOptions for the prompts and model of `setup`, on the CPU."""
    return GenerateOptions(**{"input": setup / "prompts.jsonl", "model": setup / "model", "output": output,
                              "device": "cpu", **options})


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompts_are_the_training_template(setup):
    model, processor = load_generation_model(setup / "model", "float32", "cpu")
    generator = ResponseGenerator(model, processor, SHORT)
    input_ids, attention_mask = generator.left_padded(QUESTIONS[:3])
    expected = PairEncoder(processor).encode_prompts(QUESTIONS[:3])
    for row, prompt in enumerate(expected):
        assert input_ids[row][attention_mask[row].bool()].tolist() == prompt
        assert attention_mask[row, -len(prompt):].all() and not attention_mask[row, :-len(prompt)].any()
    assert model.config.text_config._attn_implementation == "sdpa"


def test_output_schema_and_batch_independent_greedy(setup, capsys):
    output = setup / "out" / "answers.jsonl"
    assert main(["generate", "--model", str(setup / "model"), "--input", str(setup / "prompts.jsonl"), "--output",
                 str(output), "--batch-size", "2", "--max-new-tokens", "6"]) == 0
    assert "answered 5 rows" in capsys.readouterr().out
    records = _read(output)
    assert [set(r) for r in records] == [{"id", "image_id", "question", "response"}] * 5
    assert [r["id"] for r in records] == ["q0", "q1", "prompts.jsonl:2", "prompts.jsonl:3", "prompts.jsonl:4"]
    assert [r["image_id"] for r in records] == [100, 101, "2.png", "3.png", 404]
    assert [r["question"] for r in records] == list(QUESTIONS)
    assert json.loads((setup / "out" / "answers.jsonl.meta.json").read_text())["count"] == 5
    assert not (setup / "out" / "answers.jsonl.partial.jsonl").exists()
    # The same rows one at a time, and all at once: left padding must not change a greedy answer.
    model, processor = load_generation_model(setup / "model", "float32", "cpu")
    generator = ResponseGenerator(model, processor, SHORT)
    rows = list(iter_prompt_rows(setup / "prompts.jsonl"))
    images = [row.load_image() for row in rows]
    alone = [generator([row.question], [image])[0] for row, image in zip(rows, images, strict=True)]
    together = generator([row.question for row in rows], images)
    assert [r["response"] for r in records] == alone == together
    assert any(alone)


def test_sampling_is_seeded(setup):
    answers = []
    for seed in (5, 5, 6):
        output = setup / f"sampled_{len(answers)}.jsonl"
        generate_responses(_options(setup, output, batch_size=5),
                           DecodingSettings(max_new_tokens=8, sample=True, temperature=1.5, seed=seed), progress=False)
        answers.append([r["response"] for r in _read(output)])
    assert answers[0] == answers[1] and answers[0] != answers[2]


def test_resumes_after_a_crash(setup, monkeypatch):
    reference = setup / "uninterrupted.jsonl"
    generate_responses(_options(setup, reference, batch_size=2), SHORT, progress=False)
    output = setup / "crashed.jsonl"
    real_call, calls = ResponseGenerator.__call__, []

    def crash_on_second_batch(self, questions, images, seed=0):
        calls.append(len(questions))
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return real_call(self, questions, images, seed)

    monkeypatch.setattr(generate.ResponseGenerator, "__call__", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="power cut"):
        generate_responses(_options(setup, output, batch_size=2), SHORT, progress=False)
    assert not output.exists()
    assert len((setup / "crashed.jsonl.partial.jsonl").read_text().splitlines()) == 1 + 2  # header and batch 1
    monkeypatch.setattr(generate.ResponseGenerator, "__call__", real_call)
    metadata = generate_responses(_options(setup, output, batch_size=2), SHORT, progress=False)
    assert (metadata["resumed"], metadata["generated"]) == (2, 3)
    assert output.read_text() == reference.read_text()
    assert not (setup / "crashed.jsonl.partial.jsonl").exists()


def test_training_formats_as_input(setup):
    data = make_demo_data(setup / "demo", num_train=2, num_eval=0, image_size=32)["train"]
    output = setup / "from_parquet.jsonl"
    generate_responses(_options(setup, output, input=data), SHORT, progress=False)
    records = _read(output)
    assert [(r["id"], r["image_id"]) for r in records] == [("train.parquet:0", 0), ("train.parquet:1", 1)]


@pytest.mark.parametrize("case, message", [
    ("output suffix", "--output must be a .jsonl file"),
    ("missing input", "does not exist"),
    ("no model", "holds no config.json"),
    ("lora", "holds LoRA adapters"),
    ("bad row", "line 1: expected an object with a text `question`"),
    ("missing image", "gone.png does not exist"),
    ("other settings", "partial results of a run with other settings"),
    ("temperature", "--temperature must be > 0"),
])
def test_cli_errors(setup, tmp_path, capsys, case, message):
    model, prompts, output = setup / "model", setup / "prompts.jsonl", tmp_path / "out.jsonl"
    extra = []
    if case == "output suffix":
        output = tmp_path / "out.json"
    elif case == "missing input":
        prompts = tmp_path / "nowhere.jsonl"
    elif case == "no model":
        model = tmp_path
    elif case == "lora":
        model = tmp_path / "adapter"
        model.mkdir()
        (model / "config.json").write_text("{}")
        (model / "adapter_config.json").write_text("{}")
    elif case == "bad row":
        prompts = tmp_path / "bad.jsonl"
        prompts.write_text(json.dumps({"image": "x.png"}) + "\n")
    elif case == "missing image":
        prompts = tmp_path / "missing.jsonl"
        prompts.write_text(json.dumps({"image": "gone.png", "question": "What?"}) + "\n")
    elif case == "other settings":
        (tmp_path / "out.jsonl.partial.jsonl").write_text(json.dumps({"settings": {"model": "another"}}) + "\n")
    else:
        extra = ["--sample", "--temperature", "0"]
    code = main(["generate", "--model", str(model), "--input", str(prompts), "--output", str(output),
                 "--max-new-tokens", "2", *extra])
    printed = capsys.readouterr().err
    error = printed.strip().splitlines()[-1]  # transformers' loading bar may come first
    assert code == 1 and error.startswith("dama generate: error:") and message in error, error
    assert "Traceback" not in printed



def test_a_finished_run_is_complete_and_another_runs_output_is_refused(setup, tmp_path, capsys):
    output = tmp_path / "answers.jsonl"
    argv = ["generate", "--model", str(setup / "model"), "--input", str(setup / "prompts.jsonl"), "--output",
            str(output), "--max-new-tokens", "4", "--device", "cpu"]
    assert main(argv) == 0
    written, created = output.read_text(), json.loads((tmp_path / "answers.jsonl.meta.json").read_text())["created"]
    capsys.readouterr()

    # The same run again (the batch size does not change greedy answers): reported complete, nothing rewritten.
    real_call = ResponseGenerator.__call__
    try:
        ResponseGenerator.__call__ = None  # any decoding would fail
        assert main([*argv, "--batch-size", "3"]) == 0
    finally:
        ResponseGenerator.__call__ = real_call
    assert "is already complete (same input and settings" in capsys.readouterr().out
    assert output.read_text() == written
    assert json.loads((tmp_path / "answers.jsonl.meta.json").read_text())["created"] == created

    # Another run's output (other decoding settings, or another input) is refused and left as it was.
    assert main([*argv[:-4], "--max-new-tokens", "3", "--device", "cpu"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "already holds another run's output (settings.max_new_tokens: 4 -> 3)" in error
    assert main([*argv, "--limit", "2"]) == 1
    assert "limit: None -> 2" in capsys.readouterr().err
    assert output.read_text() == written

    # --overwrite replaces it.
    assert main([*argv, "--limit", "2", "--overwrite"]) == 0
    assert len(_read(output)) == 2 and "--overwrite:" in capsys.readouterr().err


def test_an_output_the_pass_cannot_tell_is_its_own_is_refused(setup, tmp_path, capsys):
    output = tmp_path / "answers.jsonl"
    output.write_text('{"id": 1}\n')
    argv = ["generate", "--model", str(setup / "model"), "--input", str(setup / "prompts.jsonl"), "--output",
            str(output), "--device", "cpu"]
    assert main(argv) == 1
    assert "cannot tell is its own" in capsys.readouterr().err
    assert output.read_text() == '{"id": 1}\n'


def test_a_bug_inside_a_forward_keeps_its_traceback(setup, tmp_path, monkeypatch, capsys):
    """A ValueError from inside the model is a bug, not bad input: it leaves the CLI with its traceback."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from dama.errors import DamaError

    def planted_bug(self, image_features):
        raise ValueError("planted bug in the forward")

    monkeypatch.setattr(LlavaMultiModalProjector, "forward", planted_bug)
    with pytest.raises(ValueError, match="planted bug in the forward") as raised:
        main(["generate", "--model", str(setup / "model"), "--input", str(setup / "prompts.jsonl"), "--output",
              str(tmp_path / "answers.jsonl"), "--device", "cpu"])
    assert not isinstance(raised.value, DamaError)
    assert any(entry.name == "planted_bug" for entry in raised.traceback)
    assert "dama generate: error:" not in capsys.readouterr().err


def test_bad_rows_are_found_before_the_model_loads_and_skipped_on_request(setup, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    lines = (setup / "prompts.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"image": str(setup / "images" / "gone.png"), "question": "What?", "id": "gone"})
    lines[3] = json.dumps({"image": str(setup / "images" / "3.png"), "question": "  "})
    prompts.write_text("\n".join(lines) + "\n")
    output = tmp_path / "answers.jsonl"
    argv = ["generate", "--model", str(setup / "model"), "--input", str(prompts), "--image-folder", str(setup),
            "--output", str(output), "--max-new-tokens", "3", "--device", "cpu"]
    real_load = generate.load_generation_model

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the rows were checked")

    monkeypatch.setattr(generate, "load_generation_model", no_model)
    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "row prompts.jsonl:1: its image file" in error and "--on-bad-row skip" in error

    monkeypatch.setattr(generate, "load_generation_model", real_load)
    assert main([*argv, "--on-bad-row", "skip"]) == 0
    assert [record["id"] for record in _read(output)] == ["q0", "prompts.jsonl:2", "prompts.jsonl:4"]
    metadata = json.loads((tmp_path / "answers.jsonl.meta.json").read_text())
    assert {entry["row_id"]: entry["reason"] for entry in metadata["skipped"]} == {
        "prompts.jsonl:1": "missing image", "prompts.jsonl:3": "empty question"}
    assert (metadata["count"], metadata["rows"], metadata["skipped_count"]) == (3, 5, 2)


def test_a_selection_of_a_preference_input(setup, tmp_path):
    data = make_demo_data(tmp_path / "demo", num_train=4, num_eval=0, image_size=32)["train"]
    output = tmp_path / "selected.jsonl"
    generate_responses(_options(setup, output, input=data, select=["idx~2"]), SHORT, progress=False)
    assert [record["id"] for record in _read(output)] == ["train.parquet:2"]
    with pytest.raises(DamaError, match="--select keeps rows of a parquet or .json preference input"):
        generate_responses(_options(setup, tmp_path / "other.jsonl", select=["idx~2"]), SHORT, progress=False)
