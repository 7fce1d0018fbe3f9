"""Errors a user can cause. The CLI prints them as one line and exits non-zero, never with a traceback."""


class ReamLiteError(Exception):
    """A problem with the user's input or environment, explained in one line."""
