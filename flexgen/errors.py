"""User-facing errors.

Anything a user can cause (bad flags, a missing checkpoint, a full disk) raises
`FlexGenError`; the CLI prints its message on one line and exits non-zero. Any other
exception is a bug in flexgen and keeps its traceback.
"""


class FlexGenError(Exception):
    """A problem with the user's input or environment, explained in one line."""
