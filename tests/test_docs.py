"""The docs cannot drift from the code (in the manner of sqlite-utils' test_docs.py).

Every command has help with an example; the command reference (docs/reference.md, filled
at build time from the CLI by docs/hooks/cli_reference.py) shows every command and every
option; operations.md explains every exit code; database.md every column of the schema;
the named queries are documented; and the site builds with ``mkdocs build --strict``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from modlabel.cli import app
from modlabel.errors import ExitCode
from modlabel.queries import list_queries
from modlabel.store.schema import metadata

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CLI = get_command(app)
COMMANDS = sorted(CLI.commands)
# Commands of a group (``modlabel db upgrade``), as "group sub".
SUBCOMMANDS = sorted(
    f"{name} {sub}"
    for name, group in CLI.commands.items()
    for sub in getattr(group, "commands", {})
)


def _load_hook():
    spec = importlib.util.spec_from_file_location(
        "cli_reference", DOCS / "hooks" / "cli_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference() -> str:
    """The command reference as the site shows it: the page with the hook's rendering."""
    page = (DOCS / "reference.md").read_text()
    hook = _load_hook()
    assert hook.MARKER in page
    return page.replace(hook.MARKER, hook.render_reference())


def _command(words: str) -> click.Command:
    command = CLI
    for word in words.split():
        command = command.commands[word]
    return command


def _options(words: str) -> list[str]:
    """Every option name of a command (``--db``, ``-q``, ``--no-resume``), help excluded."""
    names = []
    for param in _command(words).params:
        if isinstance(param, click.Option) and "--help" not in param.opts:
            names += [*param.opts, *param.secondary_opts]
    return names


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
def test_every_command_has_a_docstring_with_an_example(command):
    help_text = _command(command).help or ""
    assert help_text.strip(), f"modlabel {command} has no docstring"
    assert "Example:" in help_text and f"modlabel {command}" in help_text


@pytest.mark.parametrize("command", COMMANDS + SUBCOMMANDS)
def test_the_reference_has_a_section_for_every_command(command, reference):
    heading = "###" if " " in command else "##"
    assert f"\n{heading} modlabel {command}\n" in f"\n{reference}"


@pytest.mark.parametrize("command", COMMANDS + SUBCOMMANDS)
def test_every_option_is_in_the_reference_or_the_guide(command, reference):
    guide = (DOCS / "guide.md").read_text()
    section = reference.split(f"## modlabel {command}\n", 1)[1].split("\n#", 1)[0]
    for name in _options(command):
        assert name in section or name in guide, f"modlabel {command} {name}"


def test_the_reference_renders_each_commands_own_help(reference):
    """The page holds what ``-h`` prints, not a copy that could go stale."""
    scan_help = _load_hook().help_text(["scan"])
    assert scan_help in reference
    assert "Example: modlabel scan" in scan_help


@pytest.mark.parametrize("code", list(ExitCode), ids=lambda code: code.name)
def test_every_exit_code_is_explained_in_operations(code):
    operations = (DOCS / "operations.md").read_text()
    assert f"\n| {int(code)} | `{code.name}` |" in operations, code


def test_the_exit_codes_are_in_scan_help():
    help_text = " ".join(CliRunner().invoke(app, ["scan", "-h"]).output.split())
    for code in ExitCode:
        if code not in (ExitCode.OK, ExitCode.INTERNAL):
            assert f"{int(code)} " in help_text, code


@pytest.mark.parametrize(
    "column",
    [f"{table.name}.{column.name}" for table in metadata.sorted_tables for column in table.c],
)
def test_every_column_of_the_schema_is_in_database_md(column):
    table, name = column.split(".")
    database = (DOCS / "database.md").read_text()
    section = database.split(f"\n### {table}\n", 1)
    assert len(section) == 2, f"database.md has no section ### {table}"
    assert f"`{name}`" in section[1].split("\n### ", 1)[0], column


@pytest.mark.parametrize("query", [q.name for q in list_queries()])
def test_every_named_query_is_in_database_md(query):
    assert f"| `{query}` |" in (DOCS / "database.md").read_text()


def test_readme_starts_with_the_two_setup_commands():
    head = README.read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head
    assert head.index("make demo") < head.index("make test")


def test_readme_is_short_and_links_every_page():
    readme = README.read_text()
    assert len(readme.splitlines()) <= 150
    for page in sorted(DOCS.glob("*.md")):
        assert f"(docs/{page.name})" in readme, page.name


def test_the_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: a broken link or anchor, or a failing hook, fails."""
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    page = (site / "reference" / "index.html").read_text()
    assert "modlabel scan" in page and "--max-missing" in page
    assert (site / "guide" / "index.html").is_file()
    assert not (site / "hooks").exists()  # the hook is build code, not a page


def test_make_test_builds_the_docs():
    makefile = (ROOT / "Makefile").read_text()
    test_recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "$(MAKE) --no-print-directory docs" in test_recipe
    assert "mkdocs build --strict" in makefile.split("\ndocs:", 1)[1].split("\n\n", 1)[0]
