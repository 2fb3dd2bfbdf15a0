"""User-facing error types.

Every problem a user can fix (a bad YAML file, an unknown name, a missing data folder) is raised
as a :class:`FusionSearchError`. The CLI prints its message as one paragraph and exits non-zero
without a traceback; anything else is a bug in fusionsearch and is reported as such.
"""

from __future__ import annotations


class FusionSearchError(Exception):
    """A problem in the user's input or environment, with a message that says how to fix it."""


class ConfigError(FusionSearchError):
    """A problem in a configuration (YAML file, override, argument), located by file and field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.file = file
        self.field = field
        self.fix = fix
        self.reason = message
        parts = []
        if file:
            parts.append(f"{file}:")
        if field:
            parts.append(f"field '{field}':")
        parts.append(message.rstrip("."))
        text = " ".join(parts) + "."
        if fix:
            text += " " + fix.rstrip(".") + "."
        super().__init__(text)


class UnknownNameError(FusionSearchError, KeyError):
    """A name that is not in a registry (operator, weighting, model, dataset, space, recipe)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DataError(FusionSearchError):
    """A dataset on disk that is missing, empty or not in the expected form."""
