"""Progress events and cancellation, shared by every stage of a dub.

A dub reports its stages in this order: ``read``, ``fit``, ``faces``, ``audio_features``,
``dub``, ``finalize``. Each :class:`ProgressEvent` carries the stage, ``done`` / ``total``
(frames where a stage counts frames, else steps), the elapsed time, an ETA and the frame rate.
Within a stage ``done`` never decreases and the last event has ``done == total``. Consumers are
the CLI's progress bars and the service's job records.

``cancel`` is any object with ``is_set() -> bool`` that the caller holds (a
``threading.Event`` is the usual one). Stages poll it through :meth:`DubProgress.check`, which
raises :class:`~latentdub.errors.Cancelled`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from latentdub.errors import Cancelled, HookError

STAGES: tuple[str, ...] = ("read", "fit", "faces", "audio_features", "dub", "finalize")


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class ProgressEvent:
    """One step of progress of one stage."""

    stage: str
    done: int
    total: int
    elapsed_s: float  # since the stage began
    eta_s: float | None  # None until there is a rate to extrapolate from
    fps: float | None  # frames per second so far, for the stages that count frames (faces, dub)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[ProgressEvent], None]


class DubProgress:
    """Emits the events of one dub and answers "was it cancelled?" for every stage.

    Safe to call from the pipeline's threads: events are serialised by a lock, so a callback
    never runs twice at once. A callback that raises fails the dub (as a :class:`HookError`).
    Intermediate events are rate-limited to ``min_interval_s``; the first and the last event of
    a stage always go out.
    """

    def __init__(
        self,
        callback: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        *,
        min_interval_s: float = 0.1,
    ) -> None:
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise TypeError("cancel must have an is_set() method, e.g. a threading.Event")
        self._callback = callback
        self._cancel = cancel
        self._min_interval = min_interval_s
        self._lock = threading.Lock()
        self._stage: str | None = None
        self._total = 0
        self._done = 0
        self._start = 0.0
        self._last_emit = 0.0
        self._last_done = -1
        self._frames = False
        self._finished: list[str] = []

    # -- cancellation ---------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return bool(self._cancel is not None and self._cancel.is_set())

    def check(self) -> None:
        """Raise :class:`Cancelled` if the caller asked to stop."""
        if self.cancelled:
            raise Cancelled("the dub was cancelled; nothing was written")

    # -- events ---------------------------------------------------------------------------------
    def start(self, stage: str, total: int, *, frames: bool = False) -> None:
        """Begin ``stage`` with ``total`` items (≥ 1; ``frames``: they are video frames); emits ``done = 0``."""
        self.check()
        with self._lock:
            if self._stage is not None and self._stage not in self._finished:
                self._emit_locked(self._total, force=True)  # close a stage left open
                self._finished.append(self._stage)
            self._stage, self._total, self._done = stage, max(int(total), 1), 0
            self._frames, self._last_done = frames, -1
            self._start = time.perf_counter()
            self._emit_locked(0, force=True)

    def update(self, done: int, total: int | None = None, *, check: bool = True) -> None:
        """Report ``done`` items of the current stage (never goes backwards); then, unless
        ``check`` is False, raise :class:`Cancelled` if the caller asked to stop."""
        with self._lock:
            if self._stage is None or self._stage in self._finished:
                return
            if total is not None and total >= 1:
                self._total = max(int(total), self._done)
            done = max(int(done), self._done)
            self._total = max(self._total, done)  # an estimated total may turn out short
            if done == self._done and done != self._total:
                return
            self._done = done
            self._emit_locked(done, force=False)
        if check:
            self.check()

    def finish(self) -> None:
        """End the current stage with ``done == total``."""
        with self._lock:
            if self._stage is None or self._stage in self._finished:
                return
            self._done = self._total
            if self._last_done != self._total:
                self._emit_locked(self._total, force=True)
            self._finished.append(self._stage)

    def stage(self, name: str, total: int = 1) -> _StageScope:  # one-step stages
        """``with progress.stage("fit"):`` — start, and finish only if the body succeeded."""
        return _StageScope(self, name, total)

    @property
    def stages_done(self) -> list[str]:
        with self._lock:
            return list(self._finished)

    def _emit_locked(self, done: int, *, force: bool) -> None:
        now = time.perf_counter()
        if not force and done < self._total and now - self._last_emit < self._min_interval:
            return
        self._last_emit = now
        self._last_done = done
        if self._callback is None:
            return
        elapsed = now - self._start
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        eta = (self._total - done) / rate if rate else (0.0 if done >= self._total else None)
        event = ProgressEvent(
            stage=str(self._stage),
            done=done,
            total=self._total,
            elapsed_s=round(elapsed, 3),
            eta_s=None if eta is None else round(eta, 3),
            fps=None if rate is None or not self._frames else round(rate, 3),
        )
        try:
            self._callback(event)
        except Cancelled:
            raise
        except Exception as err:
            raise HookError(f"the progress callback failed: {type(err).__name__}: {err}") from err


class _StageScope:
    def __init__(self, progress: DubProgress, name: str, total: int) -> None:
        self._progress, self._name, self._total = progress, name, total

    def __enter__(self) -> DubProgress:
        self._progress.start(self._name, self._total)
        return self._progress

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._progress.finish()
