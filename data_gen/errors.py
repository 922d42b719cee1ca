"""The one exception type for user mistakes in ``data_gen``.

``data_gen`` never imports ``coorddet``, so it has its own ``UserError``. The CLI catches
this type only, prints its message on one line and exits with code 2; anything else is a
programming error and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: the message names the bad value and the fix."""
