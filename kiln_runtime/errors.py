"""The one error a served model answers as the client's fault (INVALID_ARG)."""


class InputError(ValueError):
    """A client's bad input: answered as INVALID_ARG with this message."""
