"""The one exception type that means "the user's input is wrong".

The CLI prints its message as a single line on stderr and exits non-zero; anything
else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user (flags, files, folders). The message is shown as is."""

    exit_code = 2
    # The process must end right after the message, skipping the interpreter's teardown
    # (l1ra_lite.train.distributed.ProcessLost says why).
    end_at_once = False
