"""Errors that refimpl reports to the user as one line, without a traceback."""


class RefimplError(Exception):
    """A user-facing error: bad input, a missing file, an invalid option.

    The command-line entry point prints ``refimpl: error: <message>`` and exits
    with status 1. The message names the file or value, the problem, and what
    to do about it.
    """


class FormatError(RefimplError):
    """A file that does not follow its format (safetensors, GGUF, CoNLL)."""

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
