"""Errors that reach the user as one line and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the problem and the fix. The CLI prints it as
    one line (no traceback) and exits with code 2; nothing has been written."""


def pydantic_one_line(exc: Exception, where: str = "config") -> str:
    """One line from a pydantic ``ValidationError``: the first error, its field, the fix."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return f"{where}: {exc}"
    errs = errors()
    if not errs:
        return f"{where}: {exc}"
    first = errs[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "<root>"
    kind = first.get("type", "")
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    if kind == "extra_forbidden":
        return f"{where}: unknown key '{loc}'{more}; 'safetylab describe STUDY' lists the valid keys"
    got = first.get("input")
    got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    return f"{where}: {loc}: {msg}{got_s}{more}"
