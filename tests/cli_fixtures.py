"""Calling the ``safetylab`` entry point in-process, as a user's shell would."""

from __future__ import annotations

import sys

import pytest

from safetylab.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``safetylab ARGS`` (``main`` always exits)."""
    old = sys.argv
    sys.argv = ["safetylab", *args]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return exc.value.code, out, err
