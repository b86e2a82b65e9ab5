"""Reference log-probs pass: exact round trip through dama.data, z = 0 at step 0 through the training path with
other batches and in every layout (the pass itself runs prefix-shared, and packed in the JSON test), resume after a
crash, the JSON format, and helpful errors."""

import json
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlavaProcessor

import dama.offline.reference as reference
from dama.cli import main as dama_main
from dama.data.collator import PackedCollator, PaddedCollator, PrefixSharedCollator
from dama.data.dataset import PreferenceDataset
from dama.data.formats import metadata_path, read_hardness_mean, read_metadata, write_metadata
from dama.demo.data import demo_corpus, make_demo_data
from dama.demo.tiny_llava import build_tiny_llava
from dama.model.loading import load_llava
from dama.model.policy import DamaPolicy
from dama.offline.passes import partial_path, write_dataset
from dama.offline.reference import OUTPUT_COLUMNS, ReferenceOptions, main, precompute_reference

NUM_PAIRS = 7
HARDNESS_MEAN = 0.3125
# Sums of ~30 token log-probs near -6 in fp32: another batch composition may reorder a few roundings, no more.
SUM_TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The tiny model's ops are too small to gain from threads, and lose much to them on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_thread):
    """A tiny LLaVA, the demo data with hardness metadata beside it, and the reference pass over it (3 pairs/batch)."""
    root = tmp_path_factory.mktemp("reference")
    model_path = root / "tiny"
    build_tiny_llava(demo_corpus(), model_path, seed=1)
    data = make_demo_data(root / "data", num_train=NUM_PAIRS, num_eval=1)["train"]
    write_metadata(data, {"hardness_mean": HARDNESS_MEAN, "count": NUM_PAIRS})
    output = root / "out" / "train_ref.parquet"
    metadata = precompute_reference(ReferenceOptions(input=data, output=output, model=model_path, batch_size=3,
                                                     cache_dir=root / "cache", device="cpu"))
    return {"root": root, "model": model_path, "data": data, "output": output, "metadata": metadata}


def _dataset(setup, path, **options):
    processor = LlavaProcessor.from_pretrained(setup["model"], local_files_only=True)
    return PreferenceDataset.from_path(path, processor, image_folder=setup["data"].parent,
                                       cache_dir=setup["root"] / "cache", **options)


def _reference_rows(path):
    columns = ["idx", *OUTPUT_COLUMNS]
    if str(path).endswith(".json"):
        return [{c: r.get(c) for c in columns} for r in json.loads(path.read_text())]
    return pq.read_table(path, columns=columns).to_pylist()


def test_output_keeps_the_input_and_round_trips_through_the_data_loader(setup):
    source, written = pq.read_table(setup["data"]), pq.read_table(setup["output"])
    assert written.column_names == source.column_names + list(OUTPUT_COLUMNS)
    assert written.select(source.column_names).equals(source)

    dataset = _dataset(setup, setup["output"])
    assert dataset.has_reference_logps and len(dataset) == NUM_PAIRS
    for index, row in enumerate(written.to_pylist()):
        example = dataset[index]
        for side in ("chosen", "rejected"):
            total, mean = row[f"ref_{side}_logps"], row[f"ref_{side}_mean_logps"]
            tokens = row[f"ref_{side}_token_logps"]
            labels = getattr(example, f"{side}_labels")
            assert len(tokens) == int((labels != -100).sum())
            assert total == pytest.approx(math.fsum(tokens), rel=1e-6, abs=1e-5)
            assert mean == total / len(tokens)
            # The loader hands the trainer fp32 tensors: the stored float64 must be what it reads, exactly.
            assert getattr(example, f"ref_{side}_logps") == total
            assert getattr(example, f"ref_{side}_mean_logps") == mean
        logps = json.loads(row["logps"])
        assert logps == [row["ref_chosen_logps"], row["ref_chosen_mean_logps"], row["ref_chosen_token_logps"],
                         row["ref_rejected_logps"], row["ref_rejected_mean_logps"], row["ref_rejected_token_logps"]]

    # The authors' `logps` layout alone carries the same values.
    authors_only = setup["root"] / "authors_only.parquet"
    pq.write_table(written.drop_columns([c for c in OUTPUT_COLUMNS if c != "logps"]), authors_only)
    again = _dataset(setup, authors_only)
    assert again.has_reference_logps
    assert [again[i].ref_rejected_mean_logps for i in range(NUM_PAIRS)] == [
        dataset[i].ref_rejected_mean_logps for i in range(NUM_PAIRS)
    ]

    metadata = read_metadata(setup["output"])
    assert metadata == setup["metadata"]
    assert metadata["model"] == str(setup["model"].resolve())
    assert (metadata["count"], metadata["skipped_count"], metadata["dtype"], metadata["max_length"]) == (
        NUM_PAIRS, 0, "float32", 2048
    )
    assert metadata["layout"] == "prefix_shared"  # the default, as in training
    assert metadata["created"]
    # δ̄ from the hardness metadata beside the input is beside the output, where the trainer looks for it.
    assert read_hardness_mean(setup["output"]) == HARDNESS_MEAN
    assert not partial_path(setup["output"]).exists()


@pytest.mark.parametrize("layout", ["prefix_shared_fused", "packed_fused", "padded_full_logits"])
def test_margins_are_zero_at_step_zero_through_the_training_path(setup, layout):
    """The policy equal to the reference, in other batches (2 pairs, shuffled) than the pass used (3, in order)."""
    llava, processor = load_llava(setup["model"])
    if layout in ("prefix_shared_fused", "packed_fused"):
        policy = DamaPolicy(llava.eval())
        collator = PrefixSharedCollator() if layout == "prefix_shared_fused" else PackedCollator()
        mean_policy = DamaPolicy(llava, average_logps=True)
    else:
        policy = DamaPolicy(llava.eval(), head="full_logits", packed_attention=False)
        mean_policy = DamaPolicy(llava, head="full_logits", packed_attention=False, average_logps=True)
        collator = PaddedCollator(processor.tokenizer.pad_token_id)
    dataset = _dataset(setup, setup["output"])
    order = list(range(NUM_PAIRS))
    random.Random(7).shuffle(order)
    margins, mean_margins = [], []
    with torch.no_grad():
        for start in range(0, NUM_PAIRS, 2):
            batch = collator([dataset[i] for i in order[start:start + 2]])
            chosen, rejected = batch.split_chosen_rejected(policy(batch))
            assert torch.allclose(chosen, batch.ref_chosen_logps, rtol=0, atol=SUM_TOLERANCE)
            assert torch.allclose(rejected, batch.ref_rejected_logps, rtol=0, atol=SUM_TOLERANCE)
            margins.append((chosen - batch.ref_chosen_logps) - (rejected - batch.ref_rejected_logps))
            chosen, rejected = batch.split_chosen_rejected(mean_policy(batch))
            mean_margins.append((chosen - batch.ref_chosen_mean_logps) - (rejected - batch.ref_rejected_mean_logps))
    margins, mean_margins = torch.cat(margins), torch.cat(mean_margins)
    assert margins.shape == (NUM_PAIRS,)
    assert margins.abs().max() <= SUM_TOLERANCE
    assert mean_margins.abs().max() <= 1e-5


def test_pair_references_do_not_depend_on_the_token_layout(setup):
    """Prefix-shared, packed and padded batches of the same pairs give each pair the same per-token lists, sums and
    means."""
    processor = LlavaProcessor.from_pretrained(setup["model"], local_files_only=True)
    dataset = _dataset(setup, setup["data"])
    examples = [dataset[i] for i in (4, 0, 2)]
    layouts = [(DamaPolicy(load_llava(setup["model"])[0].eval()), PackedCollator()),
               (DamaPolicy(load_llava(setup["model"])[0].eval()), PrefixSharedCollator()),
               (DamaPolicy(load_llava(setup["model"])[0].eval(), packed_attention=False),
                PaddedCollator(processor.tokenizer.pad_token_id))]
    results = []
    with torch.no_grad():
        for policy, collator in layouts:
            batch = collator(examples)
            results.append(reference.pair_references(batch, reference.supervised_token_logps(policy, batch)))
            assert torch.equal(torch.tensor([r.chosen_logps for r in results[-1]]),
                               batch.split_chosen_rejected(policy(batch))[0])
    for packed, *others in zip(*results, strict=True):
        for other in others:
            assert len(packed.rejected_token_logps) == len(other.rejected_token_logps)
            assert packed.rejected_token_logps == pytest.approx(other.rejected_token_logps, abs=1e-5)
            assert packed.chosen_mean_logps == pytest.approx(other.chosen_mean_logps, abs=1e-5)


def test_resume_after_a_crash_skips_finished_rows_and_matches_an_uninterrupted_run(setup, monkeypatch):
    """Same settings as the module's uninterrupted run (3 pairs per batch); the second batch crashes."""
    calls, crash_at = [], {"batch": 2}
    score = reference.supervised_token_logps

    def counting_and_crashing(policy, batch):
        calls.append(batch.row_ids)
        if len(calls) == crash_at["batch"]:
            raise RuntimeError("simulated crash")
        return score(policy, batch)

    monkeypatch.setattr(reference, "supervised_token_logps", counting_and_crashing)
    output = setup["root"] / "resume" / "train_ref.parquet"
    options = ReferenceOptions(input=setup["data"], output=output, model=setup["model"], batch_size=3,
                               cache_dir=setup["root"] / "cache", device="cpu")
    with pytest.raises(RuntimeError, match="simulated crash"):
        precompute_reference(options)
    assert not output.exists() and not metadata_path(output).exists()
    assert len(partial_path(output).read_text().splitlines()) == 1 + 3  # the header and the first batch

    calls.clear()
    crash_at["batch"] = None
    resumed = precompute_reference(options)
    assert calls == [[f"train.parquet:{n}" for n in (3, 4, 5)], ["train.parquet:6"]]
    assert (resumed["resumed"], resumed["computed"], resumed["count"]) == (3, 4, NUM_PAIRS)
    assert (setup["metadata"]["resumed"], setup["metadata"]["computed"]) == (0, NUM_PAIRS)
    assert pq.read_table(output).equals(pq.read_table(setup["output"]))
    assert not partial_path(output).exists()


def test_json_input_token_budget_skip_and_the_cli(setup, capsys):
    """The authors' JSON list (with stale `logps` of another tokenizer, replaced), over-long pairs skipped."""
    folder = setup["root"] / "json"
    (folder / "images").mkdir(parents=True)
    records = []
    for row in pq.read_table(setup["data"]).to_pylist():
        image = row.pop("image")
        (folder / "images" / f"{row['idx']}.png").write_bytes(image["bytes"])
        records.append({**row, "image_path": f"{row['idx']}.png", "logps": [-1.0, -0.5, [-0.5, -0.5], -2.0, -1.0,
                                                                              [-1.0, -1.0]], "chosen_logits": [0.1]})
    source = folder / "pairs.json"
    source.write_text(json.dumps(records))

    lengths = sorted(max(int(e.chosen_input_ids.numel()), int(e.rejected_input_ids.numel()))
                     for e in (_dataset(setup, setup["output"], max_length=None)[i] for i in range(NUM_PAIRS)))
    max_length = lengths[NUM_PAIRS // 2]
    output = folder / "out" / "pairs_ref.json"
    code = dama_main([
        "precompute-ref", "--input", str(source), "--image-folder", str(folder / "images"), "--model",
        str(setup["model"]), "--output", str(output), "--max-tokens-per-batch", str(5 * max_length),
        "--max-length", str(max_length), "--overlong", "skip", "--limit", "6", "--device", "cpu",
        "--dtype", "float32", "--layout", "packed",
    ])
    assert code == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out

    written = json.loads(output.read_text())
    assert len(written) == 6 and [r["chosen_logits"] for r in written] == [[0.1]] * 6
    metadata = read_metadata(output)
    assert "hardness_mean" not in metadata and metadata["format"] == "json" and metadata["layout"] == "packed"
    skipped = [r for r in written if r["ref_chosen_logps"] is None]
    assert len(skipped) == metadata["skipped_count"] >= 1
    assert all(r["logps"] is None and r["ref_rejected_token_logps"] is None for r in skipped)
    assert [(e["row_id"], e["reason"], e["output_row_id"]) for e in metadata["skipped"]] == [
        (f"pairs.json:{n}", "over-long", f"pairs_ref.json:{n}") for n, r in enumerate(written)
        if r["ref_chosen_logps"] is None
    ]
    assert metadata["skipped_by_reason"] == {"over-long": len(skipped)}

    processor = LlavaProcessor.from_pretrained(setup["model"], local_files_only=True)
    dataset = PreferenceDataset.from_path(output, processor, image_folder=folder / "images", max_length=max_length,
                                          overlong="skip")
    assert dataset.has_reference_logps and len(dataset) == 6 - len(skipped)
    # Same pairs as the parquet run, other batches and the packed layout: the same values up to rounding.
    parquet_rows = {r["idx"]: r for r in _reference_rows(setup["output"])}
    for row in _reference_rows(output):
        if row["logps"] is None:
            continue
        assert row["logps"][2] == row["ref_chosen_token_logps"]
        expected = parquet_rows[row["idx"]]
        assert row["ref_chosen_logps"] == pytest.approx(expected["ref_chosen_logps"], abs=SUM_TOLERANCE)
        assert row["ref_rejected_token_logps"] == pytest.approx(expected["ref_rejected_token_logps"], abs=1e-5)


def _arguments(setup, tmp_path, **changes):
    arguments = {"--input": str(setup["data"]), "--model": str(setup["model"]),
                 "--output": str(tmp_path / "out.parquet"), "--cache-dir": str(setup["root"] / "cache")}
    arguments.update(changes)
    return [item for pair in arguments.items() for item in pair]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"--batch-size": "0"}, "batch_size must be at least 1"),
        ({"--max-tokens-per-batch": "0"}, "max_tokens_per_batch must be at least 1"),
        ({"--max-length": "1"}, "max_length must be at least 2"),
        ({"--limit": "-1"}, "limit must be at least 0"),
        ({"--device": "nonsense"}, "is not a torch device"),
        ({"--input": "missing.parquet"}, "does not exist"),
        ({"--model": "no_model_here"}, "holds no config.json"),
        ({"--output": "out.json"}, "give an --output ending in .parquet"),
        ({"--max-length": "20"}, "never truncated: raise max_length, or pass overlong='skip'"),
        ({"--max-tokens-per-batch": "20"}, "longer than max_tokens=20"),
    ],
)
def test_bad_arguments_give_a_clear_error(setup, tmp_path, capsys, changes, message):
    assert main(_arguments(setup, tmp_path, **changes)) == 1
    # The last line: loading the model may print progress bars before the error.
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("dama precompute-ref: error: ") and message in error
    assert not (tmp_path / "out.parquet").exists()


def test_output_equal_to_input_cuda_without_gpu_and_help(setup, tmp_path, capsys):
    assert main(_arguments(setup, tmp_path, **{"--output": str(setup["data"])})) == 1
    assert "--output must differ from --input" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(_arguments(setup, tmp_path, **{"--device": "cuda"})) == 1
        assert "no CUDA GPU is available" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(_arguments(setup, tmp_path, **{"--overlong": "truncate"}))
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(_arguments(setup, tmp_path, **{"--layout": "padded"}))
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        dama_main(["precompute-ref", "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--input", "--image-folder", "--model", "--output", "--batch-size", "--max-tokens-per-batch",
                   "--max-length", "--overlong", "--device", "--dtype", "--limit", "--cache-dir", "--layout"):
        assert option in usage


def test_an_empty_parquet_input_gives_an_empty_output(tmp_path):
    """A parquet input with no rows still gives a valid output with the new columns."""
    source = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "chosen": pa.array([], pa.string()),
                             "rejected": pa.array([], pa.string())}), source)
    write_dataset(source, tmp_path / "out.parquet", reference.REFERENCE_COLUMNS, lambda row_id: {})
    assert pq.read_table(tmp_path / "out.parquet").column_names == ["question", "chosen", "rejected",
                                                                     *OUTPUT_COLUMNS]


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_a_selection_writes_only_its_rows_in_both_formats(kind, tmp_path):
    rows = [{"question": f"q{n}", "chosen": "a", "rejected": "b", "idx": n} for n in range(5)]
    source = tmp_path / f"in.{kind}"
    if kind == "json":
        source.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), source)
    keep = {f"{source.name}:1", f"{source.name}:3"}
    output = tmp_path / f"out.{kind}"
    write_dataset(source, output, reference.REFERENCE_COLUMNS,
                  lambda row_id: {**dict.fromkeys(OUTPUT_COLUMNS), "logps": row_id}, keep=keep)
    written = json.loads(output.read_text()) if kind == "json" else pq.read_table(output).to_pylist()
    assert [row["idx"] for row in written] == [1, 3]
    assert [json.loads(row["logps"]) if kind == "parquet" else row["logps"] for row in written] == sorted(keep)
