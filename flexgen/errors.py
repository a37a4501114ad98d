"""User-facing errors.

Anything a user can cause (bad flags, a missing checkpoint, a full disk) raises
`FlexGenError`; the CLI prints its message on one line and exits non-zero. Any other
exception is a bug in flexgen and keeps its traceback.
"""

import argparse


class FlexGenError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises FlexGenError for bad flags, so that every command (and every
    subcommand parser made from it) reports a mistake on the CLI's one error line."""

    def error(self, message):
        raise FlexGenError(f"{self.prog}: {message}")
