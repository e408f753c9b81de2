"""MkDocs hook: the command reference, rendered from the CLI itself at build time.

``docs/reference.md`` holds the marker ``<!-- modlabel-cli-reference -->``; this hook
replaces it with ``modlabel <command> -h`` of every command of ``modlabel.cli.app`` (and of
every command of a group, such as ``modlabel db upgrade``), in the order ``modlabel -h``
lists them. The reference therefore cannot drift from the code: a new command, option or
help text shows up in the next build. ``tests/test_docs.py`` imports ``render_reference``.
"""

from __future__ import annotations

MARKER = "<!-- modlabel-cli-reference -->"
REFERENCE_PAGE = "reference.md"
# The width the help is rendered at: that of a terminal, and what the page's code column
# shows without scrolling.
HELP_COLUMNS = 80


def command_paths() -> list[list[str]]:
    """Every command as its words after ``modlabel``: ``[["synth"], ..., ["db"],
    ["db", "upgrade"], ...]``, in the order the CLI lists them."""
    from typer.main import get_command

    from modlabel.cli import app

    paths: list[list[str]] = []
    root = get_command(app)
    for name, command in root.commands.items():
        paths.append([name])
        for sub in getattr(command, "commands", {}):
            paths.append([name, sub])
    return paths


def help_text(words: list[str]) -> str:
    """What ``modlabel WORDS -h`` prints, at HELP_COLUMNS columns, without colour."""
    from typer.testing import CliRunner

    from modlabel.cli import app

    result = CliRunner().invoke(
        app, [*words, "-h"], env={"COLUMNS": str(HELP_COLUMNS), "NO_COLOR": "1"}
    )
    if result.exit_code != 0:
        raise RuntimeError(f"modlabel {' '.join(words)} -h exited {result.exit_code}")
    lines = [line.rstrip() for line in result.output.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines).rstrip() + "\n"


def render_reference() -> str:
    """The reference's Markdown: one section per command with its ``-h`` output."""
    parts = []
    for words in command_paths():
        name = " ".join(words)
        level = "##" if len(words) == 1 else "###"
        parts.append(f"{level} modlabel {name}\n\n```text\n{help_text(words)}```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - MkDocs' API
    if page.file.src_uri != REFERENCE_PAGE:
        return markdown
    if MARKER not in markdown:
        raise RuntimeError(f"{REFERENCE_PAGE} lacks the marker {MARKER}")
    return markdown.replace(MARKER, render_reference())
