"""Explicit segments (who is dubbed when, with which speech): parsing, files, checks against the
video, resolution against pass 1, the option, and ``dub --segments`` failing before the model."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import soundfile as sf

from cli_helpers import TEST_CONSENT_JSON, invoke
from latentdub import segments as seg_mod
from latentdub.errors import InputError
from latentdub.face import FaceAnalysis
from latentdub.face.analysis import _summarise_tracks
from latentdub.media.reader import VideoInfo
from latentdub.options import DubOptions, OptionError, read_option_files
from latentdub.segments import (
    ResolvedSegment,
    Segment,
    check_segments,
    load_segments,
    needs_analysis,
    parse_segments,
    resolve_segments,
)

FPS = 25
SHORT_VIDEO = "vexpress_hdtf_radio10_29.97fps_2s.mp4"  # 2.07 s, one face
SPEECH = "audio_latentsync_demo1_16k.wav"  # 9.6 s


def _wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return path


# -- a synthetic pass 1: two faces, left all along, right from 0.8 s ------------------------------
LEFT, RIGHT = [40.0, 80.0, 160.0, 230.0], [400.0, 70.0, 530.0, 240.0]


def _analysis(n: int = 100) -> FaceAnalysis:
    info = VideoInfo(
        path=Path("synthetic.mp4"), width=640, height=360, coded_width=640, coded_height=360, rotation=0,
        fps=FPS, time_base=Fraction(1, 12800), num_frames=n, duration_s=n / FPS, is_vfr=False, codec="h264",
        has_audio=False, audio_sample_rate=None, start_pts=0,
    )  # fmt: skip
    rows = [(f, 0, LEFT) for f in range(n)] + [(f, 1, RIGHT) for f in range(20, n)]
    rows.sort()

    def anchors(b: list[float]) -> np.ndarray:
        x0, y0, x1, y1 = b
        return np.array([[x0 + 0.27 * (x1 - x0), y0 + 0.3 * (y1 - y0)], [x0 + 0.73 * (x1 - x0), y0 + 0.3 * (y1 - y0)],
                         [x0 + 0.5 * (x1 - x0), y0 + 0.52 * (y1 - y0)]])

    a = FaceAnalysis(
        path=info.path, info=info, backend="synthetic", every_n=1, max_gap=6,
        pts=np.arange(n, dtype=np.int64) * 512, times_s=np.arange(n) / FPS, time_base=info.time_base,
        end_pts=n * 512, sampled=np.ones(n, bool), scene_cuts=np.zeros(0, np.int64),
        obs_frame=np.array([r[0] for r in rows], np.int32), obs_track=np.array([r[1] for r in rows], np.int32),
        obs_bbox=np.array([r[2] for r in rows], np.float64),
        obs_anchors=np.array([anchors(r[2]) for r in rows], np.float64),
        obs_score=np.full(len(rows), 0.9, np.float32), obs_yaw=np.zeros(len(rows), np.float32),
    )  # fmt: skip
    a.tracks = _summarise_tracks(a)
    return a


# -- the Segment model --------------------------------------------------------------------------
def test_a_segment_has_defaults_and_a_normalised_face() -> None:
    seg = Segment(start=1, end=2.5)
    assert (seg.face, seg.audio, seg.offset) == ("auto", None, 0.0)
    assert Segment(start=0, end=1, face=" Track:03 ").face == "track:3"
    assert Segment(start=0, end=1, face="320,200@1.5").face == "320,200@1.5"
    assert Segment(start=1, end=2.5, face="track:7").label(1) == "segment 2 (1.00–2.50 s, track:7)"
    with pytest.raises(Exception, match="frozen"):
        seg.start = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ({"start": 2, "end": 1}, ["segment 1 (2.00–1.00 s, auto)", "end must be after start"]),
        ({"start": 1, "end": 1}, ["end must be after start"]),
        ({"start": -1, "end": 1}, ["start must be at least 0"]),
        ({"end": 1}, ["segment 1 (?–1.00 s, auto)", "start is required"]),
        ({"start": 0, "end": "soon"}, ["end must be a number"]),
        ({"start": 0, "end": float("inf")}, ["end must be a finite number"]),
        ({"start": 0, "end": 1, "face": "largest"}, ["largest names no one face", "track:N"]),
        ({"start": 0, "end": 1, "face": "the tall one"}, ["segment 1 (0.00–1.00 s, the tall one)", "not one of"]),
        ({"start": 0, "end": 1, "offset": -2}, ["offset must be at least 0"]),
        ({"start": 0, "end": 1, "speaker": "A"}, ["speaker is not a segment field", "start, end, face, audio, offset"]),
        ({"start": 0, "end": 1, "audio": ""}, ["audio must not be empty"]),
    ],
)
def test_a_bad_segment_is_named_with_what_is_wrong(item: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(InputError) as err:
        parse_segments([item])
    for word in words:
        assert word in str(err.value)


def test_segments_come_as_a_list_an_object_or_json_text_never_a_path(tmp_path: Path) -> None:
    want = (Segment(start=0, end=1), Segment(start=1, end=2, face="track:1", audio="a.wav", offset=0.5))
    items = [{"start": 0, "end": 1}, {"start": 1, "end": 2, "face": "track:1", "audio": "a.wav", "offset": 0.5}]
    assert parse_segments(items) == want
    assert parse_segments({"segments": items}) == want
    assert parse_segments(json.dumps(items)) == want
    assert parse_segments([]) is None and parse_segments(None) is None
    # A file name given as the value is not read (the service must never open a client's path).
    (tmp_path / "segs.json").write_text(json.dumps(items))
    with pytest.raises(InputError, match="must be JSON text"):
        parse_segments(str(tmp_path / "segs.json"))
    with pytest.raises(InputError, match=r"must be valid JSON \(.*line 1, column"):
        parse_segments('[{"start": 0,')
    with pytest.raises(InputError, match="unknown key"):
        parse_segments({"segments": items, "extra": 1})
    with pytest.raises(InputError, match="must be at most 10000 segments, got 10001"):
        parse_segments([{"start": i, "end": i + 1} for i in range(10_001)])


def test_two_segments_on_one_face_at_once_are_refused_other_faces_may_overlap() -> None:
    # Different faces at the same time, and back-to-back segments of one face, are fine.
    ok = parse_segments([
        {"start": 0, "end": 2, "face": "track:0"}, {"start": 0, "end": 2, "face": "track:1"},
        {"start": 2, "end": 3, "face": "track:0"}, {"start": 0, "end": 3},
    ])
    assert ok is not None and len(ok) == 4
    with pytest.raises(InputError) as err:
        parse_segments([{"start": 0, "end": 2, "face": "track:1"}, {"start": 5, "end": 6},
                        {"start": 1.5, "end": 3, "face": "TRACK:1"}])
    assert "segment 3 (1.50–3.00 s, track:1): overlaps segment 1 (0.00–2.00 s, track:1)" in str(err.value)
    with pytest.raises(InputError, match=r"segment 2 \(0.50–1.00 s, auto\): overlaps segment 1"):
        parse_segments([{"start": 0, "end": 4}, {"start": 0.5, "end": 1}])  # inside another one
    with pytest.raises(InputError, match="overlaps segment 1"):
        parse_segments([{"start": 0, "end": 4, "face": "1,2@0"}, {"start": 3, "end": 5, "face": "1,2@0"}])


# -- files --------------------------------------------------------------------------------------
def test_a_json_file_and_a_csv_file_give_the_same_segments_audio_from_their_folder(tmp_path: Path) -> None:
    folder = tmp_path / "edit"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps({"segments": [
        {"start": 0, "end": 1.5, "face": "track:1", "audio": "voices/anna.wav", "offset": 2},
        {"start": 1.5, "end": 3, "face": "320,200@1.5"},
    ]}))
    (folder / "a.csv").write_text(
        "start,end,face,audio,offset\n0,1.5,track:1,voices/anna.wav,2\n\n1.5,3,\"320,200@1.5\",,\n"
    )
    for name in ("a.json", "a.csv"):
        got = load_segments(folder / name)
        assert got == (
            Segment(start=0, end=1.5, face="track:1", audio=str(folder / "voices" / "anna.wav"), offset=2),
            Segment(start=1.5, end=3, face="320,200@1.5"),
        ), name
    # An absolute path stays as it is; the column order of a CSV is free; ';' from spreadsheets.
    (folder / "b.csv").write_text(f"end;audio;start\n2;{tmp_path / 'x.wav'};0\n")
    assert load_segments(folder / "b.csv") == (Segment(start=0, end=2, audio=str(tmp_path / "x.wav")),)


@pytest.mark.parametrize(
    ("name", "text", "words"),
    [
        ("s.json", '[{"start": 0, "end": 1}\n {"start": 1}]', ["s.json: not valid JSON", "line 2, column 2"]),
        ("s.json", "[]", ["has no segments"]),
        ("s.json", '{"start": 0, "end": 1}', ["unknown key(s): end, start"]),
        ("s.json", '[{"start": 0, "end": 1}, 5]', ["segment 2 must be an object"]),
        ("s.csv", "start,end\n0,1\n2,1\n", ["line 3: segment 2 (2.00–1.00 s, auto): end must be after start"]),
        ("s.csv", "start,stop\n0,1\n", ["line 1: the header must name the columns"]),
        ("s.csv", "start,end,face\n0,1,320,200@1\n", ["line 2: 4 cells but the header has 3", "quote a point face"]),
        ("s.csv", "start,end\n", ["has no segments"]),
    ],
)
def test_a_bad_segments_file_names_the_file_and_the_place(
    tmp_path: Path, name: str, text: str, words: list[str]
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_segments(path)
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_a_segments_file_is_bounded_in_size_and_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_segments(tmp_path / "missing.json")
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"start": 0, "end": 1}]))
    monkeypatch.setattr(seg_mod, "MAX_BYTES", 10)
    with pytest.raises(InputError, match="at most 10"):
        load_segments(path)


# -- checks against the video -------------------------------------------------------------------
def test_times_are_checked_against_the_video_with_one_frame_of_slack() -> None:
    fps, duration = 25.0, 4.0
    check_segments([Segment(start=3, end=duration + 0.5 / fps)], duration_s=duration, fps=fps)  # within a frame
    with pytest.raises(InputError, match=r"segment 1 \(3.00–4.08 s, auto\): ends after the end of the video \(4.00 s\)"):
        check_segments([Segment(start=3, end=duration + 2 / fps)], duration_s=duration, fps=fps)
    with pytest.raises(InputError, match="starts at or after the end of the video"):
        check_segments([Segment(start=4, end=5)], duration_s=duration, fps=fps)
    with pytest.raises(InputError, match="the face's time 9 s is after the end"):
        check_segments([Segment(start=0, end=1, face="10,10@9")], duration_s=duration, fps=fps)


def test_tracks_are_checked_only_when_the_tracks_are_known() -> None:
    segs = [Segment(start=0, end=1, face="track:0"), Segment(start=2, end=3, face="track:7")]
    check_segments(segs, duration_s=5)  # no pass 1 yet: nothing to say about tracks
    with pytest.raises(InputError) as err:
        check_segments(segs, duration_s=5, track_ids=[1, 0])
    assert str(err.value) == "segment 2 (2.00–3.00 s, track:7): there is no track 7; tracks found: 0, 1"
    with pytest.raises(InputError, match="no track 0; tracks found: none"):
        check_segments(segs[:1], duration_s=5, track_ids=[])


def test_every_problem_is_listed_each_with_its_segment() -> None:
    segs = [Segment(start=0, end=9), Segment(start=1, end=2, face="track:4"), Segment(start=1, end=2)]
    with pytest.raises(InputError) as err:
        check_segments(segs, duration_s=5, fps=25, track_ids=[0])
    lines = str(err.value).splitlines()
    assert lines[0] == "3 problems with the segments:"
    assert "segment 1 (0.00–9.00 s, auto): ends after" in lines[1]
    assert "segment 2 (1.00–2.00 s, track:4): there is no track 4" in lines[2]
    assert "segment 3 (1.00–2.00 s, auto): overlaps segment 1" in lines[3]


def test_segment_audio_must_exist_be_audio_and_be_long_enough(tmp_path: Path) -> None:
    speech = _wav(tmp_path / "one_second.wav", 1.0)
    notes = tmp_path / "notes.wav"
    notes.write_text("not audio at all\n")
    check_segments([Segment(start=0, end=1, audio=str(speech))], duration_s=5, fps=25)
    check_segments([Segment(start=0, end=0.6, audio=str(speech), offset=0.4)], duration_s=5, fps=25)
    with pytest.raises(InputError) as err:
        check_segments([Segment(start=1, end=2, audio=str(speech), offset=0.5)], duration_s=5, fps=25)
    assert str(err.value) == (
        f"segment 1 (1.00–2.00 s, auto): audio {speech} is 1.00 s long; this segment needs 1.50 s of it "
        "(offset 0.50 s + 1.00 s)"
    )
    with pytest.raises(InputError, match=r"segment 1 \(0.00–1.00 s, auto\): audio: .*missing.wav: no such file"):
        check_segments([Segment(start=0, end=1, audio=str(tmp_path / "missing.wav"))], duration_s=5)
    with pytest.raises(InputError, match=r"segment 1 .*: audio: .*notes.wav is not an audio or video file"):
        check_segments([Segment(start=0, end=1, audio=str(notes))], duration_s=5)


def test_audio_length_without_a_stated_duration_decodes_only_what_is_needed(media_dir: Path) -> None:
    mp3 = media_dir / "audio_vexpress_aoc_44k.mp3"  # 4.57 s; MP3 states no exact length
    seconds, whole = seg_mod._audio_seconds(mp3, 1.0)
    assert 1.0 <= seconds < 1.2 and not whole  # stopped after ~1 s of 4.57 s
    check_segments([Segment(start=0, end=2, audio=str(mp3), offset=2.5)], duration_s=3, fps=25)
    with pytest.raises(InputError, match=r"is 4.5\d s long; this segment needs 5.50 s"):
        # the same file again: a longer need reads it further
        check_segments([Segment(start=0, end=1, audio=str(mp3)), Segment(start=1, end=3, audio=str(mp3), offset=3.5)],
                       duration_s=3, fps=25)


# -- resolution against pass 1 ------------------------------------------------------------------
def test_points_resolve_to_the_track_under_them_and_frames_are_given(tmp_path: Path) -> None:
    a = _analysis()  # 4 s at 25 fps: track 0 (left) all along, track 1 (right) from frame 20
    voice = _wav(tmp_path / "a.wav", 1.25)
    got = resolve_segments([
        Segment(start=0, end=1, face="track:0", audio=str(voice), offset=0.25),
        Segment(start=1, end=2, face="465,150@1.0"),
        Segment(start=0.5, end=3),
    ], a)
    assert got == [
        ResolvedSegment(0, 0.0, 1.0, 0, 25, 0, voice, 0.25, "track:0"),
        ResolvedSegment(1, 1.0, 2.0, 25, 50, 1, None, 0.0, "465,150@1.0"),
        ResolvedSegment(2, 0.5, 3.0, 13, 75, None, None, 0.0, "auto"),
    ]


def test_resolution_names_the_segment_for_misses_absent_faces_and_clashes() -> None:
    a = _analysis()
    with pytest.raises(InputError, match=r"segment 1 \(0.00–1.00 s, 300,300@1\): face policy .*no face at that point"):
        resolve_segments([Segment(start=0, end=1, face="300,300@1")], a)
    with pytest.raises(InputError, match=r"segment 1 \(0.00–0.50 s, track:1\): track:1 is not on screen between 0.00 and 0.50 s"):
        resolve_segments([Segment(start=0, end=0.5, face="track:1")], a)
    with pytest.raises(InputError, match="there is no track 5; tracks found: 0, 1"):
        resolve_segments([Segment(start=0, end=0.5, face="track:5")], a)
    # A point on the left face and track:0 at the same time: one face, two segments.
    with pytest.raises(InputError, match=r"segment 2 \(1.00–2.00 s, 100,150@0\): overlaps segment 1"):
        resolve_segments([Segment(start=0, end=1.5, face="track:0"), Segment(start=1, end=2, face="100,150@0")], a)


def test_needs_analysis_only_for_tracks_and_points() -> None:
    assert not needs_analysis(None) and not needs_analysis([Segment(start=0, end=1)])
    assert needs_analysis([Segment(start=0, end=1), Segment(start=1, end=2, face="track:0")])
    assert needs_analysis([Segment(start=1, end=2, face="5,5@0")])


# -- the option ---------------------------------------------------------------------------------
def test_the_option_takes_segments_round_trips_and_names_itself_in_errors(tmp_path: Path) -> None:
    opts = DubOptions(segments=[{"start": 0, "end": 1, "face": "track:0"}, Segment(start=1, end=2)])
    assert opts.segments == (Segment(start=0, end=1, face="track:0"), Segment(start=1, end=2))
    data = json.loads(json.dumps(opts.to_dict()))  # as stored by the service
    assert data["segments"][0] == {"start": 0.0, "end": 1.0, "face": "track:0", "audio": None, "offset": 0.0}
    assert DubOptions.from_dict(data) == opts and opts.replace(steps=3).segments == opts.segments
    assert DubOptions().segments is None and DubOptions(segments="[]").segments is None
    with pytest.raises(OptionError) as err:
        DubOptions(segments='[{"start": 0, "end": 1, "face": "track:x"}]')
    assert err.value.field == "segments" and "segment 1 (0.00–1.00 s, track:x)" in str(err.value)
    # A file option: read from a path only where a path is meant (CLI flag, manifest column).
    (tmp_path / "s.json").write_text('[{"start": 0, "end": 1, "audio": "v.wav"}]')
    read = read_option_files(DubOptions, {"segments": "s.json", "steps": 3}, base_dir=tmp_path)
    assert read["steps"] == 3 and read["segments"] == (Segment(start=0, end=1, audio=str(tmp_path / "v.wav")),)
    with pytest.raises(OptionError, match=r"segments file .*nope\.json: no such file"):
        read_option_files(DubOptions, {"segments": "nope.json"}, base_dir=tmp_path)


# -- dub --segments: every check before the model loads -----------------------------------------
@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The model load replaced by a recorder that stops the dub: what reached it, if anything."""
    import latentdub.pipeline as pipeline_mod

    calls: list[Any] = []

    def load(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        raise InputError("test: the model would load here")

    monkeypatch.setattr(pipeline_mod.LipSyncPipeline, "from_pretrained", staticmethod(load))
    return calls


@pytest.fixture(scope="module")
def short_analysis(media_dir: Path) -> FaceAnalysis:
    """Pass 1 of the short real clip, made once for the CLI tests that need one."""
    from latentdub.face import analyze_video

    return analyze_video(media_dir / SHORT_VIDEO)


def _dub(tmp_path: Path, media_dir: Path, segments: Path, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture[str]) -> tuple[int, str, Path]:
    out = tmp_path / "out.mp4"
    code, _, err = invoke(["dub", str(media_dir / SHORT_VIDEO), str(media_dir / SPEECH), "-o", str(out),
                           "--segments", str(segments), "--weights", str(tmp_path), "--consent", TEST_CONSENT_JSON],
                          monkeypatch, capsys)
    return code, err, out


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[{"start": 0, "end": 1},', ["--segments file", "not valid JSON", "line 1, column"]),
        ('[{"start": 1, "end": 2.5}]', ["--segments: segment 1 (1.00–2.50 s, auto): ends after the end of the video (2.07 s)"]),
        ('[{"start": 0, "end": 1.5}, {"start": 1, "end": 2}]', ["segment 2 (1.00–2.00 s, auto): overlaps segment 1"]),
        ('[{"start": 0, "end": 1}, {"start": 1, "end": 2, "audio": "gone.wav"}]',
         ["--segments: segment 2 (1.00–2.00 s, auto): audio:", "gone.wav: no such file"]),
    ],
)
def test_bad_segments_stop_the_dub_before_the_model_and_write_nothing(
    tmp_path: Path, media_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    no_model: list[Any], text: str, words: list[str],
) -> None:
    segments = tmp_path / "segs.json"
    segments.write_text(text)
    code, err, out = _dub(tmp_path, media_dir, segments, monkeypatch, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err
    for word in words:
        assert word in err, err
    assert not no_model and not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["segs.json"]


def test_an_unknown_track_is_found_by_pass_1_before_the_model(
    tmp_path: Path, media_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    no_model: list[Any], short_analysis: FaceAnalysis,
) -> None:
    import latentdub.face

    ran: list[Path] = []

    def analyze(path: Path, **_: Any) -> FaceAnalysis:
        ran.append(Path(path))
        return short_analysis

    monkeypatch.setattr(latentdub.face, "analyze_video", analyze)
    known = sorted(t.id for t in short_analysis.tracks)
    assert known, "the clip should have a face"
    segments = tmp_path / "segs.csv"
    segments.write_text(f"start,end,face\n0,1,track:{known[0]}\n1,2,track:{max(known) + 7}\n")
    code, err, out = _dub(tmp_path, media_dir, segments, monkeypatch, capsys)
    assert code == 2, err
    assert (f"error: --segments: segment 2 (1.00–2.00 s, track:{max(known) + 7}): there is no track "
            f"{max(known) + 7}; tracks found: {', '.join(map(str, known))}") in err
    assert ran == [media_dir / SHORT_VIDEO] and not no_model and not out.exists()


def test_good_segments_reach_the_dub_with_pass_1_made_once(
    tmp_path: Path, media_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    short_analysis: FaceAnalysis,
) -> None:
    import latentdub.face
    import latentdub.pipeline as pipeline_mod

    seen: list[tuple[Any, DubOptions]] = []

    class Pipe:
        device = __import__("torch").device("cpu")
        model_info: ClassVar[dict[str, bool]] = {"random_weights": True}
        provenance = type("P", (), {"signing": None})()

        def dub(self, inputs: Any, options: DubOptions, **_: Any) -> Any:
            seen.append((inputs.analysis, options))
            raise InputError("test: stop after the options arrived")

    monkeypatch.setattr(latentdub.face, "analyze_video", lambda *a, **k: short_analysis)
    monkeypatch.setattr(pipeline_mod.LipSyncPipeline, "from_pretrained", staticmethod(lambda *a, **k: Pipe()))
    track = short_analysis.tracks[0].id
    voice = _wav(tmp_path / "voice.wav", 2.0)
    segments = tmp_path / "segs.json"
    segments.write_text(json.dumps([{"start": 0, "end": 1.5, "face": f"track:{track}", "audio": voice.name,
                                     "offset": 0.5}]))
    code, err, _ = _dub(tmp_path, media_dir, segments, monkeypatch, capsys)
    assert code == 2 and "stop after the options arrived" in err, err
    analysis, options = seen[0]
    assert analysis is short_analysis  # made before the model, reused by the dub
    assert options.segments == (Segment(start=0, end=1.5, face=f"track:{track}", audio=str(voice), offset=0.5),)


def test_dub_and_batch_list_the_segments_flag(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    for command in ("dub", "batch"):
        code, out, _ = invoke([command, "--help"], monkeypatch, capsys)
        flat = " ".join(out.replace("│", " ").split())
        assert code == 0 and "--segments FILE" in flat and "Who is dubbed when" in flat, command
