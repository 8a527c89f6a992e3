"""The one exception type for bad user input, raised at every layer and turned into a one-line
message with a non-zero exit code by the CLI."""


class BadInput(ValueError):
    """Input that a user can fix: a missing file, a wrong shape, NaNs, a corrupt file."""
