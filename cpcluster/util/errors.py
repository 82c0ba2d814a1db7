"""The one exception type for bad user input.

Library code raises :class:`InputError` with a one-line message that names the thing (file, option, value) and
the fix. The CLI turns it into ``Error: <message>`` on stderr and exit code 2, with no traceback. This module does
not import click so pure modules (``cpcluster.aggregate``) can raise it without a CLI dependency.
"""


class InputError(Exception):
    """Bad input from the user: a file, an option value or a spec. Message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
