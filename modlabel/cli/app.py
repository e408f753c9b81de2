"""The Typer application every command module registers its commands on."""

from __future__ import annotations

from typing import Annotated, Any

import typer
import typer.core
from typer.core import TyperArgument, TyperOption

try:  # typer vendors its own click (typer._click) since 0.20; older ones use click's
    from typer._click import Command, Context
except ImportError:  # pragma: no cover - an older typer
    from click import Command, Context

from .options import placeholder

HELP_OPTION_NAMES = ["-h", "--help"]


class _ArgumentHelp(TyperArgument):
    """A positional argument whose help shows what to type (``PATH...``) beside its name
    (``PATHS``), not Typer's Python type (``<list[Path]>``)."""

    value_placeholder: str | None = None

    def display_type_rich(self, ctx: Any) -> str | None:
        if self.value_placeholder is None:
            return super().display_type_rich(ctx)
        return self.value_placeholder + ("..." if self.nargs != 1 else "")


class ModlabelGroup(typer.core.TyperGroup):
    """The ``modlabel`` group: once Typer has built every command (sub-groups such as
    ``db`` included), makes their help exact and readable, the same way for all of them,
    so that no command module has to remember it:

    * help texts are taken literally: ``pip install 'modlabel[ray]'`` keeps its brackets,
      which Rich markup would swallow as a style tag;
    * every value has a placeholder saying what to type (``PATH``, ``URL``, ``N``,
      ``SIZE``: ``options.placeholder``) and a flag has none, not ``<bool>``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        readable_help(self)


def readable_help(command: Command) -> None:
    """``ModlabelGroup``'s pass over ``command`` and every command under it, once each
    (escaping twice would show the escapes)."""
    if getattr(command, "_readable_help", False):
        return
    command._readable_help = True  # type: ignore[attr-defined]
    if not command.short_help and command.help:
        # The list of commands shows the first paragraph; Rich would keep its line breaks.
        first = command.help.split("\f")[0].split("\n\n")[0]
        command.short_help = " ".join(first.split())
    literal = typer.core.HAS_RICH and getattr(command, "rich_markup_mode", None) == "rich"
    if literal:
        from rich.markup import escape

        for attr in ("help", "short_help", "epilog"):
            text = getattr(command, attr, None)
            if text:
                setattr(command, attr, escape(text))
    # The help option is made when first asked for; make it now, to give it no placeholder.
    help_option = command.get_help_option(Context(command, help_option_names=HELP_OPTION_NAMES))
    params = [*command.params, *([help_option] if help_option is not None else [])]
    for param in params:
        if literal and getattr(param, "help", None):
            param.help = escape(param.help)
        if isinstance(param, TyperOption) and param.metavar is None:
            param.metavar = placeholder(param)
        elif isinstance(param, TyperArgument) and param.metavar is None:
            value = placeholder(param)
            if value is not None:
                # Same class but one display method: the swap adds no state to the object.
                param.__class__ = _ArgumentHelp
                param.value_placeholder = value
                param.metavar = (param.name or "value").upper()
    for sub in getattr(command, "commands", {}).values():
        readable_help(sub)


app = typer.Typer(
    name="modlabel",
    cls=ModlabelGroup,
    context_settings={"help_option_names": HELP_OPTION_NAMES},
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
