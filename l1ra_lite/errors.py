"""The one exception type that means "the user's input is wrong".

The CLI prints its message as a single line on stderr and exits non-zero; anything
else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user (flags, files, folders). The message is shown as is."""

    exit_code = 2
