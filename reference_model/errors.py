"""The one base class for errors caused by the user's input (files, tensors, flags), not by a bug.

The CLI prints these as one clear message and exits with status 2; anything else is a bug and keeps its
traceback.
"""


class FusionError(ValueError):
    """Bad input: the message names the file, tensor or flag at fault."""
