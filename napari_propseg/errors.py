"""Errors that reach the user as one clear sentence."""


class InputError(ValueError):
    """Bad user input (file, parameter). The message is one sentence: which file or
    value, what is wrong, what to do. The CLI prints it and exits with code 2; the
    napari layer shows it as a notification."""


class CancelledError(RuntimeError):
    """Raised inside long jobs when the caller's cancel callback returned True."""


class OutputError(InputError):
    """An output could not be written (full disk, read-only or missing folder, an output
    that is also an input). One sentence naming the file and the cause; the CLI exits with
    code 2 and nothing half-written is left behind."""
