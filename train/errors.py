"""Errors a user of ``modlabel train`` can cause, with messages that say what to do."""

from __future__ import annotations

from modlabel.errors import ModlabelError


class BackboneError(ModlabelError):
    """An unknown backbone name, or an input size the backbone cannot take."""


class WeightsError(ModlabelError):
    """Backbone weights that cannot be found, downloaded or loaded."""


class DataError(ModlabelError):
    """A data directory without class folders, or with too few images to split."""


class RunError(ModlabelError):
    """A run directory that cannot be written, resumed or evaluated."""


class TrainingInterrupted(ModlabelError):
    """Training stopped by the user; the last finished epoch is saved for ``--resume``."""

    exit_code = 130
