"""The audit log: one hash-chained JSON line per dub, append-only.

Each line is the canonical JSON (sorted keys, no spaces, UTF-8) of one entry. latentdub adds:

* ``seq``       — 1, 2, 3, … (line number of the entry in an intact log);
* ``time``      — UTC, ISO 8601;
* ``prev_hash`` — SHA-256 of the previous line's canonical JSON (64 zeros for the first);
* ``hash``      — SHA-256 of this entry's canonical JSON without ``hash``.

So editing a line breaks its own ``hash``; deleting, inserting or reordering lines breaks the
next line's ``prev_hash`` or the ``seq`` run; a crash mid-write leaves a last line without its
newline. Removing lines from the *end* leaves a shorter, self-consistent chain: to catch that,
every append also records the newest ``seq`` and line hash in a small ``<log>.head`` file, and
:meth:`AuditLog.verify` checks the log still reaches it.

This detects accidents and naive edits; it is not a defence against someone who can rewrite
the whole file (and its head) — for that, ship the entries' hashes somewhere else too.

Appends hold an exclusive ``flock`` on the log (concurrent dubs, several processes), write the
line with one ``write`` and ``fsync`` it before returning.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from latentdub.errors import InputError
from latentdub.files import atomic_write
from latentdub.provenance.store import data_dir, ensure_private_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: appends are then not serialised
    fcntl = None  # type: ignore[assignment]

LOG_NAME = "audit.jsonl"
ZERO_HASH = "0" * 64
RESERVED = ("seq", "time", "prev_hash", "hash")


class AuditError(InputError):
    """The audit log cannot be read or extended (damaged, unreadable, bad entry)."""


def canonical(obj: Any) -> bytes:
    """The one byte form an entry is hashed and stored in."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise AuditError(f"an audit entry must be plain JSON data (text, numbers, lists, mappings): {err}") from None
    return text.encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 over the canonical JSON of ``entry`` without its ``hash``."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def line_hash(line: bytes) -> str:
    """What the next entry's ``prev_hash`` must be: SHA-256 of this line (newline excluded)."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


@dataclass
class AuditVerification:
    """The result of checking a log: ``first_bad_line`` is 1-based; ``reason`` says what is wrong."""

    ok: bool
    entries: int
    first_bad_line: int | None = None
    reason: str | None = None
    path: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_log_path() -> Path:
    return data_dir() / LOG_NAME


def dub_entry(
    *,
    consent: Any | None,
    video_sha256: str,
    audio_sha256: str,
    output_sha256: str,
    options: Mapping[str, Any],
    model: Mapping[str, Any],
    output: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The standard entry of one dub. ``consent`` is a ConsentRecord (or its dict) or None."""
    record = consent.to_dict() if hasattr(consent, "to_dict") else (dict(consent) if consent else None)
    return {
        "event": "dub",
        "consent_id": record.get("id") if record else None,
        "consent": record,
        "inputs": {"video_sha256": video_sha256, "audio_sha256": audio_sha256},
        "output": {"sha256": output_sha256, **({"path": output} if output else {})},
        "options": dict(options),
        "model": dict(model),
        **extra,
    }


class AuditLog:
    """The hash-chained log at ``path`` (default: the data folder's ``audit.jsonl``)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_log_path()
        self.head_path = self.path.with_name(self.path.name + ".head")

    # -- writing ------------------------------------------------------------------------------
    def append(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Add ``entry`` (plain JSON data) as the next line; returns it with seq/time/hashes."""
        if not isinstance(entry, Mapping):
            raise AuditError(f"an audit entry must be a mapping, not {type(entry).__name__}")
        clash = [k for k in RESERVED if k in entry]
        if clash:
            raise AuditError(f"audit entry fields {', '.join(clash)} are set by the log itself; rename them")
        canonical(dict(entry))  # refuse non-JSON data before touching the file
        if self.path.parent != Path():
            ensure_private_dir(self.path.parent, what="the audit log's folder")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as err:
            raise AuditError(f"cannot open the audit log {self.path}: {err.strerror or err}") from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            line = _last_line(fd)
            if line is None:
                seq, prev = 1, ZERO_HASH
            else:
                if not line.endswith(b"\n"):
                    number = _count_lines(fd)
                    raise AuditError(
                        f"the audit log {self.path} ends with an incomplete line (line {number}: a write was cut "
                        "off); nothing more can be appended until it is repaired. See `latentdub audit verify`."
                    )
                try:
                    previous = json.loads(line)
                    seq = int(previous["seq"]) + 1
                except (ValueError, KeyError, TypeError):
                    raise AuditError(
                        f"the last line ({_count_lines(fd)}) of the audit log {self.path} is damaged; nothing more can be "
                        "appended until it is repaired. See `latentdub audit verify`."
                    ) from None
                prev = line_hash(line)
            full = {
                **dict(entry),
                "seq": seq,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                "prev_hash": prev,
            }
            full["hash"] = entry_hash(full)
            data = canonical(full) + b"\n"
            _write_all(fd, data)
            os.fsync(fd)
            self._write_head(full["seq"], line_hash(data))
        except OSError as err:
            raise AuditError(f"cannot write the audit log {self.path}: {err.strerror or err}") from None
        finally:
            os.close(fd)  # also releases the lock
        return full

    def _write_head(self, seq: int, last_hash: str) -> None:
        """Record the newest entry (under the log's lock), atomically; private like the log."""
        atomic_write(self.head_path, canonical({"seq": seq, "hash": last_hash}) + b"\n", mode=0o600)

    # -- reading ------------------------------------------------------------------------------
    def entries(self) -> Iterator[dict[str, Any]]:
        """Every entry, in order (lines that are not JSON objects are skipped: use verify())."""
        for _, line in self._lines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    yield value

    def verify(self) -> AuditVerification:
        """Check the whole chain; the first problem found is reported with its line number."""
        result = AuditVerification(ok=True, entries=0, path=str(self.path))
        if not self.path.exists():
            if self.head_path.exists():
                return self._bad(result, 1, "the audit log is missing but its head file says entries were written")
            result.warnings.append("the audit log does not exist yet (no dub has been logged)")
            return result
        prev = ZERO_HASH
        hashes: dict[int, str] = {}
        number = 0
        for number, line in self._lines():
            if not line.endswith(b"\n"):
                return self._bad(result, number, f"line {number} is incomplete (truncated: the write was cut off)")
            try:
                entry = json.loads(line)
            except ValueError:
                return self._bad(result, number, f"line {number} is not valid JSON (edited or damaged)")
            if not isinstance(entry, dict) or any(k not in entry for k in RESERVED):
                return self._bad(result, number, f"line {number} is not an audit entry (seq, time, prev_hash or hash is missing)")
            if entry["hash"] != _safe_hash(entry):
                return self._bad(result, number, f"line {number} was modified: its content does not match its hash")
            if entry["seq"] != number:
                if isinstance(entry["seq"], int) and entry["seq"] > number:
                    gone = f"entry {number} is" if entry["seq"] == number + 1 else f"entries {number}–{entry['seq'] - 1} are"
                    why = f"{gone} missing before it (lines deleted or moved)"
                else:
                    why = "lines were moved or duplicated"
                return self._bad(result, number, f"line {number} holds entry {entry['seq']}: {why}")
            if entry["prev_hash"] != prev:
                if number == 1:
                    why = "line 1 does not start the chain (lines before it were deleted)"
                else:
                    why = (f"line {number} does not follow line {number - 1} "
                           f"(the chain is broken: line {number - 1} was rewritten, or lines were deleted, inserted or moved)")  # fmt: skip
                return self._bad(result, number, why)
            prev = line_hash(line)
            hashes[number] = prev
            result.entries = number
        return self._check_head(result, hashes, number)

    def _check_head(self, result: AuditVerification, hashes: dict[int, str], count: int) -> AuditVerification:
        try:
            head = json.loads(self.head_path.read_bytes())
            seq, last = int(head["seq"]), str(head["hash"])
        except FileNotFoundError:
            if count:
                result.warnings.append(
                    f"no head file ({self.head_path.name}) beside the log: lines removed from its end cannot be detected"
                )
            return result
        except (OSError, ValueError, KeyError, TypeError):
            result.warnings.append(f"the head file {self.head_path} is unreadable: lines removed from the log's end cannot be detected")
            return result
        if seq > count:
            return self._bad(
                result, count + 1,
                f"the log ends after line {count}, but entry {seq} was written: lines were removed from the end",
            )  # fmt: skip
        # A head behind the log is a crash between the two writes; it must still match its line.
        if hashes.get(seq) != last:
            return self._bad(result, seq, f"line {seq} is not the line that was written as entry {seq} (replaced)")
        return result

    @staticmethod
    def _bad(result: AuditVerification, line: int, reason: str) -> AuditVerification:
        result.ok = False
        result.first_bad_line = line
        result.reason = reason
        return result

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        try:
            with open(self.path, "rb") as f:
                yield from enumerate(f, start=1)
        except FileNotFoundError:
            return
        except OSError as err:
            raise AuditError(f"cannot read the audit log {self.path}: {err.strerror or err}") from None


def _safe_hash(entry: Mapping[str, Any]) -> str | None:
    """entry_hash, or None for content no entry could have had (NaN, written by hand)."""
    try:
        return entry_hash(entry)
    except AuditError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _last_line(fd: int, block: int = 1 << 16) -> bytes | None:
    """The last line of the open file, with its newline if it has one; None if it is empty.

    Read backwards from the end, so an append costs the same however long the log is.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    end = size
    tail = b""
    while end > 0:
        start = max(0, end - block)
        tail = os.pread(fd, end - start, start) + tail
        end = start
        # The newline that ends the previous line (not the final newline of the file).
        cut = tail.rfind(b"\n", 0, len(tail) - 1)
        if cut >= 0:
            tail = tail[cut + 1 :]
            break
    return tail


def _count_lines(fd: int, block: int = 1 << 20) -> int:
    """How many lines the file has (a last line without newline counts); for messages only."""
    size = os.fstat(fd).st_size
    newlines, offset, last = 0, 0, b"\n"
    while offset < size:
        chunk = os.pread(fd, min(block, size - offset), offset)
        if not chunk:
            break
        newlines += chunk.count(b"\n")
        last = chunk[-1:]
        offset += len(chunk)
    return newlines + (0 if last == b"\n" else 1)
