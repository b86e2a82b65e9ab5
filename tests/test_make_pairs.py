"""`dama make-pairs`: CHAIR judging and pairing worked by hand on COCO-format files laid out as COCO ships them
(tests/fixtures/coco/annotations: three train2014 images, all 80 categories with COCO's ids, a captions file), ties
skipped, the RLAIF-V output that the next steps read, resuming after a crash, atomic output, and errors."""

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dama.cli import main
from dama.demo.data import demo_corpus
from dama.demo.tiny_clip import build_tiny_clip
from dama.demo.tiny_llava import build_tiny_llava
from dama.errors import DamaError
from dama.evaluation.generate import SEED_STRIDE
from dama.evaluation.make_pairs import (
    ChairJudge,
    JudgedAnswer,
    MakePairsOptions,
    SamplingSettings,
    make_pairs,
    pick_pair,
)
from dama.evaluation.prompts import iter_prompt_rows

COCO = Path(__file__).resolve().parent / "fixtures" / "coco" / "annotations"
INSTANCES, CAPTIONS = COCO / "instances_train2014.json", COCO / "captions_train2014.json"
# Image 9: dining table, cup, fork (its captions add a knife); 25: dog, couch (captions add a cat); 30: person, bicycle.
ANSWERS = {
    "Describe the table.": ["A cup and a fork on a dining table.", "A cup, a fork and a bottle.",
                            "A cup and a fork on a dining table.", "A cup."],
    "What is on the sofa?": ["A dog and a cat on a couch.", "A dog on a couch.", "A dog on a couch.",
                             "A dog on a couch."],
    "Who is there?": ["A man riding a bike.", "A man with a dog.", "A cyclist.", "A bike near a car and a bus."],
    "What is on the table?": ["A fork.", "A fork.", "A fork.", "A fork."],
}
ROWS = [(9, "Describe the table."), (25, "What is on the sofa?"), (30, "Who is there?"), (9, "What is on the table?")]
SAMPLES = 4


def _answer(text, hallucinated, recall):
    return JudgedAnswer(text, tuple(hallucinated), recall)


def test_fewest_hallucinations_win_then_recall_and_ties_are_skipped():
    ranked = [_answer("a", ["cat"], 0.5), _answer("b", [], 0.5), _answer("c", ["cat", "bus"], 1.0),
              _answer("d", [], 1.0)]
    assert pick_pair(ranked) == (3, 2)  # no hallucination and full recall beats two hallucinated objects
    assert pick_pair([_answer("a", [], 0.5), _answer("b", [], 1.0)]) == (1, 0)  # recall breaks the tie
    assert pick_pair([_answer("a", ["dog"], 0.5), _answer("b", ["cat"], 0.5), _answer("c", ["cup"], 0.5)]) is None
    equals = [_answer("a", [], 1.0), _answer("b", [], 1.0), _answer("c", ["x"], 1.0), _answer("d", ["y"], 1.0)]
    assert pick_pair(equals) == (0, 2)  # the first of the best and the first of the worst
    # An empty answer names nothing wrong, but it is no answer: it is never chosen, and alone it makes no pair.
    assert pick_pair([_answer("", [], 0.0), _answer("a", ["cat"], 1.0), _answer(" b", [], 0.5)]) == (2, 1)
    assert pick_pair([_answer("", [], 0.0), _answer("a", ["cat"], 1.0)]) is None
    with pytest.raises(ValueError, match="at least one answer"):
        pick_pair([])


def test_the_judge_reads_coco_as_it_ships(coco):
    judge = ChairJudge([INSTANCES])
    assert len(judge.truth.categories) == 80 and judge.truth.objects[9] == {"dining table", "cup", "fork"}
    # "sofa" names COCO's couch; "cat" is not annotated in image 25.
    answer = judge.judge("A dog and a cat on a sofa.", 25)
    assert answer.hallucinated == ("cat",) and answer.recall == 1.0
    answer = judge.judge("A cup and a knife on a table.", 9)
    assert answer.hallucinated == ("knife",) and answer.recall == pytest.approx(2 / 3)
    with_captions = ChairJudge([INSTANCES], [CAPTIONS])
    # The rows name their images by COCO file name.
    assert with_captions.image_keys(list(iter_prompt_rows(coco / "prompts.jsonl"))) == [9, 25, 30, 9]
    # The captions mention a knife in image 9 and a cat in image 25: both now count as present.
    answer = with_captions.judge("A cup and a knife on a table.", 9)
    assert answer.hallucinated == () and answer.recall == pytest.approx(3 / 4)
    assert with_captions.judge("A dog and a cat on a sofa.", 25).hallucinated == ()


@pytest.fixture
def coco(tmp_path):
    """COCO images by file name (train2014/), and a JSONL of the four ROWS naming them."""
    (tmp_path / "train2014").mkdir()
    for number, image_id in enumerate((9, 25, 30)):
        Image.new("RGB", (48, 40), (40 * number, 90, 160)).save(
            tmp_path / "train2014" / f"COCO_train2014_{image_id:012d}.jpg")
    lines = [{"image": f"train2014/COCO_train2014_{image_id:012d}.jpg", "question": question}
             for image_id, question in ROWS]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return tmp_path


class ScriptedSampler:
    """Answers each row's questions with ANSWERS in order (each row's SAMPLES answers sit side by side); records the
    seed of every call and can fail on a given call, as a killed run would."""

    def __init__(self, fail_on_call=None):
        self.seeds, self.fail_on_call = [], fail_on_call

    def __call__(self, questions, images, seed):
        if len(self.seeds) == self.fail_on_call:
            raise KeyboardInterrupt("killed")
        self.seeds.append(seed)
        assert len(questions) == len(images) and len(questions) % SAMPLES == 0
        return [ANSWERS[question][index % SAMPLES] for index, question in enumerate(questions)]


def _options(coco, output, **options):
    (coco / "model").mkdir(exist_ok=True)
    (coco / "model" / "config.json").write_text("{}")  # the scripted sampler stands in for the model
    return MakePairsOptions(input=str(coco / "prompts.jsonl"), output=str(output), model=str(coco / "model"),
                            annotations=[str(INSTANCES)], device="cpu", **options)


def _run(coco, output, sampler, samples=SAMPLES, **options):
    return make_pairs(_options(coco, output, **options), SamplingSettings(samples=samples, seed=5), progress=False,
                      sampler=sampler)


def test_pairs_are_best_against_worst_in_rlaif_v_format(coco):
    output = coco / "pairs.parquet"
    metadata = _run(coco, output, ScriptedSampler(), batch_size=2)
    rows = pq.read_table(output).to_pylist()
    assert set(rows[0]) == {"ds_name", "image", "question", "chosen", "rejected", "origin_dataset", "origin_split",
                            "idx", "image_path"}
    pairs = [(row["idx"], row["chosen"], row["rejected"]) for row in rows]
    assert pairs == [
        (9, "A cup and a fork on a dining table.", "A cup, a fork and a bottle."),  # 0 vs 1 hallucinated (bottle)
        (25, "A dog on a couch.", "A dog and a cat on a couch."),  # the cat is not annotated
        (30, "A man riding a bike.", "A bike near a car and a bus."),  # recall 1 beats "a cyclist" (1/2)
    ]  # the fourth row's answers are all "A fork.": skipped
    assert rows[0]["image"]["bytes"] == (coco / "train2014" / "COCO_train2014_000000000009.jpg").read_bytes()
    assert rows[0]["image_path"] == "train2014/COCO_train2014_000000000009.jpg"
    origin = json.loads(rows[0]["origin_split"])
    assert origin["model"] == "model" and origin["judge"] == "CHAIR: instances_train2014.json"
    assert metadata["rows"] == 4 and metadata["pairs"] == 3 and metadata["skipped_by_reason"] == {"all answers tie": 1}
    assert metadata["chosen_hallucinated_mean"] == 0.0
    assert metadata["rejected_hallucinated_mean"] == pytest.approx(4 / 3)  # bottle; cat; car and bus
    assert not (coco / "pairs.parquet.partial.jsonl").exists()


def test_captions_change_the_judgement(coco):
    metadata = _run(coco, coco / "pairs.parquet", ScriptedSampler(), captions=[str(CAPTIONS)])
    rows = pq.read_table(coco / "pairs.parquet").to_pylist()
    # With the captions the cat of image 25 is there: naming it now adds recall instead of a hallucination.
    assert (rows[1]["chosen"], rows[1]["rejected"]) == ("A dog and a cat on a couch.", "A dog on a couch.")
    assert metadata["captions"] == [str(CAPTIONS)] and "captions_train2014.json" in metadata["judge"]


def test_a_killed_run_leaves_no_output_and_resumes_to_the_same_pairs(coco):
    whole = _run(coco, coco / "whole.parquet", ScriptedSampler(), batch_size=1)
    killed = ScriptedSampler(fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        _run(coco, coco / "pairs.parquet", killed, batch_size=1)
    assert not (coco / "pairs.parquet").exists() and not (coco / "pairs.parquet.meta.json").exists()
    partial = (coco / "pairs.parquet.partial.jsonl").read_text().splitlines()
    assert len(partial) == 1 + 2  # the header and the two finished rows
    resumed_sampler = ScriptedSampler()
    resumed = _run(coco, coco / "pairs.parquet", resumed_sampler, batch_size=1)
    assert resumed_sampler.seeds == [5 * SEED_STRIDE + 2, 5 * SEED_STRIDE + 3]  # only the unfinished batches
    assert resumed["resumed"] == 2 and resumed["computed"] == 2
    assert pq.read_table(coco / "pairs.parquet").to_pylist() == pq.read_table(coco / "whole.parquet").to_pylist()
    assert {key: resumed[key] for key in ("pairs", "chosen_hallucinated_mean", "rejected_hallucinated_mean")} == {
        key: whole[key] for key in ("pairs", "chosen_hallucinated_mean", "rejected_hallucinated_mean")}
    again = ScriptedSampler()
    assert _run(coco, coco / "pairs.parquet", again, batch_size=1)["already_complete"] and again.seeds == []
    with pytest.raises(DamaError, match="another run's output .*samples: 4 -> 3.*--overwrite"):
        _run(coco, coco / "pairs.parquet", ScriptedSampler(), samples=3, batch_size=1)


def test_the_next_steps_read_the_pairs(coco, capsys):
    output = coco / "pairs.parquet"
    _run(coco, output, ScriptedSampler())
    model = coco / "llava"
    build_tiny_llava(demo_corpus(), model, seed=0)
    clip = build_tiny_clip(coco / "clip", seed=0)
    assert main(["hardness", "--input", str(output), "--clip", str(clip), "--output",
                 str(coco / "scored.parquet")]) == 0
    assert main(["precompute-ref", "--input", str(coco / "scored.parquet"), "--model", str(model), "--output",
                 str(coco / "ready.parquet"), "--cache-dir", str(coco / "cache")]) == 0
    assert "scored 3 pairs" in capsys.readouterr().out
    ready = pq.read_table(coco / "ready.parquet").to_pylist()
    assert [row["chosen"] for row in ready] == [row["chosen"] for row in pq.read_table(output).to_pylist()]
    assert all(row["hardness"] is not None and row["ref_chosen_logps"] < 0 for row in ready)
    # The pairs' idx is the annotations' image id: eval-chair scores generations on them with the same file.
    prompt_rows = list(iter_prompt_rows(output))
    assert [row.image_id for row in prompt_rows] == [9, 25, 30]


def test_the_command_samples_a_real_model_and_reports(coco, capsys):
    build_tiny_llava(demo_corpus(), coco / "llava", seed=1)
    argv = ["make-pairs", "--model", str(coco / "llava"), "--input", str(coco / "prompts.jsonl"), "--annotations",
            str(INSTANCES), "--captions", str(CAPTIONS), "--output", str(coco / "pairs.parquet"), "--samples", "3",
            "--max-new-tokens", "5", "--batch-size", "3", "--seed", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "judged 3 answers for each of 4 rows (0 from an earlier run)" in printed and "wrote" in printed
    metadata = json.loads((coco / "pairs.parquet.meta.json").read_text())
    assert metadata["pairs"] + metadata["skipped_by_reason"].get("all answers tie", 0) == 4
    assert pq.read_table(coco / "pairs.parquet").num_rows == metadata["pairs"]
    shutil.copy(coco / "pairs.parquet", coco / "first.parquet")
    assert main([*argv, "--overwrite"]) == 0  # the same seed samples the same answers
    assert pq.read_table(coco / "pairs.parquet").equals(pq.read_table(coco / "first.parquet"))


@pytest.mark.parametrize(("change", "message"), [
    (["--samples", "1"], "--samples must be at least 2"),
    (["--output", "pairs.json"], "--output must be a .parquet file"),
    (["--select", "ds_name=x"], "--select keeps rows of a parquet or .json preference input"),
    (["--annotations", "other.json"], "annotations file .*other.json does not exist"),
    (["--temperature", "0"], "--temperature must be > 0"),
])
def test_bad_input_is_one_line(coco, capsys, change, message):
    (coco / "model").mkdir()
    (coco / "model" / "config.json").write_text("{}")
    argv = {"--model": str(coco / "model"), "--input": str(coco / "prompts.jsonl"), "--annotations": str(INSTANCES),
            "--output": str(coco / "pairs.parquet")}
    extra = []
    for flag, value in zip(change[::2], change[1::2], strict=True):
        if flag in argv:
            argv[flag] = str(coco / value) if flag in ("--output", "--annotations") else value
        else:
            extra += [flag, value]
    assert main(["make-pairs", *[item for pair in argv.items() for item in pair], *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dama make-pairs: error:") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_rows_whose_image_is_not_annotated_are_refused(coco, capsys):
    with open(coco / "prompts.jsonl", "a") as handle:
        handle.write(json.dumps({"image": "train2014/COCO_train2014_000000000009.jpg", "question": "Hm?",
                                 "image_id": 777}) + "\n")
    with pytest.raises(DamaError, match=r"1 of 5 rows name images the annotations do not hold .*image_id 777"):
        _run(coco, coco / "pairs.parquet", ScriptedSampler())


def test_the_command_follows_the_passes_protocol(coco, capsys, monkeypatch):
    """Options from a YAML and `--key=value`; a finished run is reported complete, another run's output is refused
    unless --overwrite; a bad row stops the run before the model loads, or is skipped and listed beside the ties."""
    from dama.evaluation import make_pairs as module

    loads = []
    monkeypatch.setattr(module, "load_generation_model", lambda *args: loads.append(args) or (None, None))
    monkeypatch.setattr(module, "ResponseGenerator", lambda model, processor, decoding: ScriptedSampler())
    _options(coco, coco / "pairs.parquet")  # writes the model folder
    config = coco / "make_pairs.yaml"
    config.write_text(json.dumps({"model": str(coco / "model"), "annotations": [str(INSTANCES)], "samples": SAMPLES,
                                  "device": "cpu"}))
    output = coco / "pairs.parquet"
    argv = ["make-pairs", "--config", str(config), "--input", str(coco / "prompts.jsonl"), f"--output={output}",
            "--seed=5", "--batch-size", "2"]
    assert main(argv) == 0
    assert "kept 3 pairs, skipped 1 (1 all answers tie)" in capsys.readouterr().out
    written = output.read_bytes()
    metadata = json.loads((coco / "pairs.parquet.meta.json").read_text())
    assert (metadata["seed"], metadata["batch_size"], metadata["samples"], metadata["pairs"]) == (5, 2, SAMPLES, 3)
    assert [entry["reason"] for entry in metadata["skipped"]] == ["all answers tie"]

    loads.clear()
    assert main(argv) == 0
    assert "is already complete (same input and settings" in capsys.readouterr().out and loads == []
    assert output.read_bytes() == written

    assert main([*argv, "--seed=6"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "already holds another run's output (settings.seed: 5 -> 6)" in error[0]
    assert output.read_bytes() == written
    assert main([*argv, "--limit", "2", "--overwrite"]) == 0
    assert "--overwrite:" in capsys.readouterr().err and pq.read_table(output).num_rows == 2

    with open(coco / "prompts.jsonl", "a") as handle:
        handle.write(json.dumps({"image": "train2014/gone.jpg", "question": "Where?", "image_id": 30}) + "\n")
    loads.clear()
    assert main([*argv, "--overwrite"]) == 1
    assert "prompts.jsonl:4: its image file" in capsys.readouterr().err and loads == []
    assert main([*argv, "--overwrite", "--on-bad-row", "skip"]) == 0
    metadata = json.loads((coco / "pairs.parquet.meta.json").read_text())
    assert {entry["row_id"]: entry["reason"] for entry in metadata["skipped"]} == {
        "prompts.jsonl:4": "missing image", "prompts.jsonl:3": "all answers tie"}
    assert (metadata["pairs"], metadata["rows"], metadata["checked_rows"]) == (3, 4, 5)
