"""Runs on a shared cluster: a signal that preempts `dama train` (one process and torchrun), two launches into one
output, a stale lock, and a disk that fills during a save.

The signals go to real `dama train` subprocesses; the resumed runs are compared with an uninterrupted one, byte for
byte (the final model) and tensor for tensor (the DAMA state).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import psutil
import pytest
import torch

from dama.demo.data import demo_corpus, make_demo_data
from dama.demo.tiny_llava import build_tiny_llava
from dama.disk_space import format_bytes, is_write_error, tree_bytes
from dama.exit_status import EXIT_REQUEUE, EXIT_WRITE_FAILED, WriteFailed
from dama.offline import hardness, reference
from dama.output_guard import OutputGuard
from dama.output_lock import OutputLock, OutputLockedError, lock_path
from dama.planning import plan_command
from dama.training import train
from dama.training.arguments import parse_training_arguments
from dama.training.checkpointing import DAMA_STATE_NAME, newest_checkpoint
from dama.training.preemption import signals_from_option
from dama.training.run_folder import RUN_COMPLETE

REPO = Path(__file__).resolve().parents[1]
STEPS = 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    build_tiny_llava(demo_corpus(), root / "model", seed=0)
    paths = make_demo_data(root / "data", num_train=24, num_eval=0, image_size=32)
    return root / "model", paths["train"]


def train_argv(tiny, output_dir: Path, *extra: str) -> list[str]:
    model, train_file = tiny
    return ["--model_name_or_path", str(model), "--train_file", str(train_file), "--output_dir", str(output_dir),
            "--reference", "online", "--data_aware", "false", "--shuffle", "false",
            "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--max_steps", str(STEPS),
            "--save_steps", "10", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true",
            "--disable_tqdm", "true", "--seed", "3", *extra]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Launched:
    """A `dama` command (or a launcher of it) running in the background; its merged output is read line by line."""

    def __init__(self, argv: list[str], launcher: tuple[str, ...] = ()) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.started = time.monotonic()
        command = [sys.executable, "-m", *launcher, "-m"] if launcher else [sys.executable, "-m"]
        self.process = subprocess.Popen([*command, "dama.cli", *argv], cwd=REPO, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while sum(bool(re.search(pattern, line)) for line in list(self.lines)) < count:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"never saw {count} x {pattern!r}:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.02)

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def steps_logged(self) -> int:
        return sum("'loss'" in line for line in list(self.lines))


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1]


def dama_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / DAMA_STATE_NAME, map_location="cpu", weights_only=True)


def logged_losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha1(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    """The final model byte-identical, the DAMA state of the last checkpoint equal, the same per-step losses."""
    assert (resumed / RUN_COMPLETE).is_file()
    assert (resumed / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    last = f"checkpoint-{STEPS}"
    expected, got = dama_state(uninterrupted / last), dama_state(resumed / last)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value) or (value.isnan().all() and got[name].isnan().all()), name
    assert logged_losses(resumed) == logged_losses(uninterrupted)


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run = Launched(["train", *train_argv(tiny, output_dir)])
    assert run.finish() == 0, run.text[-3000:]
    return output_dir


def test_sigterm_saves_the_step_and_exits_75_then_resume_matches_an_uninterrupted_run(tiny, uninterrupted, tmp_path):
    output_dir = tmp_path / "run"
    run = Launched(["train", *train_argv(tiny, output_dir)])
    run.wait_for(r"'loss'", count=3)
    logged = run.steps_logged()
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == EXIT_REQUEUE, run.text[-3000:]
    assert "Traceback" not in run.text
    line = last_line(run.text)
    match = re.fullmatch(r"dama train: stopped: SIGTERM received: saved (.*checkpoint-(\d+)) \(step (\d+) of 30\); "
                         r"requeue with --resume true \(exit status 75\)", line)
    assert match, line
    step = int(match.group(2))
    # Nothing done is lost: the checkpoint holds every step logged before the signal (and at most the one under way).
    assert logged <= step < STEPS and int(match.group(3)) == step
    assert newest_checkpoint(output_dir) == Path(match.group(1))
    state = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step
    assert not (output_dir / RUN_COMPLETE).exists() and not (output_dir / "model.safetensors").exists()

    # Resumed, then a second signal while the first is handled: the process ends at once, by the signal.
    resumed = Launched(["train", *train_argv(tiny, output_dir, "--resume", "true")])
    resumed.wait_for(r"'loss'", count=1)
    resumed.process.send_signal(signal.SIGTERM)
    resumed.wait_for(r"SIGTERM received: finishing this optimizer step")
    resumed.process.send_signal(signal.SIGTERM)
    assert resumed.finish() == -signal.SIGTERM, resumed.text[-3000:]
    # The newest complete checkpoint is usable: resuming from it ends exactly where the uninterrupted run ends.
    assert newest_checkpoint(output_dir) is not None
    assert train.main(train_argv(tiny, output_dir, "--resume", "true")) == 0
    assert_same_run(output_dir, uninterrupted)


def test_a_signal_to_one_torchrun_rank_stops_every_rank_at_the_same_step(tiny, uninterrupted, tmp_path):
    output_dir = tmp_path / "run"
    launcher = ("torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port")
    argv = ["train", *train_argv(tiny, output_dir, "--per_device_train_batch_size", "1")]
    run = Launched(argv, (*launcher, str(free_port())))
    run.wait_for(r"'loss'", count=3)
    workers = [child for child in psutil.Process(run.process.pid).children(recursive=True)
               if child.environ().get("RANK") == "1"]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 learns of it through the flag's all_reduce
    code = run.finish()
    assert code != 0
    # torchrun's summary lists each worker's status: both stopped with 75.
    assert len(re.findall(r"exitcode\s+:\s+75 \(pid", run.text)) == 2, run.text[-3000:]
    # The two workers share torchrun's output, so their lines may run into each other.
    stopped = re.findall(r"dama train: stopped: (SIGTERM received|a signal reached another rank): saved "
                         r"\S*?checkpoint-(\d+) \(step (\d+) of 30\)", run.text)
    assert sorted(why for why, _, _ in stopped) == ["SIGTERM received", "a signal reached another rank"], run.text
    assert len({(name, number) for _, name, number in stopped}) == 1  # the same checkpoint and step on both ranks
    step = int(stopped[0][1])
    assert newest_checkpoint(output_dir).name == f"checkpoint-{step}"
    state = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step

    resumed = Launched(["train", *train_argv(tiny, output_dir, "--per_device_train_batch_size", "1",
                                             "--resume", "true")], (*launcher, str(free_port())))
    assert resumed.finish() == 0, resumed.text[-3000:]
    # Two ranks of one pair each reproduce one process of two pairs (tests/test_launchers.py), here across a resume.
    expected, got = logged_losses(uninterrupted), logged_losses(output_dir)
    assert sorted(got) == sorted(expected)
    for number, loss in expected.items():
        assert got[number] == pytest.approx(loss, rel=1e-5, abs=1e-6), number


def test_of_two_simultaneous_launches_one_runs_and_the_other_is_refused_in_one_line(tiny, uninterrupted, tmp_path):
    output_dir = tmp_path / "run"
    runs = [Launched(["train", *train_argv(tiny, output_dir)]) for _ in range(2)]
    locked_at = None
    while all(run.process.poll() is None for run in runs) and time.monotonic() - runs[0].started < 300:
        if locked_at is None and lock_path(output_dir).is_file() and lock_path(output_dir).stat().st_size:
            locked_at = time.monotonic()
        time.sleep(0.05)
    if locked_at is None and lock_path(output_dir).is_file():
        locked_at = time.monotonic()
    ended = [run for run in runs if run.process.poll() is not None]
    assert len(ended) == 1, "\n\n".join(run.text[-2000:] for run in runs)
    loser, = ended
    winner, = [run for run in runs if run is not loser]
    refused_at = time.monotonic()
    assert loser.finish() == 1, loser.text[-3000:]
    # Refused while the winner still runs, at once: the launch does not wait for the lock. (From launch it also
    # takes the imports, ~3 s on an idle machine, more on a loaded one.)
    assert locked_at is not None and refused_at - locked_at < 30
    assert "Traceback" not in loser.text
    assert re.fullmatch(rf"dama train: error: {re.escape(str(output_dir))} is being written by `dama train` on host "
                        rf"{re.escape(socket.gethostname())}, pid {winner.process.pid}, started \S+ \(lock "
                        r".*run\.lock\): wait for that run to end, stop it, or write to another output",
                        last_line(loser.text)), last_line(loser.text)
    assert winner.finish() == 0, winner.text[-3000:]
    assert (output_dir / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert not lock_path(output_dir).exists()  # removed by its holder at the end


def dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


def test_a_stale_lock_is_taken_over_with_a_warning_and_another_hosts_is_not(tiny, tmp_path, capsys):
    output_dir = tmp_path / "run"
    stale = {"command": "train", "host": socket.gethostname(), "pid": dead_pid(), "started": "2026-01-01T00:00:00"}
    lock_path(output_dir).write_text(json.dumps(stale))
    assert train.main(train_argv(tiny, output_dir, "--max_steps", "1")) == 0
    err = capsys.readouterr().err
    assert f"dama train: warning: taking over the stale lock {lock_path(output_dir)} of `dama train` on host " \
           f"{socket.gethostname()}, pid {stale['pid']}, started 2026-01-01T00:00:00 (no longer running)" in err
    assert not lock_path(output_dir).exists()

    elsewhere = {**stale, "host": "another-node"}
    lock_path(output_dir).write_text(json.dumps(elsewhere))
    assert train.main(train_argv(tiny, output_dir, "--max_steps", "1", "--resume", "true")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"dama train: error: .*run is locked by `dama train` on host another-node, pid \d+, started "
                     r"2026-01-01T00:00:00 \(lock .*run.lock\), which cannot be checked from this host: if that run "
                     r"has ended, delete .*run.lock and launch again$", err.strip()), err
    assert lock_path(output_dir).read_text() == json.dumps(elsewhere)  # left as it was


@pytest.mark.parametrize("command", ["train", "hardness", "precompute-ref", "generate"])
def test_a_held_output_is_refused_at_once_by_every_command(command, tiny, tmp_path, capsys):
    output = tmp_path / ("run" if command == "train" else "out.parquet")
    main = {"train": train.main, "hardness": hardness.main, "precompute-ref": reference.main}.get(command)
    argv = train_argv(tiny, output) if command == "train" else [
        "--input", str(tiny[1]), "--output", str(output), "--model" if command != "hardness" else "--clip",
        str(tiny[0])]
    if main is None:
        from dama.evaluation import generate

        main, argv = generate.main, ["--input", str(tmp_path / "prompts.jsonl"), "--output", str(output),
                                     "--model", str(tiny[0])]
    with OutputLock(output, "hardness"):
        started = time.monotonic()
        assert main(argv) == 1
        assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"dama {command}: error: {output} is being written by `dama hardness` on host "
                           f"{socket.gethostname()}, pid {os.getpid()}, started "), line
    assert not output.exists()


def test_a_lock_cannot_be_taken_twice_and_is_free_again_after_release(tmp_path):
    first = OutputLock(tmp_path / "out.json", "hardness").acquire()
    with pytest.raises(OutputLockedError, match=rf"out.json is being written by `dama hardness` on host .*, pid "
                       rf"{os.getpid()}, started "):
        OutputLock(tmp_path / "out.json", "generate").acquire()
    first.release()
    with OutputLock(tmp_path / "out.json", "generate") as second:
        assert json.loads(second.path.read_text())["command"] == "generate"


Usage = namedtuple("Usage", "total used free")


def test_a_checkpoint_that_cannot_fit_is_refused_before_it_is_written(tiny, tmp_path, capsys, monkeypatch):
    output_dir = tmp_path / "run"
    real_usage = __import__("shutil").disk_usage

    def full_after_the_first_checkpoint(path):
        usage = real_usage(path)
        return Usage(usage.total, usage.used, 1000 if (output_dir / "checkpoint-2").is_dir() else usage.free)

    monkeypatch.setattr("dama.disk_space.shutil.disk_usage", full_after_the_first_checkpoint)
    assert train.main(train_argv(tiny, output_dir, "--max_steps", "6", "--save_steps", "2")) == EXIT_WRITE_FAILED
    kept = output_dir / "checkpoint-2"
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"dama train: error: not enough disk space for checkpoint-4: it needs about "
                    f"{format_bytes(tree_bytes(kept))}, 1000 B free on {_mount(output_dir)}; the last complete "
                    f"checkpoint, {kept}, is intact. Free space, then rerun with the same command (dama train: "
                    "--resume true)")
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (output_dir / "checkpoint-4").exists()


def _mount(path: Path) -> str:
    current = path.resolve()
    while not os.path.ismount(current):
        current = current.parent
    return str(current)


def test_enospc_while_saving_is_one_line_keeps_the_last_checkpoint_and_resume_works(tiny, uninterrupted, tmp_path,
                                                                                    capsys, monkeypatch):
    output_dir = tmp_path / "run"
    real_save = torch.save
    before = {}

    def disk_full_in_checkpoint_20(obj, f, *args, **kwargs):
        if "checkpoint-20" in str(f):
            before.setdefault("checkpoint-10", digest(output_dir / "checkpoint-10"))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_in_checkpoint_20)
    assert train.main(train_argv(tiny, output_dir)) == EXIT_WRITE_FAILED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.fullmatch(r"dama train: error: writing checkpoint-20 failed \(No space left on device\): it needs about "
                        rf"\S+ \S+, \S+ \S+ free on \S+; the last complete checkpoint, {re.escape(str(output_dir))}"
                        r"/checkpoint-10, is intact. Free space, then rerun with the same command \(dama train: "
                        r"--resume true\)", err.strip().splitlines()[-1]), err[-2000:]
    assert digest(output_dir / "checkpoint-10") == before["checkpoint-10"]
    assert not (output_dir / "checkpoint-20").exists()

    monkeypatch.setattr(torch, "save", real_save)
    assert train.main(train_argv(tiny, output_dir, "--resume", "true")) == 0
    assert_same_run(output_dir, uninterrupted)


def test_torch_serializer_and_safetensors_words_count_as_write_errors():
    assert is_write_error(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_write_error(OSError(errno.EIO, "Input/output error"))
    assert is_write_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 455232 vs 455124"))
    assert is_write_error(RuntimeError("I/O error: No space left on device (os error 28)"))
    assert not is_write_error(OSError(errno.ENOENT, "No such file or directory"))
    assert not is_write_error(RuntimeError("CUDA out of memory"))


def test_a_pass_checks_space_for_its_output_and_reports_a_failed_write(tmp_path, monkeypatch):
    source = tmp_path / "in.parquet"
    source.write_bytes(b"x" * 5000)
    output = tmp_path / "out.parquet"
    monkeypatch.setattr("dama.disk_space.shutil.disk_usage", lambda path: Usage(10**6, 10**6 - 100, 100))
    with pytest.raises(WriteFailed, match=r"not enough disk space for .*out.parquet: it needs about 4.9 KiB, 100 B "
                       r"free on .*; the rows finished so far are kept in .*out.parquet.partial.jsonl"):
        with OutputGuard("hardness", output, needed=lambda: tree_bytes(source)):
            raise AssertionError("the pass must not start")
    assert not lock_path(output).exists()
    monkeypatch.undo()
    with pytest.raises(WriteFailed, match=r"writing .*out.parquet failed \(No space left on device\): it needs about "
                       r"4.9 KiB"):
        with OutputGuard("hardness", output, needed=lambda: tree_bytes(source)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_dama_plan_prints_the_checkpoint_size_and_it_matches_a_real_checkpoint(tiny, uninterrupted):
    text = plan_command.run_plan(["--gpu-memory", "24GiB", *train_argv(tiny, uninterrupted)])
    match = re.search(r"checkpoint per save: about (\S+ \S+) on disk \(model (\S+) (\S+), optimizer state (\S+) (\S+), "
                      r"16.0 MiB for the small files\); save_total_limit unset", text)
    assert match, text
    units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    model = float(match.group(2)) * units[match.group(3)]
    optimizer = float(match.group(4)) * units[match.group(5)]
    checkpoint = uninterrupted / f"checkpoint-{STEPS}"
    assert model == pytest.approx((checkpoint / "model.safetensors").stat().st_size, rel=0.05)
    assert optimizer == pytest.approx((checkpoint / "optimizer.pt").stat().st_size, rel=0.05)


def test_save_on_signal_takes_signal_names_or_none_and_refuses_the_uncatchable():
    base = ["--output_dir", "unused", "--use_cpu", "true", "--report_to", "none"]
    assert signals_from_option(parse_training_arguments(base).save_on_signal) == (signal.SIGTERM, signal.SIGUSR1)
    assert signals_from_option("term, usr2") == (signal.SIGTERM, signal.SIGUSR2)
    assert signals_from_option("none") == ()
    with pytest.raises(ValueError, match=r"save_on_signal: SIGKILL is not a signal a process can catch; give names "
                       r"such as SIGTERM,SIGUSR1, or none"):
        parse_training_arguments([*base, "--save_on_signal", "SIGKILL"])
    with pytest.raises(ValueError, match=r"save_on_signal: SIGNOPE is not a signal"):
        signals_from_option("SIGTERM,NOPE")
