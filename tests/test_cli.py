"""The `kaleido-s2v` entry points: installed console script, `python -m`, dispatcher behaviour."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kaleido_s2v.cli import COMMANDS, main

BIN = Path(sys.executable).parent / "kaleido-s2v"


def test_installed_console_script_help_is_fast():
    assert BIN.exists(), "install the package (pip install -e .) to get the kaleido-s2v script"
    # Fast = --help imports no heavy module. Asked of Python's import log, not of a stopwatch (a wall-clock bound
    # depends on the machine and its load).
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([str(BIN), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        assert name in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "kaleido_s2v.cli" in imported  # the log is there
    heavy = imported & {"torch", "diffusers", "transformers", "ray"}
    assert not heavy, f"kaleido-s2v --help imported {sorted(heavy)}"


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["convert", "--help"], ["train", "--help"],
                                  ["curate", "--help"], ["evaluate", "--help"]])
def test_help_does_not_import_heavy_modules(argv):
    code = (
        "import contextlib, io, sys\n"
        "from kaleido_s2v.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        f"    main({argv!r})\n"
        "assert 'usage' in out.getvalue()\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'ray') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_python_dash_m_runs_info_json():
    proc = subprocess.run(
        [sys.executable, "-m", "kaleido_s2v", "info", "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["kaleido_s2v"] and "shift_hw" in info["ref_rope_variants"]


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["teleport"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2  # a usage error like any other: scripts must not take it for success
    assert "commands:" in capsys.readouterr().err


def test_every_registered_command_module_has_the_interface():
    from importlib import import_module

    for name, (module_name, _) in COMMANDS.items():
        try:
            module = import_module(module_name)
        except ModuleNotFoundError:
            pytest.fail(f"subcommand {name!r} is registered but {module_name} does not exist")
        assert callable(module.add_arguments) and callable(module.run)


def test_user_input_error_becomes_one_line_and_exit_2(monkeypatch, capsys):
    import types

    from kaleido_s2v.errors import UserInputError

    def run(args):
        raise UserInputError("reference image 'x.png' does not exist: check the path")

    fake = types.SimpleNamespace(add_arguments=lambda p: None, run=run)
    monkeypatch.setitem(COMMANDS, "fake", ("fake_module", "a fake command"))
    monkeypatch.setitem(sys.modules, "fake_module", fake)
    assert main(["fake"]) == 2
    err = capsys.readouterr().err
    assert err == "kaleido-s2v fake: error: reference image 'x.png' does not exist: check the path\n"
