"""Running checked rows: one loaded pipeline per device, one worker thread each, one shared queue.

Workers take the next row in manifest order, so every worker runs its rows in manifest order
and a fast device simply takes more rows (no round-robin stalls behind a long clip). A failing
row (bad media, a bug, out of memory) is recorded with its error and the batch goes on.
Cancelling (the ``cancel`` event) stops the item in flight cleanly (no partial file) and
starts no new one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from latentdub.batch.manifest import BatchRow
from latentdub.batch.sidecars import (
    make_sidecar,
    model_label,
    read_sidecar,
    result_summary,
    sidecar_mismatch,
    sidecar_path,
    write_sidecar,
)
from latentdub.errors import Cancelled, InputError, LatentdubError
from latentdub.progress import CancelToken, ProgressEvent

log = logging.getLogger("latentdub.batch")

EXIT_OK = 0
EXIT_SOME_FAILED = 3
EXIT_CANCELLED = 130

STATUSES = ("done", "skipped", "failed", "cancelled")
_PENDING = "pending"  # internal: not reached yet


@dataclass
class RowResult:
    """What happened to one row; one line of the summary."""

    line: int
    video: str
    audio: str
    output: str
    status: str = _PENDING
    device: str = ""
    seconds: float = 0.0  # wall time spent on the row in this run
    duration_s: float | None = None  # video seconds of the output
    frames: int | None = None
    dubbed_frames: int | None = None
    passthrough_ranges: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    note: str = ""  # why a row with a sidecar was dubbed again, or how a cancelled row ended
    options: dict[str, Any] = field(default_factory=dict)  # the row's own overrides
    sidecar: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WorkerState:
    """What one device's worker is doing now."""

    device: str
    line: int | None = None
    output: str = ""
    stage: str = ""  # "check", then the dub's stages: read, fit, faces, audio_features, dub, finalize
    done: int = 0
    total: int = 0
    eta_s: float | None = None
    since: float = 0.0  # perf_counter() when the row began


@dataclass
class BatchProgress:
    """A snapshot of the whole batch, for a progress display."""

    items_total: int
    items_finished: int  # done + skipped + failed (+ cancelled)
    done: int
    skipped: int
    failed: int
    seconds_total: float  # video seconds to dub: finished rows' real ones + the rest estimated
    seconds_done: float  # video seconds dubbed, the item in flight in proportion
    elapsed_s: float
    eta_s: float | None
    workers: list[WorkerState]


@dataclass
class BatchReport:
    """The end of a batch: every row's result, in manifest order."""

    rows: list[RowResult]
    devices: list[str]
    model: dict[str, Any]
    elapsed_s: float
    cancelled: bool

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(1 for r in self.rows if r.status == s) for s in STATUSES}

    @property
    def exit_code(self) -> int:
        if self.cancelled and any(r.status == "cancelled" for r in self.rows):
            return EXIT_CANCELLED
        return EXIT_SOME_FAILED if any(r.status == "failed" for r in self.rows) else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": {EXIT_OK: "ok", EXIT_SOME_FAILED: "some_failed", EXIT_CANCELLED: "cancelled"}[self.exit_code],
            "exit_code": self.exit_code,
            "counts": {"rows": len(self.rows), **self.counts},
            "elapsed_s": round(self.elapsed_s, 3),
            "devices": list(self.devices),
            "model": dict(self.model),
            "rows": [r.to_dict() for r in self.rows],
        }


RowCallback = Callable[[BatchRow, RowResult], None]


def load_pipelines(
    devices: Sequence[str],
    weights: str | Path,
    *,
    version: str | None = None,
    dtype: str | None = None,
) -> list[Any]:
    """One :class:`~latentdub.pipeline.LipSyncPipeline` per device, loaded at the same time.

    The first error (missing weights, a device that fails) is raised after every load ended.
    """
    from concurrent.futures import ThreadPoolExecutor

    from latentdub.pipeline import LipSyncPipeline

    def load(device: str) -> Any:
        return LipSyncPipeline.from_pretrained(weights, version=version, device=device, dtype=dtype)

    if len(devices) == 1:
        return [load(devices[0])]
    with ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="latentdub-load") as pool:
        futures = [pool.submit(load, d) for d in devices]
        errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err
    return [f.result() for f in futures]


class BatchRunner:
    """Run checked rows on one pipeline per device; see the module docstring.

    ``pipes``: loaded pipelines (one worker thread each). ``cancel``: any object with
    ``is_set()``; once set, the dubs in flight stop cleanly and no new row starts.
    ``on_row(row, result)`` is called from a worker thread after each row ends.
    ``estimates``: expected output seconds per row (default: probed from the inputs).
    """

    def __init__(
        self,
        rows: Sequence[BatchRow],
        pipes: Sequence[Any],
        *,
        cancel: CancelToken | None = None,
        on_row: RowCallback | None = None,
        estimates: Sequence[float] | None = None,
    ) -> None:
        if not pipes:
            raise ValueError("a batch needs at least one pipeline")
        self.rows = list(rows)
        self.pipes = list(pipes)
        self.cancel: CancelToken = cancel if cancel is not None else threading.Event()
        self.on_row = on_row
        self.devices = [str(getattr(p, "device", f"worker{i}")) for i, p in enumerate(self.pipes)]
        self.models = [model_label(p) for p in self.pipes]
        self.results = [
            RowResult(line=r.line, video=str(r.video), audio=str(r.audio), output=str(r.output),
                      options=dict(r.overrides), sidecar=str(sidecar_path(r.output)))
            for r in self.rows
        ]
        self._estimates = list(estimates) if estimates is not None else [estimate_seconds(r) for r in self.rows]
        self._fraction = [0.0] * len(self.rows)  # of the item in flight
        self._workers = [WorkerState(device=d) for d in self.devices]
        self._lock = threading.Lock()
        self._next = 0
        self._threads: list[threading.Thread] = []
        self._start = 0.0
        self._work_s = 0.0  # wall time spent dubbing (not skipping), for the ETA
        self._end: float | None = None

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._start = time.perf_counter()
        for i, (pipe, device) in enumerate(zip(self.pipes, self.devices, strict=True)):
            t = threading.Thread(target=self._work, args=(i, pipe), name=f"latentdub-batch-{device}", daemon=True)
            self._threads.append(t)
            t.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every worker (at most ``timeout`` s); True when all have ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(left)
            if t.is_alive():
                return False
        if self._end is None:
            self._end = time.perf_counter()
        return True

    def run(self) -> BatchReport:
        self.start()
        self.wait()
        return self.report()

    # -- results --------------------------------------------------------------------------------
    def report(self) -> BatchReport:
        """Every row's result so far; rows not reached count as cancelled when cancelled."""
        cancelled = self.cancel.is_set()
        end = self._end if self._end is not None else time.perf_counter()
        with self._lock:
            rows = [RowResult(**r.to_dict()) for r in self.results]
            in_flight = {w.line for w in self._workers if w.line is not None}
        for r in rows:
            if r.status != _PENDING:
                continue
            if cancelled:
                r.status = "cancelled"
                r.note = ("interrupted in flight: no output was written" if r.line in in_flight
                          else "not started: the batch was cancelled")
            else:
                r.status = "failed"
                r.error = "not run: the batch ended before this row (its worker stopped)"
        return BatchReport(rows=rows, devices=self.devices, model=self.models[0],
                           elapsed_s=end - self._start if self._start else 0.0, cancelled=cancelled)

    def progress(self) -> BatchProgress:
        with self._lock:
            finished = [r.status != _PENDING for r in self.results]
            seconds_total = 0.0
            seconds_done = 0.0
            for i, r in enumerate(self.results):
                if r.status == "done":
                    seconds_total += r.duration_s or 0.0
                    seconds_done += r.duration_s or 0.0
                elif r.status == _PENDING:
                    seconds_total += self._estimates[i]
                    seconds_done += self._fraction[i] * self._estimates[i]
            now = time.perf_counter()
            work_s = self._work_s + sum(now - w.since for w in self._workers if w.line is not None)
            counts = {s: sum(1 for r in self.results if r.status == s) for s in STATUSES}
            workers = [WorkerState(**asdict(w)) for w in self._workers]
        rate = seconds_done / work_s if work_s > 1.0 and seconds_done > 0 else None
        parallel = max(1, len(self._workers))
        eta = (seconds_total - seconds_done) / rate / parallel if rate else None
        elapsed = (self._end or time.perf_counter()) - self._start if self._start else 0.0
        return BatchProgress(
            items_total=len(self.rows), items_finished=sum(finished), done=counts["done"],
            skipped=counts["skipped"], failed=counts["failed"], seconds_total=round(seconds_total, 3),
            seconds_done=round(min(seconds_done, seconds_total), 3), elapsed_s=round(elapsed, 3),
            eta_s=None if eta is None else round(max(0.0, eta), 1), workers=workers,
        )

    # -- the workers ----------------------------------------------------------------------------
    def _take(self) -> int | None:
        """The next row in manifest order (shared by all workers), or None."""
        with self._lock:
            if self.cancel.is_set() or self._next >= len(self.rows):
                return None
            index = self._next
            self._next += 1
            return index

    def _work(self, worker: int, pipe: Any) -> None:
        while (index := self._take()) is not None:
            row = self.rows[index]
            state = self._workers[worker]
            start = time.perf_counter()
            with self._lock:
                state.line, state.output, state.stage, state.done, state.total = row.line, row.output.name, "check", 0, 0
                state.since = start
            update = self._process(row, pipe, worker, index)
            update["seconds"] = round(time.perf_counter() - start, 3)
            update["device"] = self.devices[worker]
            with self._lock:
                result = self.results[index]
                for k, v in update.items():
                    setattr(result, k, v)
                if result.status == "done":
                    self._work_s += time.perf_counter() - start
                self._fraction[index] = 0.0
                state.line, state.output, state.stage, state.done, state.total, state.eta_s = None, "", "", 0, 0, None
                snapshot = RowResult(**result.to_dict())
            if self.on_row is not None:
                try:
                    self.on_row(row, snapshot)
                except Exception:  # a display problem must not stop the batch
                    log.exception("the batch's on_row callback failed")
            if snapshot.status == "cancelled":
                break

    def _process(self, row: BatchRow, pipe: Any, worker: int, index: int) -> dict[str, Any]:
        """Skip, dub or fail one row; returns the fields of its :class:`RowResult`."""
        model = self.models[worker]
        note = ""
        try:
            sidecar = read_sidecar(row.output)
            if sidecar is not None:
                why = sidecar_mismatch(row, sidecar, model)
                if why is None:
                    return {"status": "skipped", "note": "its sidecar matches: inputs, options, consent, model and output "
                            "are unchanged", **_from_sidecar(sidecar)}
                note = f"dubbed again: {why}"
            if self.cancel.is_set():
                return {"status": "cancelled", "note": "not started: the batch was cancelled", "error": ""}
            return {"note": note, **self._dub(row, pipe, worker, index, model)}
        except Cancelled:
            return {"status": "cancelled", "note": "interrupted in flight: no output was written", "error": ""}
        except LatentdubError as err:
            return {"status": "failed", "error": str(err), "note": note}
        except Exception as err:  # a bug or a device failure (e.g. out of memory): record it, go on
            log.debug("row at line %d failed", row.line, exc_info=True)
            _release_device_memory(pipe)
            return {"status": "failed", "error": f"internal error: {type(err).__name__}: {err}", "note": note}

    def _dub(self, row: BatchRow, pipe: Any, worker: int, index: int, model: dict[str, Any]) -> dict[str, Any]:
        """Dub one row and write its sidecar; the status and result fields."""
        from latentdub.pipeline import read_inputs

        row.output.parent.mkdir(parents=True, exist_ok=True)
        inputs = read_inputs(row.video, row.audio, row.output)
        start = time.perf_counter()
        result = pipe.dub(inputs, row.options, consent=row.consent, progress=self._on_event(worker, index),
                          cancel=self.cancel)
        summary = result_summary(result, time.perf_counter() - start)
        with self._lock:
            self._workers[worker].stage = "sidecar"
        try:
            side = make_sidecar(row, video_sha256=inputs.video_sha256, audio_sha256=inputs.audio_sha256,
                                model=model, result=summary)
            write_sidecar(row.output, side)
        except (OSError, InputError) as err:
            return {"status": "failed", **_row_fields(summary),
                    "error": f"the output was written, but not its sidecar {sidecar_path(row.output)} "
                             f"(a rerun will dub it again): {getattr(err, 'strerror', None) or err}"}
        return {"status": "done", "error": "", **_row_fields(summary)}

    def _on_event(self, worker: int, index: int) -> Callable[[ProgressEvent], None]:
        def on_event(event: ProgressEvent) -> None:
            with self._lock:
                state = self._workers[worker]
                state.stage, state.done, state.total, state.eta_s = event.stage, event.done, event.total, event.eta_s
                if event.stage == "dub" and event.total:
                    self._fraction[index] = min(1.0, event.done / event.total)
                elif event.stage == "finalize":
                    self._fraction[index] = 1.0

        return on_event


def _release_device_memory(pipe: Any) -> None:
    """After a failed row on a GPU (often: out of memory), give the cached blocks back so the
    next row starts from a clean allocator."""
    import torch

    device = getattr(pipe, "device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def _row_fields(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "duration_s": summary.get("duration_s"),
        "frames": summary.get("frames"),
        "dubbed_frames": summary.get("dubbed_frames"),
        "passthrough_ranges": list(summary.get("passthrough_ranges") or []),
        "warnings": list(summary.get("warnings") or []),
    }


def _from_sidecar(sidecar: Mapping[str, Any]) -> dict[str, Any]:
    result = sidecar.get("result")
    return _row_fields(result if isinstance(result, Mapping) else {})


def estimate_seconds(row: BatchRow) -> float:
    """Expected video seconds of a row's output, from the inputs' headers (0 when unreadable).

    Length policies pingpong/loop/pad follow the audio, cut the shorter of the two; fit
    stretch/align pull the audio toward the video by at most ``max_stretch``.
    """
    video_s = _media_seconds(row.video, video=True)
    audio_s = _media_seconds(row.audio, video=False)
    if audio_s is None:
        return video_s or 0.0
    if video_s is None:
        return audio_s
    opts = row.options
    if opts.fit != "none":
        audio_s = min(max(video_s, audio_s / opts.max_stretch), audio_s * opts.max_stretch)
    return min(video_s, audio_s) if opts.length_policy == "cut" else audio_s


def _media_seconds(path: Path, *, video: bool) -> float | None:
    import av

    try:
        with av.open(str(path)) as container:
            streams = container.streams.video if video else container.streams.audio
            if not streams:
                return None
            stream = streams[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            if container.duration:
                return container.duration / av.time_base
    except Exception:  # unreadable: the row will fail with the real reason when it runs
        return None
    return None
