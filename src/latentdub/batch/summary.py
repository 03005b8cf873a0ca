"""The summary of a batch: ``batch-summary.csv`` and ``.json`` of every row (status, times,
pass-through ranges, warnings, error), each written atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from latentdub.batch.runner import BatchReport, RowResult
from latentdub.files import atomic_write

SUMMARY_STEM = "batch-summary"
SUMMARY_COLUMNS = (
    "line", "status", "video", "audio", "output", "device", "seconds", "duration_s", "frames", "dubbed_frames",
    "passthrough_ranges", "warnings", "error", "note", "options",
)


def summary_paths(target: str | Path) -> tuple[Path, Path]:
    """``PATH`` (with or without .csv/.json) → (``PATH.csv``, ``PATH.json``)."""
    p = Path(target).expanduser()
    stem = p.with_suffix("") if p.suffix.lower() in (".csv", ".json") else p
    return stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")


def write_summary(report: BatchReport, target: str | Path, *, manifest: Path | None = None) -> tuple[Path, Path]:
    """Write the CSV and the JSON summary of ``report`` (each atomically); returns their paths."""
    csv_path, json_path = summary_paths(target)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in report.rows:
        writer.writerow(_csv_row(r))
    data = report.to_dict()
    data["manifest"] = str(manifest) if manifest is not None else None
    data["summary"] = {"csv": str(csv_path), "json": str(json_path)}
    atomic_write(csv_path, buffer.getvalue())
    atomic_write(json_path, json.dumps(data, indent=2, default=str) + "\n")
    return csv_path, json_path


def _csv_row(r: RowResult) -> dict[str, object]:
    return {
        "line": r.line, "status": r.status, "video": r.video, "audio": r.audio, "output": r.output,
        "device": r.device, "seconds": f"{r.seconds:.3f}",
        "duration_s": "" if r.duration_s is None else r.duration_s,
        "frames": "" if r.frames is None else r.frames,
        "dubbed_frames": "" if r.dubbed_frames is None else r.dubbed_frames,
        "passthrough_ranges": "; ".join(
            f"{p.get('start_s', 0):.2f}-{p.get('end_s', 0):.2f} s: {p.get('reason', '')}" for p in r.passthrough_ranges
        ),
        "warnings": " | ".join(r.warnings), "error": r.error, "note": r.note,
        "options": json.dumps(r.options, sort_keys=True) if r.options else "",
    }
