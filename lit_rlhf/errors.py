"""The one exception type for mistakes a user can fix (bad data, wrong path, wrong flag)."""


class UserError(ValueError):
    """Raised with a one-line message saying where and what; the CLI prints it without a traceback."""
