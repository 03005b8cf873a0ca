"""Storage lifecycle: results and uploads expire, orphaned files go, and what is stored is measured.

* Expiry (``settings.retention_s``; 0: keep forever): a final job's result file is removed
  ``retention_s`` after the job ended (its row stays, with ``expired_at``; ``GET …/result`` then
  answers 410 ``result_expired``), and an uploaded asset ``retention_s`` after its upload (row,
  file and cached analysis), unless a queued or running job uses it: it goes at a later sweep.
* Orphans: files that no row accounts for, left by a crash between writing a file and recording it
  (or between clearing a row and removing its file): uploads with no asset, results of no job (or
  of a job whose row no longer names them), cached analyses of deleted assets. Only files older
  than a grace period are touched, so an upload or a dub in progress, here or in another serving
  process on the same folder, keeps its files.
* :class:`Sweeper`: a thread of each serving process that runs :func:`sweep` at start-up and every
  ``settings.sweep_interval_s``. Several processes may sweep one folder and database at once:
  rows move in short locked transactions, checked again under the lock
  (:meth:`~.store.JobStore.expire_results`, :meth:`~.store.JobStore.expire_assets`), files go
  only after their rows no longer name them, and removing a file twice is harmless.
* ``/metrics``' stored bytes (:func:`storage_bytes`) come from database sums (asset bytes, the
  results' recorded ``output_bytes``); only the analysis cache folder is measured on disk, at
  most every :data:`ANALYSIS_MEASURE_S`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from latentdub.service.analysis import ANALYSIS_DIR, remove_cached
from latentdub.service.jobs import RESULTS_DIR
from latentdub.service.models import ACTIVE_STATUSES, Asset, utcnow
from latentdub.service.schemas import iso
from latentdub.service.settings import ServiceSettings
from latentdub.service.store import JobStore
from latentdub.service.uploads import UPLOADS_DIR

log = logging.getLogger(__name__)

# A stored upload gets its row once it has been sniffed (seconds; a long audio, a minute): one
# with no row after this long was left by a crash. Results and analyses get the same grace.
ORPHAN_GRACE_S = 15 * 60.0
# A ``.part`` file (an upload streaming in) or a temporary file: an upload of 2 GB on a slow link
# may take long, and another process may be receiving it.
PART_GRACE_S = 3600.0
ANALYSIS_MEASURE_S = 30.0
BATCH = 500  # files checked against the database per query
LOGGED_NAMES = 20  # file names listed in one log line; the count covers the rest


@dataclass
class SweepReport:
    """What one sweep removed."""

    expired_results: int = 0
    expired_result_bytes: int = 0
    expired_assets: int = 0
    expired_asset_bytes: int = 0
    orphans: list[str] = field(default_factory=list)  # paths under data_dir
    orphan_bytes: int = 0
    seconds: float = 0.0

    @property
    def removed_anything(self) -> bool:
        return bool(self.expired_results or self.expired_assets or self.orphans)


def expire(store: JobStore, settings: ServiceSettings, report: SweepReport | None = None) -> SweepReport:
    """Remove the results and assets older than ``settings.retention_s`` (nothing when it is 0)."""
    report = report or SweepReport()
    if settings.retention_s <= 0:
        return report
    before = utcnow() - dt.timedelta(seconds=settings.retention_s)
    for _, _, size in store.expire_results(before):
        report.expired_results += 1
        report.expired_result_bytes += size
    for asset in store.expire_assets(before):
        report.expired_assets += 1
        report.expired_asset_bytes += asset.bytes
        remove_cached(settings, asset.id)
    return report


def sweep_orphans(
    store: JobStore, settings: ServiceSettings, report: SweepReport | None = None, *, now: float | None = None
) -> SweepReport:
    """Remove the files of ``uploads/``, ``results/`` and ``analysis/`` that no row accounts for and
    that are older than their grace (:data:`ORPHAN_GRACE_S`, :data:`PART_GRACE_S`)."""
    report = report or SweepReport()
    now = time.time() if now is None else now
    root = settings.data_dir

    # uploads/: the folder is listed before the names are read, so a file recorded after the
    # listing was written more than the grace before its row: never an upload in progress.
    stored = list(_old_files(root / UPLOADS_DIR, now, ORPHAN_GRACE_S, PART_GRACE_S, report))
    if stored:
        names = store.asset_file_names()
        for entry in stored:
            if entry.name not in names:
                _remove(entry, root, report)

    # results/: <job id>.mp4 of a job whose row names it; a queued or running job's files stay.
    for chunk in _chunks(_old_files(root / RESULTS_DIR, now, ORPHAN_GRACE_S, PART_GRACE_S, report)):
        owners = store.result_owners(filter(None, (_uuid_prefix(e.name) for e in chunk)))
        for entry in chunk:
            job_id = _uuid_prefix(entry.name)
            owner = owners.get(job_id) if job_id else None
            if owner is not None and owner[0] in ACTIVE_STATUSES:
                continue
            if owner is None or owner[1] is None or Path(owner[1]).name != entry.name:
                _remove(entry, root, report)

    # analysis/: <asset id>.json of an asset that still has its row.
    for chunk in _chunks(_old_files(root / ANALYSIS_DIR, now, ORPHAN_GRACE_S, PART_GRACE_S, report)):
        present = store.existing_assets(filter(None, (_uuid_prefix(e.name) for e in chunk)))
        for entry in chunk:
            if _uuid_prefix(entry.name) not in present:
                _remove(entry, root, report)
    return report


def sweep(store: JobStore, settings: ServiceSettings) -> SweepReport:
    """One whole sweep (expiry, then orphans), logged when it removed something."""
    started = time.monotonic()
    report = expire(store, settings)
    sweep_orphans(store, settings, report)
    report.seconds = time.monotonic() - started
    if report.removed_anything:
        shown = ", ".join(report.orphans[:LOGGED_NAMES]) + (" …" if len(report.orphans) > LOGGED_NAMES else "")
        log.info(
            "storage sweep (%.2f s): %d result(s) expired (%d bytes), %d asset(s) expired (%d bytes), "
            "%d orphaned file(s) removed (%d bytes)%s",
            report.seconds, report.expired_results, report.expired_result_bytes, report.expired_assets,
            report.expired_asset_bytes, len(report.orphans), report.orphan_bytes, f": {shown}" if shown else "",
        )
    else:
        log.debug("storage sweep (%.2f s): nothing to remove", report.seconds)
    return report


class Sweeper:
    """Runs :func:`sweep` in a daemon thread: at once, then every ``settings.sweep_interval_s``."""

    def __init__(self, store: JobStore, settings: ServiceSettings) -> None:
        self.store = store
        self.settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="latentdub-storage-sweep", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the thread to end and wait for it (a sweep in progress finishes its current row)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                sweep(self.store, self.settings)
            except Exception:  # the database was away, a folder unreadable: try again next time
                log.exception("storage sweep failed")
            self._stop.wait(self.settings.sweep_interval_s)


# -- /metrics -----------------------------------------------------------------------------------
_measured: dict[Path, tuple[float, int]] = {}


def storage_bytes(store: JobStore, settings: ServiceSettings) -> dict[str, int]:
    """Bytes stored by kind (``uploads``, ``results``, ``analysis``), cheap enough for every scrape."""
    usage = store.storage_usage()
    return {"uploads": usage.asset_bytes, "results": usage.result_bytes, "analysis": _analysis_bytes(settings)}


def _analysis_bytes(settings: ServiceSettings) -> int:
    folder = settings.data_dir / ANALYSIS_DIR
    at, size = _measured.get(folder, (-1e18, 0))
    if time.monotonic() - at < ANALYSIS_MEASURE_S:
        return size
    size = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        size += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    except OSError:
        size = 0
    _measured[folder] = (time.monotonic(), size)
    return size


# -- helpers ------------------------------------------------------------------------------------
def _old_files(
    folder: Path, now: float, grace_s: float, temp_grace_s: float, report: SweepReport
) -> Iterator[os.DirEntry[str]]:
    """Plain files of ``folder`` older than their grace; ``.part`` and temporary files (a name that
    does not start with a UUID) past ``temp_grace_s`` are removed here and not yielded."""
    try:
        entries = os.scandir(folder)
    except OSError:  # not made yet
        return
    with entries:
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            temporary = entry.name.endswith(".part") or _uuid_prefix(entry.name) is None
            if temporary:
                if age > temp_grace_s:
                    _remove(entry, folder.parent, report)
            elif age > grace_s:
                yield entry


def _uuid_prefix(name: str) -> str | None:
    """The UUID a service file's name starts with (``<uuid>.mp4``, ``<uuid>.json``), or None."""
    try:
        return str(uuid.UUID(name[:36]))
    except ValueError:
        return None


def _chunks(entries: Iterator[os.DirEntry[str]]) -> Iterator[list[os.DirEntry[str]]]:
    chunk: list[os.DirEntry[str]] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) >= BATCH:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _remove(entry: os.DirEntry[str], root: Path, report: SweepReport) -> None:
    try:
        size = entry.stat(follow_symlinks=False).st_size
        os.unlink(entry.path)
    except FileNotFoundError:  # another process swept it first
        return
    except OSError as err:
        log.warning("storage sweep: cannot remove %s: %s", entry.path, err.strerror or err)
        return
    report.orphans.append(os.path.relpath(entry.path, root))
    report.orphan_bytes += size


def asset_json(asset: Asset, settings: ServiceSettings) -> dict[str, object]:
    """An asset as the API shows it, with when it expires (null: kept forever). A queued or running
    job that uses it keeps it past that time."""
    return {**asset.to_dict(), "expires_at": iso(expires_at(asset.created_at, settings))}


def expires_at(since: dt.datetime | None, settings: ServiceSettings) -> dt.datetime | None:
    """When something stored at ``since`` (a result: its job's end) expires; None: never."""
    if since is None or settings.retention_s <= 0:
        return None
    return since + dt.timedelta(seconds=settings.retention_s)
