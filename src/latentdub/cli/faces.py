"""``latentdub faces VIDEO``: what the face layer sees in a video (tracks, choice, pass-through,
who speaks when)."""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.table import Table

from latentdub.cli._app import app, console, frame_bars
from latentdub.errors import InputError
from latentdub.runs import runs

if TYPE_CHECKING:
    from latentdub.face.analysis import FaceAnalysis
    from latentdub.face.preview import OccluderOverlay
    from latentdub.face.selection import FaceSelection
    from latentdub.face.speakers import SpeakerTimeline
    from latentdub.media.reader import Frame
    from latentdub.occlusion.tracker import OccluderFrame


@app.command("faces")
def faces(
    video: Annotated[Path, typer.Argument(help="The video to analyse.")],
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (the last line of stdout).")
    ] = False,
    preview: Annotated[
        Path | None,
        typer.Option(help="Also write an annotated .mp4: boxes, anchors, mouth region, occluders."),
    ] = None,
    occlusion: Annotated[
        bool,
        typer.Option(
            "--occlusion/--no-occlusion",
            help="With --preview: find what covers the dubbed mouth (hands, microphones …) and draw it.",
        ),
    ] = True,
    face: Annotated[
        str, typer.Option(help="Which face: largest, X,Y@T (pixel at T s), or track:N.")
    ] = "largest",
    version: Annotated[
        str, typer.Option(help="Model version the crops are for: 1.5 (256 px) or 1.6 (512 px), as for `dub`.")
    ] = "1.6",
    resolution: Annotated[
        int | None, typer.Option(help="Crop size override: 256 or 512 (default: the version's).")
    ] = None,
    every_n: Annotated[
        int, typer.Option(help="Detect on every N-th frame only (faster, interpolated).")
    ] = 1,
    max_frames: Annotated[int | None, typer.Option(help="Analyse only the first N frames.")] = None,
) -> None:
    """Detect, track and choose faces; report tracks, the frames that would pass through, and
    who speaks when in the video's own audio."""
    from latentdub.face import select_face
    from latentdub.face.selection import parse_policy
    from latentdub.weights.resolve import RESOLUTIONS

    if version not in ("1.5", "1.6"):
        raise InputError(f"--version must be 1.5 or 1.6, got {version!r}")
    resolution = RESOLUTIONS[version] if resolution is None else resolution
    if resolution not in (256, 512):
        raise InputError(f"--resolution must be 256 or 512, got {resolution}")
    if every_n < 1:
        raise InputError(f"--every-n must be at least 1, got {every_n}")
    if max_frames is not None and max_frames < 2:
        raise InputError(f"--max-frames must be at least 2, got {max_frames}")
    parse_policy(face)  # fail before decoding anything
    if preview is not None and not preview.parent.exists():
        raise InputError(f"--preview {preview}: the folder {preview.parent} does not exist")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with frame_bars(10, json_out=json_out) as bar:
        task = bar.add_task("faces", total=None)

        def on_frame(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        analysis, speakers, speaker_note = analyze_with_speakers(
            video, every_n=every_n, max_frames=max_frames, progress=on_frame
        )
        selection = select_face(analysis, face, resolution=resolution)
        occluders: PreviewOcclusion | None = None
        if preview is not None:
            from latentdub.face.preview import render_preview

            # The occlusion analysis sits above the face layer: it is run here, frame by frame
            # as the preview decodes, and handed to the preview as plain overlays.
            occluders = PreviewOcclusion(analysis, selection) if occlusion else None
            ptask = bar.add_task("preview", total=analysis.num_frames)
            try:
                render_preview(
                    analysis,
                    selection,
                    preview,
                    speakers=speakers,
                    progress=lambda d, t: bar.update(ptask, completed=d, total=t),
                    occluders=occluders,
                )
            finally:
                if occluders is not None:
                    occluders.close()

    summary: dict[str, Any] = analysis.to_dict()
    summary.update(selection.to_dict())
    summary["speakers"] = speakers_summary(analysis, speakers, speaker_note)
    if preview is not None:
        summary["preview"] = str(preview)
    if occluders is not None:
        summary["occlusion"] = occluders.summary()
    if json_out:
        print(json.dumps(summary))
        return
    _print_summary(summary)


# -- occluders ----------------------------------------------------------------------------------
class PreviewOcclusion:
    """The occluders of the selected face, for the preview: a stage that takes the decoded frames
    in order and yields each with its overlay (:class:`~latentdub.face.preview.OccluderOverlay`,
    None where nothing covers the face), a few frames later (the analysis settles a frame once it
    has seen the next); it keeps per frame whether the face was occluded or passed through.

    Crops are cut at the selection's resolution, as a dub cuts them; each track's reference crops
    (frames spread over the track) are read by seeking, so memory is a few frames.
    """

    def __init__(self, analysis: FaceAnalysis, selection: FaceSelection) -> None:
        from latentdub.occlusion.analyzer import SelectedFaceOcclusion

        self.analysis = analysis
        self.selection = selection
        self.occlusion = SelectedFaceOcclusion(
            analysis.path, analysis.pts, rotation=analysis.info.rotation, resolution=selection.resolution,
            matrices=selection.matrices, valid=selection.valid, tracks=selection.track_ids,
        )
        self.detectors = self.occlusion.detectors
        n = analysis.num_frames
        self.occluded = np.zeros(n, bool)
        self.passed = np.zeros(n, bool)
        self.coverage = np.zeros(n, np.float32)

    def __call__(self, frames: Iterator[Frame]) -> Iterator[tuple[Frame, OccluderOverlay | None]]:

        waiting: deque[Frame] = deque()  # decoded, not yet settled (a frame or two)
        settled: dict[int, OccluderFrame] = {}
        for frame in frames:
            settled.update((r.index, r) for r in self.occlusion.feed(frame.index, frame.image))
            waiting.append(frame)
            while waiting and (waiting[0].index in settled or not self.occlusion.dubbed(waiting[0].index)):
                yield self._pair(waiting.popleft(), settled)
        settled.update((r.index, r) for r in self.occlusion.finish())
        while waiting:
            yield self._pair(waiting.popleft(), settled)

    def _pair(self, frame: Frame, settled: dict[int, OccluderFrame]) -> tuple[Frame, OccluderOverlay | None]:
        from latentdub.face.preview import OccluderOverlay

        r = settled.pop(frame.index, None)
        if r is None or not (r.occluded or r.passed_through):
            return frame, None
        i = frame.index
        self.occluded[i], self.passed[i], self.coverage[i] = r.occluded, r.passed_through, r.coverage
        overlay = OccluderOverlay(r.mask, self.selection.matrices[i], self.selection.resolution, r.coverage,
                                  r.passed_through)  # fmt: skip
        return frame, overlay

    def summary(self) -> dict[str, Any]:
        """The ``occlusion`` object of ``faces --json``: frames (and runs) where something covers
        the selected face's lower face (``occluded``: kept in front of the dub, or passed through)
        and, of those, the ones passed through because the mouth is covered."""
        from latentdub.occlusion.tracker import PASS_THROUGH

        times = np.asarray(self.analysis.times_s, dtype=np.float64)
        n = len(times)
        end = float(times[0]) + self.analysis.duration_s if n else 0.0

        def spans(mask: np.ndarray) -> list[dict[str, Any]]:
            return [
                _span(a, b, float(times[a]), float(times[b]) if b < n else end)
                for a, b, on in runs(mask) if on
            ]  # fmt: skip

        return {
            "detectors": [d.name for d in self.detectors],
            "pass_through_coverage": PASS_THROUGH,
            "frames_occluded": int(self.occluded.sum()),
            "frames_passed_through": int(self.passed.sum()),
            "occluded": spans(self.occluded),
            "passed_through": spans(self.passed),
            "max_coverage": round(float(self.coverage.max()), 4) if n else 0.0,
        }

    def close(self) -> None:
        self.occlusion.close()


# -- who speaks when ------------------------------------------------------------------------------
NO_AUDIO_NOTE = "the video has no audio track: nobody is marked as speaking"


def analyze_with_speakers(
    video: Path, *, every_n: int = 1, max_frames: int | None = None, progress: Any = None
) -> tuple[FaceAnalysis, SpeakerTimeline, str]:
    """Pass 1 over ``video``, its speaker timeline against the video's own audio, and a note
    ("" unless the timeline could not be made).

    The one place that knows how the speaker detector is reached: ``speaker_timeline`` (pass 1
    always keeps lip apertures) where the face layer has it, else ``analyze_speakers`` (its own
    pass with landmarks). A video without a usable audio track gets a timeline of nobody
    speaking, method "none" (its note says why), and no error.
    """
    from latentdub.face import analyze_video, speakers
    from latentdub.media.audio_io import load_audio
    from latentdub.media.reader import probe_video

    info = probe_video(video)
    clip, note = None, NO_AUDIO_NOTE
    if info.has_audio:
        try:
            clip = load_audio(video, mono_16k=True)  # before pass 1: a broken track must not waste it
        except InputError as err:
            note = f"the audio track cannot be used ({err}): nobody is marked as speaking"
    kwargs: dict[str, Any] = {"every_n": every_n, "max_frames": max_frames, "progress": progress}
    new_api = getattr(speakers, "speaker_timeline", None)
    if clip is None:
        analysis = analyze_video(video, info=info, **kwargs)
        return analysis, _nobody_speaks(analysis), note
    if new_api is not None:
        analysis = analyze_video(video, info=info, **kwargs)
        timeline = new_api(analysis, clip)
    else:
        analysis, timeline = speakers.analyze_speakers(video, audio=clip, info=info, **kwargs)
    # The detector gives up (method none) on faces without lips to read, or an empty track.
    note = "no face could be judged (no lips to read, or no sound)" if timeline.method == "none" else ""
    return analysis, timeline, note


def _nobody_speaks(analysis: FaceAnalysis) -> SpeakerTimeline:
    from latentdub.face.speakers import SpeakerTimeline

    n = analysis.num_frames
    ids = [t.id for t in analysis.tracks]
    times = np.asarray(analysis.times_s, dtype=np.float64)
    return SpeakerTimeline(
        track=np.full(n, -1, np.int32),
        confidence=np.zeros(n, np.float32),
        times_s=times,
        end_s=float(times[0]) + analysis.duration_s if n else 0.0,
        track_ids=ids,
        scores=np.full((n, len(ids)), np.nan),
        intervals={tid: [] for tid in ids},
        method="none",
    )


def speakers_summary(
    analysis: FaceAnalysis, timeline: SpeakerTimeline, note: str = ""
) -> dict[str, Any]:
    """The ``speakers`` object of ``faces --json``: per track its speaking intervals, the
    stretches where no face on screen speaks (``nobody``: silence, or a voice off screen), and
    all of it as one list of ``turns`` in time order (``track_id`` null: nobody)."""
    from latentdub.face.preview import timeline_speaking

    times = np.asarray(timeline.times_s, dtype=np.float64)
    n = timeline.num_frames

    def end_of(stop: int) -> float:
        return float(times[stop]) if stop < n else float(timeline.end_s)

    tracks = []
    for tid in timeline.track_ids:
        intervals = timeline.intervals.get(tid, [])
        sel = analysis.obs_track == tid
        # The mean box says which face a track id is (ids alone are anonymous).
        box = analysis.obs_bbox[sel].mean(axis=0) if sel.any() else np.full(4, np.nan)
        tracks.append({
            "track_id": int(tid),
            "speaking_frames": int(sum(iv.stop_frame - iv.start_frame for iv in intervals)),
            "speaking_s": round(sum(iv.end_s - iv.start_s for iv in intervals), 4),
            "mean_box": [round(float(v), 1) for v in box] if np.isfinite(box).all() else None,
            "intervals": [iv.to_dict() for iv in intervals],
        })  # fmt: skip
    # Turns: runs of the main speaker (a partition of the frames, split at scene cuts, as the
    # intervals are); a second face that speaks at the same time is listed with it.
    main = np.asarray(timeline.track)
    speaking = timeline_speaking(timeline)
    shots = np.searchsorted(np.asarray(analysis.scene_cuts, dtype=np.int64), np.arange(n), side="right")
    turns: list[dict[str, Any]] = []
    for a, b, who in runs(main, shots):
        also = [
            int(tid) for k, tid in enumerate(timeline.track_ids)
            if tid != who and speaking[a:b, k].any()
        ]  # fmt: skip
        turns.append({
            "track_id": int(who) if who >= 0 else None,
            **_span(a, b, float(times[a]), end_of(b)),
            "confidence": round(float(np.mean(timeline.confidence[a:b])), 4) if who >= 0 else None,
            "also_speaking": also,
        })  # fmt: skip
    nobody = [
        _span(a, b, float(times[a]), end_of(b)) for a, b, who in runs(main) if who < 0
    ]
    return {
        "method": timeline.method,
        "note": note,
        "frames": n,
        "tracks": tracks,
        "nobody": nobody,
        "turns": turns,
    }


def _span(start: int, stop: int, start_s: float, end_s: float) -> dict[str, Any]:
    return {
        "start_frame": int(start),
        "stop_frame": int(stop),
        "start_s": round(start_s, 4),
        "end_s": round(end_s, 4),
    }


def _print_summary(s: dict[str, Any]) -> None:
    head = Table(show_header=False, box=None)
    head.add_row("video", s["path"])
    head.add_row(
        "frames",
        f"{s['frames']} at {s['fps']:.3f} fps ({s['duration_s']:.2f} s), {s['width']}x{s['height']}",
    )
    head.add_row(
        "with a face",
        f"{s['frames_with_face']} frames ({100 * s['frames_with_face'] / max(s['frames'], 1):.1f} %)",
    )
    head.add_row("scene cuts", ", ".join(str(c) for c in s["scene_cuts"]) or "none")
    sel = s["selected_track"]
    head.add_row(
        "selected",
        f"policy {s['policy']}: track {sel}"
        if sel is not None
        else f"policy {s['policy']}: no face",
    )
    head.add_row("dubbed", f"{s['frames_selected']} frames at {s['resolution']} px")
    if s.get("preview"):
        head.add_row("preview", s["preview"])
    occ = s.get("occlusion")
    if occ is not None:
        def frames_of(spans: list[dict[str, Any]]) -> str:
            listed = ", ".join(f"{r['start_frame']}–{r['stop_frame'] - 1}" for r in spans[:6])
            return listed + (f" (+{len(spans) - 6} more)" if len(spans) > 6 else "")

        text = f"in front of the mouth on {occ['frames_occluded']} frames"
        if occ["occluded"]:
            text += f" ({frames_of(occ['occluded'])})"
        text += f", of which passed through (mouth covered) {occ['frames_passed_through']}"
        if occ["passed_through"]:
            text += f" ({frames_of(occ['passed_through'])})"
        head.add_row("occluders", text)
    console.print(head)
    if s["tracks"]:
        table = Table(title="tracks")
        for col in ("id", "frames", "first", "last", "coverage", "size px", "|yaw|°", "score"):
            table.add_column(col, justify="right")
        for t in s["tracks"]:
            table.add_row(
                str(t["id"]), str(t["frames"]), str(t["first_frame"]), str(t["last_frame"]),
                f"{100 * t['coverage']:.1f} %", f"{t['mean_size']:.0f}", f"{t['median_abs_yaw']:.0f}", f"{t['mean_score']:.2f}",
            )  # fmt: skip
        console.print(table)
    if s["passthrough_ranges"]:
        table = Table(title="pass-through (left untouched)")
        for col in ("frames", "time s", "reason"):
            table.add_column(col)
        for r in s["passthrough_ranges"]:
            table.add_row(
                f"{r['start_frame']}–{r['end_frame'] - 1}",
                f"{r['start_s']:.2f}–{r['end_s']:.2f}",
                r["reason"],
            )
        console.print(table)
    _print_speakers(s["speakers"])


def _print_speakers(sp: dict[str, Any]) -> None:
    if sp["method"] == "none":
        console.print(f"who speaks when: {sp['note'] or 'not detected'} (method none)")
        return
    table = Table(title=f"who speaks when (method {sp['method']})")
    for col in ("frames", "time s", "speaker", "confidence"):
        table.add_column(col)
    for t in sp["turns"]:
        who = f"track {t['track_id']}" if t["track_id"] is not None else "nobody on screen"
        if t["also_speaking"]:
            who += " (with " + ", ".join(f"track {o}" for o in t["also_speaking"]) + ")"
        conf = f"{t['confidence']:.2f}" if t["confidence"] is not None else ""
        table.add_row(
            f"{t['start_frame']}–{t['stop_frame'] - 1}",
            f"{t['start_s']:.2f}–{t['end_s']:.2f}",
            who,
            conf,
        )
    console.print(table)
