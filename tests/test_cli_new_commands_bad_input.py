"""`verify`, `serve`, `worker`, `keys revoke` and `audit verify` on bad input: a clear message,
exit 2, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import invoke


def cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    text = tmp / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    return {
        "verify: missing file": (["verify", str(tmp / "nope.mp4")], "no such file"),
        "verify: a folder": (["verify", str(tmp)], "is a folder"),
        "verify: text named .mp4": (["verify", str(text)], "not a media file"),
        "verify: bad --max-frames": (["verify", str(text), "--max-frames", "0"], "max-frames"),
        "worker: no broker": (["worker", "--data-dir", str(tmp / "svc")], "needs a broker"),
        "serve: weights not a folder": (["serve", "--weights", str(tmp / "nowhere")], "is not a folder"),
        "serve: bad version": (["serve", "--version", "2.0"], "--version must be 1.5 or 1.6"),
        "keys revoke: unknown key": (["keys", "revoke", "nosuch", "--data-dir", str(tmp / "svc")], "nosuch"),
        "audit verify: missing log": (["audit", "verify", "--log", str(tmp / "nope.jsonl")], "does not exist"),
    }


@pytest.mark.parametrize("case", [
    "verify: missing file", "verify: a folder", "verify: text named .mp4", "verify: bad --max-frames",
    "worker: no broker", "serve: weights not a folder", "serve: bad version", "keys revoke: unknown key",
    "audit verify: missing log",
])
def test_bad_input_is_a_clear_error(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("LATENTDUB_BROKER_URL", raising=False)
    args, hint = cases(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = invoke(args, monkeypatch, capsys)
    assert code == 2, (code, out, err)
    assert hint in err and "Traceback" not in out + err and "internal error" not in err
    after = sorted(p.name for p in tmp_path.iterdir() if p.name != "svc")
    assert after == before  # nothing written beside the inputs
