"""The ``modlabel`` command's first lines (``python -m modlabel`` and the console script).

Stop signals are taken over before anything else is imported (``stopping``):
a SIGTERM from cron or systemd in the first tenth of a second is honoured like
any later one. Then the command line runs.
"""

from modlabel import stopping


def main() -> None:
    stopping.install()
    from modlabel.cli import main as run

    run()


if __name__ == "__main__":
    main()
