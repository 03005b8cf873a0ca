"""What the service tests share: speech cut from real media, the JSON error check, a webhook receiver."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import soundfile as sf


def speech(media_dir: Path, dst: Path, seconds: float) -> Path:
    """The first ``seconds`` of a real 60 s English recording, as a WAV at ``dst``."""
    data, rate = sf.read(str(media_dir / "audio_musetalk_eng_60s_16k.wav"), dtype="float32", always_2d=True)
    sf.write(str(dst), data[: int(seconds * rate)], rate)
    return dst


def assert_error(r: Any, status: int, *words: str, field: str | None = None) -> dict[str, Any]:
    """``r`` is the service's JSON error: the status, ``{"error": {"code", "message"}}``, no traceback."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) >= {"code", "message"} and "Traceback" not in r.text
    for word in words:
        assert word in err["message"], err
    if field is not None:
        assert err.get("field") == field, err
    return err


class Receiver(BaseHTTPRequestHandler):
    """A webhook receiver that records (headers, body) of every POST and answers 200."""

    got: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).got.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass
