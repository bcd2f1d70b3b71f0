"""User-facing error types that must be importable without torch (the CLI catches them)."""


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, unreadable, or does not match its config."""


class InputFileError(ValueError):
    """A data file named by the user that is a directory, of the wrong type, or unreadable."""
