"""The command line: help for every subcommand, clear errors for unknown options and missing inputs."""

import subprocess
import sys

import pytest

from mmcorpus.pipelines import cli


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mmcorpus.pipelines.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_available_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    available = list(cli.SUBCOMMANDS)
    assert available, "no subcommand modules found"
    for name in available:
        assert name in result.stdout


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_each_subcommand_explains_itself(name):
    result = run_cli(name, "--help")
    assert result.returncode == 0
    assert f"usage: mmcorpus {name}" in result.stdout
    assert len(result.stdout.splitlines()) > 5


def test_unknown_option_is_a_clear_error():
    result = run_cli("--no-such-option")
    assert result.returncode == 2 and "unrecognized option '--no-such-option'" in result.stderr
    result = run_cli("--log-level", "INFO")
    assert result.returncode == 2 and "required: COMMAND" in result.stderr
    result = run_cli("train", "--config", "c.yaml", "--output", "o", "--no-such-option")
    assert result.returncode == 2 and "unrecognized arguments: --no-such-option" in result.stderr
    result = run_cli("frobnicate")
    assert result.returncode == 2 and "invalid choice: 'frobnicate'" in result.stderr


def test_log_level_before_or_after_the_command():
    args = cli.build_parser().parse_args(["card", "out", "--log-level", "DEBUG"])
    assert args.log_level == "DEBUG"
    args = cli.build_parser().parse_args(["--log-level", "ERROR", "card", "out"])
    assert args.log_level == "ERROR"
    assert cli.build_parser().parse_args(["card", "out"]).log_level in cli.LOG_LEVELS


def test_missing_input_and_bad_beam_option_are_one_line_errors(tmp_path):
    result = run_cli("interleaved", str(tmp_path / "no-such.warc.gz"), "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no-such.warc.gz" in result.stderr
    page = tmp_path / "pages"
    page.mkdir()
    (page / "a.html").write_text("<html><body><p>hello</p></body></html>")
    result = run_cli("interleaved", str(page), "--output", str(tmp_path / "o2"), "--no-images",
                     "--beam-option", "novalue")
    assert result.returncode == 2 and "--beam-option 'novalue': expected KEY=VALUE" in result.stderr
    assert result.stderr.count("\n") == 1


def test_option_after_log_level_value_is_still_named():
    result = run_cli("--log-level", "INFO", "--no-such-option", "card", "out")
    assert result.returncode == 2 and "unrecognized option '--no-such-option'" in result.stderr
