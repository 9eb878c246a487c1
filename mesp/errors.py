"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class MespError(Exception):
    """Bad input or an unsupported case. The message names the file, line or field at fault."""
