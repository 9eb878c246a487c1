"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class MespError(Exception):
    """Bad input or an unsupported case. The message names the file, line or field at fault."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """A foreign exception's message for inclusion in a MespError: whitespace collapsed to single spaces, cut to
    `limit` characters (parsers can put whole documents in their messages), its type name when it has none."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
