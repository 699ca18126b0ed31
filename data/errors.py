"""The one exception class for problems the user can fix.

A bad recipe, a missing or malformed file, a wrong argument: `vtc` prints a `UserError` as one
line and exits with status 2. Every other exception is a bug in vtc (or in a library under it)
and keeps its full traceback, so that it can be reported and found.
"""


class UserError(ValueError):
    """A problem with the user's input, stated so that it names what to change."""
