"""`latentdub doctor` reports the environment and which weights are present."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from latentdub.cli import main


def test_doctor_json_reports_codecs_and_a_local_tiny_model(
    tiny_weights: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["latentdub", "doctor", "--json", "--weights", str(tiny_weights)])
    main()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["torch"].startswith("2.13.0")
    assert report["codecs"]["libx264"] and report["codecs"]["aac"]
    assert report["mediapipe"] == "0.10.21"
    text = json.dumps(report["weights"])
    assert str(tiny_weights) in text
