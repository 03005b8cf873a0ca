"""Run ``latentdub.cli.main`` in-process the way a shell would, for the CLI tests."""

from __future__ import annotations

import sys

import pytest

from latentdub.cli import main


def invoke(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``latentdub ARGS`` → (exit code, stdout, stderr); a normal return is exit code 0."""
    monkeypatch.setattr(sys, "argv", ["latentdub", *args])
    code: object = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return (code if isinstance(code, int) else (0 if code is None else 1)), captured.out, captured.err


# Every dub needs a consent record (library ``consent=``, CLI ``--consent``); tests use this one.
TEST_CONSENT: dict[str, str] = {
    "subject": "the person in the test clip",
    "granted_by": "the latentdub test suite",
    "method": "test fixture",
    "evidence": "tests/cli_helpers.py",
}
TEST_CONSENT_JSON = '{"subject": "the person in the test clip", "granted_by": "the latentdub test suite", "method": "test fixture", "evidence": "tests/cli_helpers.py"}'
