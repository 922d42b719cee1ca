"""The one exception type for user mistakes.

Every CLI catches :class:`UserError` only, prints its message on one line and exits
with code 2. Anything else is a programming error and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: the message names the bad value and the fix."""


def flatten(error: BaseException) -> str:
    """``error``'s message on one line (its type's name when it has none), for a UserError
    that quotes it."""
    return " ".join(str(error).split()) or type(error).__name__
