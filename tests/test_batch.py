"""`latentdub batch`: manifests (CSV / JSON Lines) checked up front, failures recorded, resumable
runs (sidecars, skip without dubbing work), Ctrl-C / kill -9 mid-row then a rerun that completes.

Real media, cut to under a second, and the random tiny model; 1-2 diffusion steps.
Expectations come from the files themselves (hashlib, PyAV), never from the code under test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import pytest
import soundfile as sf
import torch

from cli_helpers import TEST_CONSENT, TEST_CONSENT_JSON, invoke
from latentdub.batch import BatchRunner, ManifestError, parse_devices, read_manifest, write_summary
from latentdub.errors import InputError
from latentdub.media.reader import iter_frames, probe_video
from latentdub.media.writer import VideoWriter
from latentdub.options import DubOptions
from latentdub.pipeline import LipSyncPipeline

REPO = Path(__file__).resolve().parents[1]
FRAMES = 15  # 0.6 s at 25 fps
AUDIO_S = 0.6


def _clip(src: Path, dst: Path, frames: int = FRAMES) -> Path:
    """The first ``frames`` frames of a real clip, re-encoded with their own timestamps."""
    info = probe_video(src)
    with VideoWriter(dst, width=info.width, height=info.height, time_base=info.time_base, fps=info.fps) as w:
        for frame in iter_frames(src, stop=frames):
            w.write(frame.image, pts=frame.pts - info.start_pts)
    return dst


@pytest.fixture(scope="module")
def media(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two short real clips, a speech snippet, a broken "video" and a consent file."""
    folder = tmp_path_factory.mktemp("batch-media")
    data, rate = sf.read(str(media_dir / "audio_latentsync_demo1_16k.wav"), dtype="float32", always_2d=True)
    sf.write(str(folder / "speech.wav"), data[: int(AUDIO_S * rate)], rate)
    (folder / "broken.mp4").write_text("this is a text file, not a video\n")
    (folder / "consent.json").write_text(TEST_CONSENT_JSON)
    return {
        "v1": _clip(media_dir / "infinitetalk_hdtf_man_25fps.mp4", folder / "man.mp4"),
        "v2": _clip(media_dir / "liveportrait_d20_man_25fps.mp4", folder / "other.mp4"),
        "audio": folder / "speech.wav",
        "broken": folder / "broken.mp4",
        "consent": folder / "consent.json",
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _leftovers(folder: Path) -> list[str]:
    """Temporary files a dub or a sidecar write could leave behind."""
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or p.name.endswith(".tmp")]


def _duration(path: Path) -> float:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return float(s.duration * s.time_base)


def _json_tail(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The manifest (no model needed)
# ----------------------------------------------------------------------------------------------
def test_csv_and_jsonl_manifests_parse_to_the_same_rows(media: dict[str, Path], tmp_path: Path) -> None:
    for name in ("man.mp4", "speech.wav", "consent.json"):
        (tmp_path / name).symlink_to(media[{"man.mp4": "v1", "speech.wav": "audio", "consent.json": "consent"}[name]])
    other_consent = {**TEST_CONSENT, "subject": "someone else"}
    # Hand-written CSV: a BOM, ';' as the delimiter (a locale's spreadsheet export), a blank line,
    # an inline JSON consent with doubled quotes, an empty option cell, and a "length-policy" header.
    inline = json.dumps(other_consent).replace('"', '""')
    (tmp_path / "m.csv").write_text(
        "\ufeffvideo;audio;output;steps;length-policy;deepcache;consent\n"
        "man.mp4;speech.wav;a/one.mp4;1;;false;\n"
        "\n"
        f'man.mp4;{media["audio"]};two.mkv;;cut;;"{inline}"\n',
        encoding="utf-8",
    )
    (tmp_path / "m.jsonl").write_text(
        "# a comment line\n"
        + json.dumps({"video": "man.mp4", "audio": "speech.wav", "output": "a/one.mp4",
                      "options": {"steps": 1, "deepcache": False}}) + "\n\n"
        + json.dumps({"video": "man.mp4", "audio": str(media["audio"]), "output": "two.mkv",
                      "length_policy": "cut", "steps": None, "consent": other_consent}) + "\n"
    )
    base = DubOptions(steps=2, seed=7)
    outdir = tmp_path / "out"
    parsed = {
        kind: read_manifest(tmp_path / f"m.{kind}", outdir=outdir, default_consent=media["consent"],
                            base_options=base)
        for kind in ("csv", "jsonl")
    }
    for kind, rows in parsed.items():
        assert len(rows) == 2, kind
        one, two = rows
        assert one.video == tmp_path / "man.mp4" and one.audio == tmp_path / "speech.wav"
        assert one.output == outdir / "a" / "one.mp4" and two.output == outdir / "two.mkv"
        assert two.audio == media["audio"]
        assert (one.options.steps, one.options.deepcache, one.options.seed) == (1, False, 7)
        assert (two.options.steps, two.options.length_policy, two.options.deepcache) == (2, "cut", True)
        assert one.overrides == {"steps": 1, "deepcache": False}
        assert one.consent.subject == TEST_CONSENT["subject"]  # the default consent
        assert two.consent.subject == "someone else"  # the row's own
    csv_lines = [r.line for r in parsed["csv"]]
    jsonl_lines = [r.line for r in parsed["jsonl"]]
    assert csv_lines == [2, 4] and jsonl_lines == [2, 4]  # physical lines: blank/comment lines counted
    assert [r.options for r in parsed["csv"]] == [r.options for r in parsed["jsonl"]]


def test_every_bad_row_is_listed_with_its_line_and_nothing_runs(
    media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    v, a = str(media["v1"]), str(media["audio"])
    manifest = _write_csv(tmp_path / "m.csv", ["video", "audio", "output", "steps", "consent"], [
        [v, a, "ok.mp4", "", ""],                          # line 2: fine (default consent)
        [str(tmp_path / "missing.mp4"), a, "b.mp4", "", ""],  # line 3: no such video
        [v, a, "c.mp4", "0", ""],                          # line 4: steps out of range
        [v, a, "ok.mp4", "", ""],                          # line 5: same output as line 2
        [v, a, "e.mp4", "", '{"subject": "nobody"}'],      # line 6: incomplete consent
        [v, "", "f.txt", "", ""],                          # line 7: no audio, bad extension
    ])
    empty = tmp_path / "no-weights"
    empty.mkdir()
    code, out, err = invoke(["batch", str(manifest), "--weights", str(empty), "--version", "1.5",
                             "--consent", str(media["consent"]), "--json"], monkeypatch, capsys)
    assert code == 2, err
    assert "Traceback" not in err and "weights" not in err.lower()  # the manifest fails before any model
    for line, words in {3: "missing.mp4", 4: "steps", 5: "line 2", 6: "consent", 7: "audio"}.items():
        assert any(f"line {line}:" in x and words in x for x in err.splitlines()), (line, err)
    assert "line 2:" not in err.replace("of line 2", "")
    report = _json_tail(out)
    assert sorted({e["line"] for e in report["errors"]}) == [3, 4, 5, 6, 7]
    assert not list(tmp_path.glob("*.mp4")) and not (tmp_path / "batch-summary.json").exists()

    # A row without consent when there is no --consent is a bad row too; so is an unknown column.
    (tmp_path / "h.csv").write_text(f"video,audio,output,stepz\n{v},{a},x.mp4,1\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "h.csv")
    assert [p.line for p in info.value.problems] == [1] and "stepz" in str(info.value)
    (tmp_path / "n.jsonl").write_text(json.dumps({"video": v, "audio": a, "output": "x.mp4"}) + "\n{oops\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "n.jsonl")
    assert {(p.line, "consent" in p.message) for p in info.value.problems} == {(1, True), (2, False)}


def test_device_list_errors_are_clear(
    media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert parse_devices("cpu") == ["cpu"]
    for text, words in {"cpu,cpu": "twice", "cpu,": "empty", "tpu:0": "tpu", "cuda:99": "cuda:99"}.items():
        with pytest.raises(InputError, match=words):
            parse_devices(text)
    manifest = _write_csv(tmp_path / "m.csv", ["video", "audio", "output"], [[str(media["v1"]), str(media["audio"]), "o.mp4"]])
    wanted = "cuda:99" if torch.cuda.is_available() else "cuda:0"
    code, _, err = invoke(["batch", str(manifest), "--devices", wanted, "--consent", TEST_CONSENT_JSON],
                          monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert f"--devices: {wanted}" in err
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in err


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def test_a_broken_row_is_recorded_the_rest_done_and_a_rerun_does_no_work(
    tiny_weights: Path, media: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    v1, v2, a = str(media["v1"]), str(media["v2"]), str(media["audio"])
    manifest = _write_csv(tmp_path / "season.csv", ["video", "audio", "output", "steps"], [
        [v1, a, "ep1.mp4", ""],
        [str(media["broken"]), a, "ep2.mp4", ""],
        [v2, a, "ep3.mp4", "1"],   # a per-row override
        [v1, a, "fr/ep4.mp4", ""],  # a folder that does not exist yet
    ])
    outdir = tmp_path / "dubs"
    args = ["batch", str(manifest), "--outdir", str(outdir), "--weights", str(tiny_weights), "--version", "1.5",
            "--steps", "2", "--consent", str(media["consent"]), "--devices", "cpu", "--json"]
    code, out, err = invoke(args, monkeypatch, capsys)
    assert code == 3, err
    outputs = {n: outdir / n for n in ("ep1.mp4", "ep3.mp4", "fr/ep4.mp4")}
    assert all(p.is_file() for p in outputs.values()) and not (outdir / "ep2.mp4").exists()
    assert not _leftovers(outdir) and not _leftovers(outdir / "fr")

    report = _json_tail(out)
    assert [r["status"] for r in report["rows"]] == ["done", "failed", "done", "done"]
    assert [r["line"] for r in report["rows"]] == [2, 3, 4, 5]
    assert report["counts"]["failed"] == 1 and report["exit_code"] == 3
    assert "broken.mp4" in report["rows"][1]["error"]
    assert "line 3 ep2.mp4" in err  # the failure is shown as it happens
    for row, path in zip((report["rows"][i] for i in (0, 2, 3)), outputs.values(), strict=True):
        assert abs(row["duration_s"] - _duration(path)) <= 0.05  # the summary tells the truth about the file

    # The sidecars: input hashes, the options actually used, the output's size and hash.
    sides = {n: json.loads(Path(str(p) + ".latentdub.json").read_text()) for n, p in outputs.items()}
    for name, side in sides.items():
        assert side["video"]["sha256"] == _sha(Path(side["video"]["path"]))
        assert side["audio"]["sha256"] == _sha(media["audio"])
        assert side["output"]["sha256"] == _sha(outputs[name]) and side["output"]["size"] == outputs[name].stat().st_size
        assert side["model"]["random_weights"] is True
    assert sides["ep3.mp4"]["options"]["steps"] == 1
    assert sides["ep1.mp4"]["options"]["steps"] == sides["fr/ep4.mp4"]["options"]["steps"] == 2

    # The summary files beside the outputs (--outdir): CSV and JSON, every row.
    with (outdir / "batch-summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["line"], r["status"]) for r in table] == [("2", "done"), ("3", "failed"), ("4", "done"), ("5", "done")]
    assert json.loads((outdir / "batch-summary.json").read_text())["counts"] == report["counts"]

    # Rerun: no dubbing work at all for the three done rows.
    mtimes = {n: p.stat().st_mtime_ns for n, p in outputs.items()}
    calls: list[str] = []

    def no_dub(self: Any, inputs: Any, *a: Any, **kw: Any) -> Any:
        calls.append(str(inputs.video))
        raise AssertionError("a rerun must not dub a finished row")

    with monkeypatch.context() as m:
        m.setattr(LipSyncPipeline, "dub", no_dub)
        code, out, err = invoke(args, monkeypatch, capsys)
    assert code == 3 and not calls
    assert [r["status"] for r in _json_tail(out)["rows"]] == ["skipped", "failed", "skipped", "skipped"]
    assert {n: p.stat().st_mtime_ns for n, p in outputs.items()} == mtimes

    # A changed option redoes that row only; so does an output edited after the fact.
    rows = list(csv.reader(manifest.open()))
    rows[3][3] = "2"  # ep3: steps 1 → 2
    _write_csv(manifest, rows[0], rows[1:])
    with outputs["ep1.mp4"].open("ab") as f:
        f.write(b"\0")
    code, out, err = invoke(args, monkeypatch, capsys)
    result = _json_tail(out)["rows"]
    assert code == 3
    assert [r["status"] for r in result] == ["done", "failed", "done", "skipped"]
    assert "output" in result[0]["note"] and "steps" in result[2]["note"]
    assert outputs["fr/ep4.mp4"].stat().st_mtime_ns == mtimes["fr/ep4.mp4"]
    assert json.loads(Path(str(outputs["ep3.mp4"]) + ".latentdub.json").read_text())["options"]["steps"] == 2


def test_two_workers_share_the_rows_in_manifest_order(tiny_weights: Path, media: dict[str, Path], tmp_path: Path) -> None:
    """Library level: two pipelines (both on the CPU here; one per GPU in real use)."""
    rows = read_manifest(
        _write_csv(tmp_path / "m.csv", ["video", "audio", "output"],
                   [[str(media["v1" if k % 2 else "v2"]), str(media["audio"]), f"o{k}.mp4"] for k in range(3)]),
        default_consent=TEST_CONSENT, base_options=DubOptions(steps=1),
    )
    pipes = [LipSyncPipeline.from_pretrained(tiny_weights, version="1.5") for _ in range(2)]
    order: list[tuple[str, int]] = []
    runner = BatchRunner(rows, pipes, on_row=lambda row, res: order.append((res.device + str(len(order)), row.line)))
    runner.devices = ["w0", "w1"]  # tell the two CPU workers apart
    report = runner.run()
    assert report.exit_code == 0 and [r.status for r in report.rows] == ["done"] * 3
    by_worker: dict[str, list[int]] = {}
    for r in report.rows:
        by_worker.setdefault(r.device, []).append(r.line)
    assert set(by_worker) == {"w0", "w1"}  # both took rows
    finished = [line for _, line in order]
    for lines in by_worker.values():  # each worker ran its rows in manifest order
        assert [x for x in finished if x in lines] == sorted(lines)
    assert all((tmp_path / f"o{k}.mp4").is_file() for k in range(3))

    csv_path, json_path = write_summary(report, tmp_path / "reports" / "run1.json")
    assert (csv_path.name, json_path.name) == ("run1.csv", "run1.json")
    with csv_path.open() as f:
        assert [(r["line"], r["status"], r["device"]) for r in csv.DictReader(f)] == [
            (str(r.line), "done", r.device) for r in report.rows]
    assert json.loads(json_path.read_text())["counts"]["done"] == 3


def test_check_only_validates(
    media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"video": str(media["v1"]), "audio": str(media["audio"]),
                                            "output": f"o{k}.mp4", "consent": TEST_CONSENT}) + "\n" for k in range(2)))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    code, out, err = invoke(["batch", str(manifest), "--check", "--json", "--weights", str(empty)], monkeypatch, capsys)
    assert code == 0, err
    assert _json_tail(out) == {"status": "valid_manifest", "manifest": str(manifest), "rows": 2,
                               "outputs": [str(tmp_path / "o0.mp4"), str(tmp_path / "o1.mp4")]}
    assert not list(tmp_path.glob("*.mp4"))


def _spawn_batch(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "latentdub", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(condition: Any, proc: subprocess.Popen[str], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the batch ended (rc {proc.returncode}) before the moment to interrupt it:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the batch to reach the second row")
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_interrupted_mid_row_then_a_rerun_completes(
    how: str, tiny_weights: Path, media: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    v1, v2, a = str(media["v1"]), str(media["v2"]), str(media["audio"])
    rows = [[v1, a, "out/a.mp4"], [v2, a, "out/b.mp4"], [v1, a, "out/c.mp4"]]
    if how == "SIGKILL":
        rows = rows[:2]  # nothing more to learn from a third row: keep the test short
    manifest = _write_csv(tmp_path / "m.csv", ["video", "audio", "output"], rows)
    out = tmp_path / "out"
    args = ["batch", str(manifest), "--weights", str(tiny_weights), "--version", "1.5", "--steps", "1",
            "--consent", str(media["consent"]), "--devices", "cpu", "--json"]
    proc = _spawn_batch(args, tmp_path)
    # Wait until row 2 is really being written (its partial output exists), then interrupt.
    _wait_for(lambda: out.is_dir() and any(p.name.startswith(".b.mp4.partial-") for p in out.iterdir()), proc)
    proc.send_signal(signal.SIGINT if how == "SIGINT" else signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=60)
    assert (out / "a.mp4").is_file() and not (out / "b.mp4").exists() and not (out / "c.mp4").exists()
    if how == "SIGINT":
        assert proc.returncode == 130, stderr
        assert not _leftovers(out)  # the cancelled dub removed its partial file
        report = json.loads(stdout.strip().splitlines()[-1])
        assert [r["status"] for r in report["rows"]] == ["done", "cancelled", "cancelled"]
        saved = json.loads((tmp_path / "batch-summary.json").read_text())
        assert [r["status"] for r in saved["rows"]] == ["done", "cancelled", "cancelled"]
    else:
        assert proc.returncode == -signal.SIGKILL

    first = (out / "a.mp4").stat().st_mtime_ns
    code, stdout, err = invoke(args, monkeypatch, capsys)  # the rerun (in-process: no second torch import)
    assert code == 0, err
    assert [r["status"] for r in _json_tail(stdout)["rows"]] == ["skipped"] + ["done"] * (len(rows) - 1)
    assert (out / "a.mp4").stat().st_mtime_ns == first
    assert all((out / Path(r[2]).name).is_file() for r in rows)
    assert not _leftovers(out)  # a killed run's partial file is cleaned up by the rerun


def test_check_opens_the_media_of_every_row(
    media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row whose "video" is random bytes, or whose audio has no sound, is not "all valid"."""
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(os.urandom(64 * 1024))
    rows = [[str(media["v1"]), str(media["audio"]), "ok.mp4"],
            [str(noise), str(media["audio"]), "noise-dub.mp4"],
            [str(media["v1"]), str(media["v2"]), "silent.mp4"]]  # v2 is a clip cut without its sound
    manifest = _write_csv(tmp_path / "m.csv", ["video", "audio", "output"], rows)
    args = ["batch", str(manifest), "--check", "--consent", TEST_CONSENT_JSON]
    code, out, err = invoke([*args, "--json"], monkeypatch, capsys)
    assert code == 2, err
    assert "all valid" not in out + err and "Traceback" not in err
    report = _json_tail(out)
    assert report["status"] == "invalid_manifest"
    assert {(e["line"], e["message"].split(":")[0]) for e in report["errors"]} == {(3, "video"), (4, "audio")}
    assert any(f"line 3: video: {noise}" in line for line in err.splitlines()), err

    # Without --check the same rows are run, and the bad ones fail one by one (nothing probed up front).
    assert len(read_manifest(manifest, default_consent=TEST_CONSENT)) == 3


def test_a_batch_in_a_log_prints_plain_progress_lines(
    media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """stderr is not a terminal (capsys) and no --json: lines for the batch and each row's stages."""
    import latentdub.batch as batch_lib
    import latentdub.pipeline as pipeline_mod
    from latentdub.progress import ProgressEvent

    class Pipe:
        def __init__(self) -> None:
            self.device = torch.device("cpu")
            self.model_info = {"name": "fake", "random_weights": True}
            self.provenance = type("Provenance", (), {"signing": None})()

        def dub(self, inputs: Any, options: Any, *, progress: Any, **kw: Any) -> Any:
            for done in range(6):
                progress(ProgressEvent("dub", done, 5, 0.1 * done, None, None))
                time.sleep(0.1)
            raise InputError("the fake pipeline stops here")

    monkeypatch.setattr(batch_lib, "load_pipelines", lambda *a, **k: [Pipe()])
    monkeypatch.setattr(pipeline_mod, "read_inputs", lambda *a: type("Inputs", (), {})())
    monkeypatch.setenv("LATENTDUB_PROGRESS_INTERVAL", "0")
    manifest = _write_csv(tmp_path / "m.csv", ["video", "audio", "output"],
                          [[str(media["v1"]), str(media["audio"]), f"o{k}.mp4"] for k in range(2)])
    code, _, err = invoke(["batch", str(manifest), "--consent", TEST_CONSENT_JSON, "--devices", "cpu"],
                          monkeypatch, capsys)
    assert code == 3, err
    lines = err.splitlines()
    assert "batch: started (2)" in lines and any(x.startswith("batch: finished 2/2") for x in lines), err
    for line in (2, 3):
        stage = f"cpu line {line} o{line - 2}.mp4: dubbing"
        assert f"{stage}: started (5)" in lines, err
        assert any(x.startswith(f"{stage}: finished") for x in lines), err
    assert any(re.fullmatch(r"cpu line \d o\d\.mp4: dubbing: \d/5 \(\d+ %\) · ETA \d+:\d\d:\d\d", x) for x in lines), err
