"""``python -m modlabel``: the same as the ``modlabel`` command."""

from modlabel.cli import main

main()
