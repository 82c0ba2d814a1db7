"""The two exception types the command line turns into one ``Error:`` line.

Library code raises :class:`InputError` with a one-line message that names the thing (file, option, value) and
the fix: the CLI prints ``Error: <message>`` on stderr with exit code 2, no traceback. :class:`RunError` is work
that started and then stopped or failed (a job failed, SIGTERM, Ctrl-C): ``Error: <message>``, exit code 1. This
module does not import click, so pure modules (``cpcluster.aggregate``) can raise them without a CLI dependency.
"""


class InputError(Exception):
    """Bad input from the user: a file, an option value or a spec. Message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class RunError(Exception):
    """Work that was started stopped or failed (not bad input); what it recorded is kept. Message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
