"""`latentdub faces`: JSON report, preview video, and clean errors (exit 2, no traceback)."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from latentdub.cli import main
from latentdub.cli._app import app
from latentdub.media.reader import iter_frames, probe_video

CLIP = "liveportrait_d0_greenscreen_25fps_noaudio.mp4"


def test_faces_json_report(media_dir: Path) -> None:
    result = CliRunner().invoke(
        app, ["faces", str(media_dir / CLIP), "--json", "--max-frames", "30"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["frames"] == 30
    assert report["fps"] == pytest.approx(25.0)
    assert report["frames_with_face"] == 30
    (track,) = report["tracks"]
    assert {"id", "first_frame", "last_frame", "frames", "coverage"} <= set(track)
    assert (track["first_frame"], track["last_frame"], track["frames"]) == (0, 29, 30)
    assert track["coverage"] == pytest.approx(1.0)
    assert report["selected_track"] == track["id"]
    assert report["passthrough_ranges"] == []
    # Crops at the size `dub` cuts by default (version 1.6: 512 px), and 1.5's when asked.
    assert report["resolution"] == 512
    result = CliRunner().invoke(app, ["faces", str(media_dir / CLIP), "--json", "--max-frames", "10",
                                      "--version", "1.5"])
    assert json.loads(result.stdout.strip().splitlines()[-1])["resolution"] == 256


def test_faces_point_policy_and_table_output(media_dir: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["faces", str(media_dir / CLIP), "--max-frames", "10", "--resolution", "512"]
    )
    assert result.exit_code == 0, result.output
    assert "tracks" in result.stdout and "selected" in result.stdout
    # a point away from the face: clear error naming the faces that are there
    result = runner.invoke(
        app, ["faces", str(media_dir / CLIP), "--json", "--max-frames", "10", "--face", "2,2@0"]
    )
    assert result.exit_code != 0
    assert "no face at that point" in str(result.exception)


def test_faces_preview_video(media_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview.mp4"
    result = CliRunner().invoke(
        app, ["faces", str(media_dir / CLIP), "--json", "--max-frames", "12", "--preview", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["preview"] == str(out)
    info = probe_video(out)
    assert (info.width, info.height, info.codec) == (512, 512, "h264")
    frames = [f.image for f in iter_frames(out)]
    assert len(frames) == 12
    original = next(iter_frames(media_dir / CLIP)).image
    changed = np.any(np.abs(frames[0].astype(int) - original) > 40, axis=-1)
    assert changed.mean() > 0.01  # boxes, anchors and the tinted mouth region are drawn
    assert [p.name for p in tmp_path.iterdir()] == ["preview.mp4"]  # no temp file left behind


def _run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["latentdub", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    return int(exit_info.value.code or 0), err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d, m: d / "missing.mp4", "no such file"),
        (
            lambda d, m: _write(d / "notes.mp4", b"not a video at all\n" * 10),
            "cannot be read as a video",
        ),
        (lambda d, m: m / "audio_latentsync_demo1_16k.wav", "no video stream"),
        (lambda d, m: m / "image_skimage_astronaut.png", "only 1 decodable frame"),
        (lambda d, m: _huge_png(d / "huge.png"), "too large"),
        (lambda d, m: _one_frame_mp4(d / "one.mp4"), "only 1 decodable frame"),
    ],
)
def test_bad_input_exits_2_without_traceback(
    make, message: str, media_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    path = make(tmp_path, media_dir)
    code, err = _run_main(monkeypatch, capsys, "faces", str(path), "--json")
    assert code == 2
    assert "error:" in err and message in " ".join(err.split())
    assert "Traceback" not in err


def test_bad_options_exit_2(media_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code, err = _run_main(monkeypatch, capsys, "faces", str(media_dir / CLIP), "--face", "biggest")
    assert code == 2 and "not one of" in err and "Traceback" not in err
    code, err = _run_main(
        monkeypatch, capsys, "faces", str(media_dir / CLIP), "--resolution", "300"
    )
    assert code == 2 and "256 or 512" in err


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _one_frame_mp4(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 128, np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def _huge_png(path: Path) -> Path:
    import cv2

    cv2.imwrite(str(path), np.zeros((4, 9000, 3), np.uint8))
    return path


# -- who speaks when -------------------------------------------------------------------------------
LEFT_CLIP = "retalking_face2_man_25fps.mp4"  # a pair the default decision gets right on the bench
RIGHT_CLIP = "retalking_face5_woman_glasses_25fps.mp4"
SWITCH_S = 2.5  # the right clip's own audio plays first, the left clip's after this


@pytest.fixture(scope="module")
def speaking_composite(media_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from composite_media import side_by_side

    out = tmp_path_factory.mktemp("speakers") / "two.mp4"
    return side_by_side(media_dir / LEFT_CLIP, media_dir / RIGHT_CLIP, out, seconds=5.0,
                        switch_s=SWITCH_S, first="right")  # fmt: skip


@pytest.fixture(scope="module")
def speaking_report(speaking_composite, tmp_path_factory: pytest.TempPathFactory):
    preview = tmp_path_factory.mktemp("preview") / "preview.mp4"
    result = CliRunner().invoke(
        app, ["faces", str(speaking_composite.path), "--json", "--preview", str(preview)]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1]), preview


def _side(track: dict, left_width: int) -> str:
    x0, _, x1, _ = track["mean_box"]
    return "left" if (x0 + x1) / 2 < left_width else "right"


def test_faces_json_lists_who_speaks_when_on_a_real_two_face_composite(
    speaking_composite, speaking_report
) -> None:
    report, _ = speaking_report
    sp = report["speakers"]
    n, fps = report["frames"], report["fps"]
    assert sp["method"] in ("landmarks", "syncnet") and sp["frames"] == n == len(list(iter_frames(speaking_composite.path)))
    tracks = {t["track_id"]: t for t in sp["tracks"]}
    assert len(tracks) == 2
    side = {tid: _side(t, speaking_composite.left_width) for tid, t in tracks.items()}
    assert sorted(side.values()) == ["left", "right"]
    # Both tracks have intervals, each internally consistent (frames ↔ seconds at 25 fps).
    for t in tracks.values():
        assert t["intervals"], t
        for iv in t["intervals"]:
            assert {"start_frame", "stop_frame", "start_s", "end_s", "confidence", "method"} <= set(iv)
            assert 0 <= iv["start_frame"] < iv["stop_frame"] <= n
            assert iv["start_s"] == pytest.approx(iv["start_frame"] / fps, abs=1e-3)
            assert iv["end_s"] == pytest.approx(iv["stop_frame"] / fps, abs=1e-3)
            assert 0.0 <= iv["confidence"] <= 1.0
        assert t["speaking_frames"] == sum(iv["stop_frame"] - iv["start_frame"] for iv in t["intervals"])
    # Against the truth made by the composite: right speaks before 2.5 s, left after
    # (frames within 0.4 s of the switch are not judged: the detector's window spans it).
    said = np.full(n, "nobody", dtype=object)
    for tid, t in tracks.items():
        for iv in t["intervals"]:
            said[iv["start_frame"] : iv["stop_frame"]] = side[tid]
    times = np.arange(n) / fps
    truth = np.where(times < SWITCH_S, "right", "left")
    judged = np.abs(times - SWITCH_S) > 0.4
    assert (said[judged] == truth[judged]).mean() >= 0.9
    # The turns cover every frame once, in order; "nobody" lists the nobody-turns.
    turns = sp["turns"]
    assert turns[0]["start_frame"] == 0 and turns[-1]["stop_frame"] == n
    assert all(a["stop_frame"] == b["start_frame"] for a, b in itertools.pairwise(turns))
    silent = [(t["start_frame"], t["stop_frame"]) for t in turns if t["track_id"] is None]
    assert silent == [(s["start_frame"], s["stop_frame"]) for s in sp["nobody"]]


def test_faces_without_audio_says_so_and_marks_nobody(media_dir: Path) -> None:
    result = CliRunner().invoke(app, ["faces", str(media_dir / CLIP), "--json", "--max-frames", "20"])
    assert result.exit_code == 0, result.output
    sp = json.loads(result.stdout.strip().splitlines()[-1])["speakers"]
    assert sp["method"] == "none" and "no audio" in sp["note"]
    assert [t["intervals"] for t in sp["tracks"]] == [[]]
    assert sp["nobody"] == [{"start_frame": 0, "stop_frame": 20, "start_s": 0.0, "end_s": 0.8}]
    text = CliRunner().invoke(app, ["faces", str(media_dir / CLIP), "--max-frames", "20"])
    assert text.exit_code == 0 and "who speaks when" in text.stdout and "no audio" in text.stdout


def test_faces_table_has_a_who_speaks_when_section(speaking_composite) -> None:
    result = CliRunner().invoke(app, ["faces", str(speaking_composite.path), "--max-frames", "60"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "who speaks when" in out and "track" in out and "speaker" in out


def _edge_pixels(image: np.ndarray, box: np.ndarray, offset: int) -> np.ndarray:
    """Pixels ``offset`` px outside the left and right edges of ``box`` (its middle half in y:
    clear of the label above and the mouth tint below)."""
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    ys = np.arange(y0 + (y1 - y0) // 4, y1 - (y1 - y0) // 4)
    return np.concatenate([image[ys, x0 - offset], image[ys, x1 + offset]]).astype(int)


def _saturated(px: np.ndarray) -> np.ndarray:
    return (px.max(axis=1) - px.min(axis=1)) > 90


def test_preview_marks_the_active_speaker_in_its_track_colour(
    speaking_composite, speaking_report
) -> None:
    from latentdub.face import analyze_video

    report, preview = speaking_report
    frames = [f.image for f in iter_frames(preview)]
    assert len(frames) == report["frames"]
    analysis = analyze_video(speaking_composite.path)  # the boxes the preview was drawn around
    tracks = {t["track_id"]: t for t in report["speakers"]["tracks"]}
    assert sorted(t.id for t in analysis.tracks) == sorted(tracks)

    def near(px: np.ndarray, colour: np.ndarray) -> float:
        return float((np.abs(px - colour).max(axis=1) < 40).mean())

    def middle(iv: dict) -> int:
        return (iv["start_frame"] + iv["stop_frame"]) // 2

    colours: dict[int, list[np.ndarray]] = {}
    for tid, t in tracks.items():
        other = next(o for o in tracks if o != tid)
        longest = max(t["intervals"], key=lambda iv: iv["stop_frame"] - iv["start_frame"])
        idle = middle(max(tracks[other]["intervals"], key=lambda iv: iv["stop_frame"] - iv["start_frame"]))
        for i in (longest["start_frame"] + 5, middle(longest)):
            # 3 px outside the box: a thick box covers it, a thin one (and the picture) does not.
            active = _edge_pixels(frames[i], analysis.track(tid).at(i), 3)
            assert _saturated(active).mean() > 0.9, (tid, i)
            colour = np.median(active, axis=0)
            assert near(active, colour) > 0.9, (tid, i)  # one colour all round
            source = _edge_pixels(speaking_composite.frames[i], analysis.track(tid).at(i), 3)
            assert near(source, colour) < 0.3, (tid, i)  # drawn, not the picture's own
            # While the other face speaks, this one's edge shows no such band.
            assert near(_edge_pixels(frames[idle], analysis.track(tid).at(idle), 3), colour) < 0.3, (tid, idle)
            colours.setdefault(tid, []).append(colour)
    for tid, (a, b) in colours.items():
        assert np.abs(a - b).max() < 25, tid  # one colour per track, frame after frame
    (c0, _), (c1, _) = colours.values()
    assert np.abs(c0 - c1).max() > 80  # and the two tracks' colours differ


def test_faces_uses_speaker_timeline_when_the_face_layer_has_it(
    speaking_composite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one switch point: with ``speakers.speaker_timeline`` present, its timeline (here a
    stand-in: track of the first face speaking on frames 5–14) is what the report shows."""
    from latentdub.face import speakers

    calls = []

    def fake(analysis, audio=None):
        calls.append(audio)
        n, ids = analysis.num_frames, [t.id for t in analysis.tracks]
        track = np.full(n, -1, np.int32)
        track[5:15] = ids[0]
        iv = speakers.SpeakingInterval(ids[0], 5, 15, 0.2, 0.6, 0.75, "syncnet")
        return speakers.SpeakerTimeline(
            track, np.full(n, 0.75, np.float32), analysis.times_s, n / 25, ids,
            np.zeros((n, len(ids))), {ids[0]: [iv]}, "syncnet",
        )  # fmt: skip

    monkeypatch.setattr(speakers, "speaker_timeline", fake, raising=False)
    result = CliRunner().invoke(app, ["faces", str(speaking_composite.path), "--json", "--max-frames", "20"])
    assert result.exit_code == 0, result.output
    sp = json.loads(result.stdout.strip().splitlines()[-1])["speakers"]
    assert len(calls) == 1 and calls[0] is not None  # given the video's own audio
    assert sp["method"] == "syncnet"
    spoken = [(iv["start_frame"], iv["stop_frame"]) for t in sp["tracks"] for iv in t["intervals"]]
    assert spoken == [(5, 15)]
    assert [(s["start_frame"], s["stop_frame"]) for s in sp["nobody"]] == [(0, 5), (15, 20)]
