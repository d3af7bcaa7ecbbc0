"""The errors mimkit raises for what a user can fix. The CLI turns every `MimkitError` into a one-line message and
exit status 2; a `TrainingError` (the run itself went wrong, e.g. a diverged loss) exits with status 1."""

from __future__ import annotations


class MimkitError(ValueError):
    """Bad input a user can fix; the message names the file, key or value."""


class ConfigError(MimkitError):
    """A recipe, override or CLI value that does not fit the schema."""


class DataError(ConfigError):
    """A data folder, shard or file that cannot be used as given."""


class CheckpointError(MimkitError):
    """A checkpoint or export that is missing, unreadable, foreign or does not fit the run."""


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


class DivergedError(TrainingError):
    """A loss or gradient was not finite at `step`; nothing after the step before it was saved."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
