"""The Typer application every command module registers its commands on."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="modlabel",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"modlabel {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Label the modality of medical images with a CNN and explain every label with a
    Class-selective Relevance Map (CRM)."""
