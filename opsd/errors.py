"""The error type for bad user input, shared by every component.

Bad input (a config key, a data row, a template, a missing model file) is the user's to fix: the CLI prints the
message alone, without a traceback. Everything else is a bug and keeps its traceback. ``OPSD_DEBUG=1`` shows the
traceback for input errors too.
"""


class UserInputError(ValueError):
    """Input the user must fix; the message says where (file, line/row, field or config key)."""


# What the CLI reports as one line. Missing and existing paths are input errors too.
USER_ERRORS: tuple[type[BaseException], ...] = (UserInputError, FileNotFoundError, FileExistsError)
