"""The CLI reports the project's own checks (DamaError) as one line; every other exception keeps its traceback."""

import subprocess
import sys

import pytest

from dama.command import run_command
from dama.errors import DamaError
from dama.method.config import DamaMethodConfig


def test_a_project_check_is_one_line_and_exit_status_1(capsys):
    def bad_input():
        raise DamaError("--input nowhere.parquet does not exist")

    assert run_command("hardness", bad_input) == 1
    assert capsys.readouterr().err == "dama hardness: error: --input nowhere.parquet does not exist\n"


@pytest.mark.parametrize("error", [ValueError("a library's own ValueError"), OSError(28, "No space left on device"),
                                   KeyError("row_id")])
def test_anything_else_propagates(error):
    def failing():
        raise error

    with pytest.raises(type(error)) as raised:
        run_command("hardness", failing)
    assert raised.value is error


def test_the_projects_checks_raise_its_class_which_is_a_value_error():
    with pytest.raises(DamaError, match="beta must be a finite number > 0"):
        DamaMethodConfig(beta=-1.0)
    assert issubclass(DamaError, ValueError)


def test_a_library_value_error_prints_its_traceback_from_the_command_line(tmp_path):
    """Through a real process: a ValueError planted in a command's work leaves it as a traceback (exit status 1 from
    the interpreter), not as the command's one-line error."""
    script = tmp_path / "planted.py"
    script.write_text(
        "import sys\n"
        "import dama.offline.hardness as hardness\n"
        "def planted(options, scorer=None):\n"
        "    raise ValueError('planted bug')\n"
        "hardness.compute_hardness = planted\n"
        "sys.exit(hardness.main(['--input', 'a.parquet', '--output', 'b.parquet', '--clip', 'clip']))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "ValueError: planted bug" in done.stderr
    assert "dama hardness: error:" not in done.stderr
