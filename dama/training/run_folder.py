"""What `dama train` may do with its output_dir, decided before anything is loaded or written there.

A folder "holds a run" when it has any of a run's files: resolved_config.json, a checkpoint-* folder (complete or
not), trainer_state.json, a saved model, or the completion marker. Then:
- without --resume and without --overwrite_output_dir: refused, naming what is there (another run's checkpoints
  would otherwise be rotated against the new ones and resumed from);
- with --resume true: the folder's resolved_config.json must equal this run's (LAUNCH_FIELDS aside), else refused
  with the fields that differ; only its length (LENGTH_FIELDS) may grow, and then the run goes on from its newest
  checkpoint. A complete run (its marker, written after the final save) is reported "already complete" and left as
  it is; a run whose newest checkpoint is at its last step (stopped before its final save)
  gets its final model from that checkpoint, without another step; otherwise training resumes from the newest
  complete checkpoint;
- with --overwrite_output_dir true: once the start-up checks pass, the run's entries are removed and listed:
  checkpoint folders and the files a run writes at the top (RUN_FILE_PATTERNS); anything else
  in the folder is kept.
The run record (resolved_config.json, versions.json, skipped_rows.json) is written only after the start-up checks.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dama.data.formats import atomic_path, write_json_atomic
from dama.errors import DamaError

from .checkpointing import COMPLETE_MARKER, DAMA_STATE_NAME, newest_checkpoint

RUN_RECORD = "resolved_config.json"
VERSIONS = "versions.json"
SKIPPED_ROWS = "skipped_rows.json"
RUN_COMPLETE = "run_complete.json"
TRAINER_STATE = "trainer_state.json"
# Fields that say how a run is launched, logged and saved, not what it computes: they may differ when the same run is
# resumed (a longer save interval or another logger on resume is common; a changed max_steps is not: it moves the
# learning-rate schedule).
LAUNCH_FIELDS = frozenset({
    "output_dir", "resume", "overwrite_output_dir", "local_rank", "logging_steps", "logging_first_step",
    "logging_dir", "report_to", "run_name", "save_steps", "save_total_limit", "eval_steps", "disable_tqdm",
    "dataloader_num_workers", "save_on_signal",
})
# Fields that set how long a run trains: a resumed run may be given more steps or epochs. It goes on from its newest
# checkpoint, complete or not, with the learning-rate schedule stretched to the new length (as the Trainer does).
LENGTH_FIELDS = frozenset({"max_steps", "num_train_epochs"})
# The files a run writes at the top of output_dir: the run record, the final model with its processor, the state.
RUN_FILE_PATTERNS = (
    RUN_RECORD, VERSIONS, SKIPPED_ROWS, RUN_COMPLETE, TRAINER_STATE, "training_args.bin", "config.json",
    "generation_config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "adapter_*",
    "preprocessor_config.json", "processor_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "chat_template.*", "vocab.*", "merges.txt",
)
# The files of a checkpoint that are resume state, not the model a run saves at its end (DeepSpeed's engine state
# lives in sub-folders, which are never copied).
NOT_MODEL_FILES = (TRAINER_STATE, DAMA_STATE_NAME, COMPLETE_MARKER, "optimizer.pt", "scheduler.pt", "scaler.pt",
                   "rng_state*.pth", "latest", "zero_to_fp32.py")


@dataclass(frozen=True)
class RunFolderPlan:
    """What this run does with output_dir.

    action: "new" (train from the start), "resume" (train from `checkpoint`, or from the start when the run has
    none yet), "finish" (write the final model from `checkpoint`, the run's last step, without training),
    "complete" (nothing to do) or "overwrite" (remove `remove` once the start-up checks pass, then train).
    """

    path: Path
    action: str
    checkpoint: Path | None = None
    remove: tuple[Path, ...] = ()


def _run_entries(folder: Path) -> list[Path]:
    """The entries of `folder` that belong to a run (see RUN_FILE_PATTERNS), in name order."""
    entries = {path for pattern in RUN_FILE_PATTERNS for path in folder.glob(pattern) if path.is_file()}
    entries |= {path for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.is_dir()}
    return sorted(entries)


def _describe(entries: list[Path]) -> str:
    """What a folder's run entries amount to, most telling first."""
    names = {path.name for path in entries}
    checkpoints = sorted((name for name in names if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")), key=_step)
    parts = ["complete" if RUN_COMPLETE in names else "not complete"]
    if any(name.endswith(".safetensors") for name in names):
        parts.append("a saved model")
    if checkpoints:
        parts.append(f"{len(checkpoints)} checkpoint folder(s) up to {checkpoints[-1]}")
    parts.append(RUN_RECORD if RUN_RECORD in names else f"no {RUN_RECORD}")
    return ", ".join(parts)


def _step(name: str) -> int:
    suffix = name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def config_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The fields (LAUNCH_FIELDS and LENGTH_FIELDS aside) whose values differ, as "name: old -> new"."""
    names = sorted((set(recorded) | set(current)) - LAUNCH_FIELDS - LENGTH_FIELDS)
    return [f"{name}: {recorded.get(name)!r} -> {current.get(name)!r}" for name in names
            if recorded.get(name) != current.get(name)]


def _finished_at(checkpoint: Path) -> bool:
    """Whether a complete checkpoint is at its run's last optimizer step."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return 0 < int(state.get("max_steps") or 0) <= int(state.get("global_step") or 0)


def plan_run_folder(
    output_dir: str | Path, config: Mapping[str, Any], *, resume: bool, overwrite: bool
) -> RunFolderPlan:
    """Decide what the run with resolved `config` does with `output_dir` (module docstring); reads only.

    DamaError, saying what to do, when the folder must be refused.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise DamaError(f"output_dir {folder} is a file, not a folder")
    entries = _run_entries(folder) if folder.is_dir() else []
    if not entries:
        return RunFolderPlan(folder, "resume" if resume else "new")
    if overwrite:
        return RunFolderPlan(folder, "overwrite", remove=tuple(entries))
    held = _describe(entries)
    if not resume:
        raise DamaError(
            f"output_dir {folder} already holds a run ({held}). Pass --resume true to continue that run, "
            "--overwrite_output_dir true to delete it and start over, or choose another output_dir"
        )
    record = folder / RUN_RECORD
    if not record.is_file():
        raise DamaError(
            f"output_dir {folder} holds a run ({held}) without its {RUN_RECORD}, so it cannot be checked to be this "
            "run: choose another output_dir, or pass --overwrite_output_dir true instead of --resume"
        )
    try:
        recorded = json.loads(record.read_text())
    except ValueError as error:
        raise DamaError(f"{record} is not valid JSON ({error}); the run cannot be resumed") from error
    differences = config_differences(recorded, config)
    if differences:
        raise DamaError(
            f"output_dir {folder} holds another run: its config differs in {'; '.join(differences)}. Resume with "
            "the same config, choose another output_dir, or pass --overwrite_output_dir true instead of --resume"
        )
    lengthened = any(recorded.get(name) != config.get(name) for name in LENGTH_FIELDS)
    if (folder / RUN_COMPLETE).is_file() and not lengthened:
        return RunFolderPlan(folder, "complete")
    checkpoint = newest_checkpoint(folder)
    if checkpoint is not None and not lengthened and _finished_at(checkpoint):
        return RunFolderPlan(folder, "finish", checkpoint=checkpoint)
    return RunFolderPlan(folder, "resume", checkpoint=checkpoint)


def clear_run(plan: RunFolderPlan) -> None:
    """Under "overwrite": remove the old run's entries, saying what goes; under "resume": the completion marker of a
    run given more steps, until it completes again (call on one process, after the checks)."""
    if plan.action == "resume":
        (plan.path / RUN_COMPLETE).unlink(missing_ok=True)
    if plan.action != "overwrite":
        return
    print(f"dama train: --overwrite_output_dir: removing from {plan.path}: {', '.join(p.name for p in plan.remove)}",
          file=sys.stderr, flush=True)
    for path in plan.remove:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def write_run_record(output_dir: str | Path, config: Mapping[str, Any], versions: Mapping[str, str],
                     skipped_rows: Mapping[str, Any]) -> None:
    """The resolved config, package versions and rows left out, beside the checkpoints (each written atomically)."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / RUN_RECORD, dict(config))
    write_json_atomic(folder / VERSIONS, dict(versions))
    write_json_atomic(folder / SKIPPED_ROWS, dict(skipped_rows))


def mark_complete(output_dir: str | Path, global_step: int) -> None:
    """The marker that makes `--resume true` report the run complete; written after the final model and state."""
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(Path(output_dir) / RUN_COMPLETE, {"global_step": global_step, "finished": finished})


def finish_from_checkpoint(plan: RunFolderPlan) -> None:
    """Under "finish": the final model and state are the last checkpoint's; copy them to the top, then the marker."""
    checkpoint = plan.checkpoint
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    for source in sorted(checkpoint.iterdir()):
        if source.is_file() and not any(source.match(pattern) for pattern in NOT_MODEL_FILES):
            with atomic_path(plan.path / source.name) as temporary:
                shutil.copyfile(source, temporary)
    with atomic_path(plan.path / TRAINER_STATE) as temporary:
        shutil.copyfile(checkpoint / TRAINER_STATE, temporary)
    mark_complete(plan.path, int(state["global_step"]))
