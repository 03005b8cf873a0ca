"""Batch dubbing: a manifest of (video, audio, output) rows, run resumably on one or more devices.

The pieces, in the order ``latentdub batch`` uses them:

* :mod:`~latentdub.batch.manifest`: :func:`read_manifest` parses a CSV (header row) or JSON
  Lines manifest and checks **every** row before anything runs: unknown columns, bad option
  values, missing input files, outputs that collide or cannot be written, missing or bad
  consent. All problems come back at once in one :class:`ManifestError`, each with its line
  number. :func:`probe_media` (``--check``) also opens every row's video and audio.
* :func:`~latentdub.devices.parse_devices` and :func:`load_pipelines`: one pipeline per device,
  loaded once.
* :mod:`~latentdub.batch.runner`: :class:`BatchRunner` runs the rows, one worker thread per
  pipeline, all taking rows from one shared queue in manifest order. A failing row is recorded
  and the batch goes on; cancelling stops the item in flight cleanly and starts no new one.
* :mod:`~latentdub.batch.sidecars`: after each successful row, ``OUTPUT.latentdub.json``
  records what the output was made from; a rerun skips a row whose sidecar still matches.
* :mod:`~latentdub.batch.summary`: :func:`write_summary` writes ``batch-summary.csv`` / ``.json``.

Row statuses: ``done`` (dubbed now), ``skipped`` (its sidecar matched), ``failed`` (error
recorded), ``cancelled`` (in flight when the batch was cancelled, or never started because of
it). Exit codes (:attr:`BatchReport.exit_code`): 0 all done or skipped, 3 some failed, 130
cancelled.
"""

from __future__ import annotations

from latentdub.batch.manifest import (
    CONSENT_COLUMN,
    KNOWN_COLUMNS,
    OPTION_COLUMNS,
    REQUIRED_COLUMNS,
    BatchRow,
    ManifestError,
    RowProblem,
    manifest_kind,
    probe_media,
    read_manifest,
)
from latentdub.batch.runner import (
    EXIT_CANCELLED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    STATUSES,
    BatchProgress,
    BatchReport,
    BatchRunner,
    RowCallback,
    RowResult,
    WorkerState,
    estimate_seconds,
    load_pipelines,
)
from latentdub.batch.sidecars import (
    SIDECAR_KIND,
    SIDECAR_SCHEMA,
    SIDECAR_SUFFIX,
    make_sidecar,
    model_label,
    read_sidecar,
    sidecar_mismatch,
    sidecar_path,
    weights_fingerprint,
)
from latentdub.batch.summary import SUMMARY_COLUMNS, SUMMARY_STEM, summary_paths, write_summary
from latentdub.devices import default_device, parse_devices

__all__ = [
    "CONSENT_COLUMN",
    "EXIT_CANCELLED",
    "EXIT_OK",
    "EXIT_SOME_FAILED",
    "KNOWN_COLUMNS",
    "OPTION_COLUMNS",
    "REQUIRED_COLUMNS",
    "SIDECAR_KIND",
    "SIDECAR_SCHEMA",
    "SIDECAR_SUFFIX",
    "STATUSES",
    "SUMMARY_COLUMNS",
    "SUMMARY_STEM",
    "BatchProgress",
    "BatchReport",
    "BatchRow",
    "BatchRunner",
    "ManifestError",
    "RowCallback",
    "RowProblem",
    "RowResult",
    "WorkerState",
    "default_device",
    "estimate_seconds",
    "load_pipelines",
    "make_sidecar",
    "manifest_kind",
    "model_label",
    "parse_devices",
    "probe_media",
    "read_manifest",
    "read_sidecar",
    "sidecar_mismatch",
    "sidecar_path",
    "summary_paths",
    "weights_fingerprint",
    "write_summary",
]
