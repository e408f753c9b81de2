"""The docs cannot drift from the code: every command has help with an example, and
README.md documents every command and every named query."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from modlabel.cli import app
from modlabel.queries import list_queries

README = Path(__file__).resolve().parent.parent / "README.md"
COMMANDS = sorted(get_command(app).commands)
# Commands of a group (``modlabel db upgrade``), as "group sub".
SUBCOMMANDS = sorted(
    f"{name} {sub}"
    for name, group in get_command(app).commands.items()
    for sub in getattr(group, "commands", {})
)


def test_the_cli_has_the_documented_commands():
    assert {"synth", "train", "evaluate", "export", "scan", "report", "query", "explain"} <= set(
        COMMANDS
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(app, [command, flag])
        assert result.exit_code == 0, result.output
        assert "Example:" in result.output and f"modlabel {command}" in result.output


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_command_of_a_group_has_help_with_an_example(command):
    result = CliRunner().invoke(app, [*command.split(), "-h"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output and f"modlabel {command}" in result.output


@pytest.mark.parametrize("command", COMMANDS + SUBCOMMANDS)
def test_readme_documents_every_command(command):
    assert f"modlabel {command}" in README.read_text()


def test_readme_starts_with_the_two_setup_commands():
    head = README.read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head


@pytest.mark.parametrize("query", [q.name for q in list_queries()])
def test_readme_lists_every_named_query(query):
    assert query in README.read_text()


def test_the_exit_codes_are_documented_in_readme_and_scan_help():
    from modlabel.errors import ExitCode

    readme = README.read_text()
    help_text = " ".join(CliRunner().invoke(app, ["scan", "-h"]).output.split())
    for code in ExitCode:
        assert f"\n| {int(code)} |" in readme, code
        if code not in (ExitCode.OK, ExitCode.INTERNAL):
            assert f"{int(code)} " in help_text, code
