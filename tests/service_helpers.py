"""What the service tests share: speech cut from real media, the JSON error check, a webhook receiver,
a live server and the browser, and an options model with one more field than DubOptions."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import soundfile as sf
from pydantic import Field

from latentdub.options import DubOptions

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


class ExtraOptions(DubOptions):
    """DubOptions plus two fields no code of the service knows about (import: service_helpers.ExtraOptions)."""

    lip_gain: float = Field(1.0, ge=0.25, le=2.0, description="Test-only: how strongly the mouth moves.")
    mood: Literal["calm", "lively"] = Field("calm", description="Test-only: a made-up choice.")


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


def browser_or_skip() -> Any:
    """playwright's ``sync_playwright`` with Debian's chromium, or a skip that says what is missing."""
    if not CHROMIUM.exists():
        pytest.skip("the browser test needs Debian chromium at /usr/bin/chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser test needs the playwright Python package (pip install playwright)")
    return sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def live(app: Any, probe: str = "/healthz", timeout_s: float = 90.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port in a thread; yields the base URL once ``probe`` answers 200."""
    import httpx
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{base}{probe}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert thread.is_alive() and time.monotonic() < deadline, "the service did not get ready"
            time.sleep(0.2)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def option_controls(page: Any) -> dict[str, dict[str, Any]]:
    """What the page shows for each option: tag, type, name, min/max, value, checked, title."""
    return page.eval_on_selector_all(
        "#options [name]",
        """els => Object.fromEntries(els.map(e => [e.name, {tag: e.tagName.toLowerCase(), type: e.type,
             min: e.min, max: e.max, value: e.value, checked: e.checked, title: e.closest('label').title,
             choices: e.tagName === 'SELECT' ? [...e.options].map(o => o.value) : null}]))""",
    )


def check_controls(controls: dict[str, dict[str, Any]], schema: dict[str, Any]) -> None:
    """Each option of ``schema`` has the control its type calls for, with its range, default and help.

    Options that are not one value (``segments``: a list of objects) have no control: the page
    leaves them to the API and the CLI, and must not show a broken one.
    """
    scalar = {name: prop for name, prop in schema["properties"].items()
              if "enum" in prop or prop.get("type") in ("boolean", "integer", "number", "string")}
    assert list(controls) == list(scalar)
    assert "segments" in schema["properties"] and "segments" not in controls
    for name, prop in scalar.items():
        got = controls[name]
        assert got["title"] == prop["description"], name
        if "enum" in prop:
            assert got["tag"] == "select" and got["choices"] == prop["enum"] and got["value"] == prop["default"]
        elif prop["type"] == "boolean":
            assert got["type"] == "checkbox" and got["checked"] is prop["default"], name
        elif prop["type"] in ("integer", "number"):
            assert got["type"] == "number" and float(got["value"]) == prop["default"], name
            # as JS numbers (doubles): the seed's 2**63-1 rounds
            assert float(got["min"]) == float(prop["minimum"]) and float(got["max"]) == float(prop["maximum"]), name
        else:
            assert got["type"] == "text" and got["value"] == prop["default"], name
