"""`specfleet --help` lists the commands and each command explains itself."""

import subprocess
import sys

import pytest

from specfleet.cli.main import build_parser, main

COMMANDS = [["generate"], ["demo"], ["train"], ["models"], ["models", "acceptance"], ["models", "card"]]


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("generate", "demo", "train", "models"):
        assert name in out


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_each_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    assert len(capsys.readouterr().out.splitlines()) > 3


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt", "x", "--top-p", "1.5"], "must be in (0, 1]"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "must be a number >= 0"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "must be a positive integer"),
])
def test_bad_arguments_say_what_to_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "specfleet.cli", "--help"], capture_output=True, text=True,
                         timeout=60, check=True)
    assert "usage: specfleet" in out.stdout
