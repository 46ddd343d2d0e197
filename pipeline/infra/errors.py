"""The one exception type for mistakes a user can fix: the CLI prints it without a traceback."""


class UserError(Exception):
    """A bad input or state the user can correct; the message says what was wrong and what to do."""

    exit_code = 2


class IncompleteError(UserError):
    """A cache or run that exists but is not finished (resumable, not corrupt)."""

    exit_code = 3


class CorruptError(UserError):
    """Stored data that fails its checksums or cannot be read back."""

    exit_code = 4
