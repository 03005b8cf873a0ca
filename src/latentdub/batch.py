"""Batch dubbing: a manifest of (video, audio, output) rows, run resumably on one or more devices.

The pieces, in the order ``latentdub batch`` uses them:

* :func:`read_manifest` parses a CSV (header row) or JSON Lines manifest and checks **every** row
  before anything runs: unknown columns, bad option values, missing input files, outputs that
  collide, missing or bad consent. All problems come back at once in one
  :class:`ManifestError`, each with its line number.
* :func:`parse_devices` and :func:`load_pipelines`: one pipeline per device, loaded once.
* :class:`BatchRunner` runs the rows: one worker thread per pipeline, all taking rows from one
  shared queue in manifest order. So every worker runs its rows in manifest order, and a fast
  device simply takes more rows (no round-robin stalls behind a long clip).
* After each successful row, a sidecar ``OUTPUT.latentdub.json`` (written atomically) records
  the inputs' SHA-256, the options, the consent id, the model and the output's size and SHA-256.
  A rerun skips a row whose sidecar still matches all of these, without loading a frame; a row
  whose inputs, options, consent or model changed, or whose output was edited or removed, is
  dubbed again. The sidecar is written after the output is in place, so a crash in between
  leaves an output without a (matching) sidecar: it is redone, never wrongly skipped.
* A failing row (bad media, a bug, out of memory) is recorded with its error and the batch goes
  on. Cancelling (the ``cancel`` event, Ctrl-C in the CLI) stops the item in flight cleanly
  (no partial file) and starts no new one: at most that item is lost.
* :func:`write_summary` writes ``batch-summary.csv`` / ``.json`` of every row (status, times,
  pass-through ranges, warnings, error).

Row statuses: ``done`` (dubbed now), ``skipped`` (its sidecar matched), ``failed`` (error
recorded), ``cancelled`` (in flight when the batch was cancelled, or never started because of
it). Exit codes (:attr:`BatchReport.exit_code`): 0 all done or skipped, 3 some failed, 130
cancelled.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from latentdub.errors import Cancelled, InputError, LatentdubError
from latentdub.options import DubOptions, OptionError
from latentdub.progress import CancelToken, ProgressEvent

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".latentdub.json"
SIDECAR_KIND = "latentdub-batch-sidecar"
SIDECAR_SCHEMA = 1
SUMMARY_STEM = "batch-summary"

REQUIRED_COLUMNS = ("video", "audio", "output")
CONSENT_COLUMN = "consent"
OPTION_COLUMNS = tuple(DubOptions.model_fields)
KNOWN_COLUMNS = (*REQUIRED_COLUMNS, CONSENT_COLUMN, *OPTION_COLUMNS)

EXIT_OK = 0
EXIT_SOME_FAILED = 3
EXIT_CANCELLED = 130

STATUSES = ("done", "skipped", "failed", "cancelled")
_PENDING = "pending"  # internal: not reached yet

__all__ = [
    "BatchProgress",
    "BatchReport",
    "BatchRow",
    "BatchRunner",
    "ManifestError",
    "RowProblem",
    "RowResult",
    "load_pipelines",
    "model_label",
    "parse_devices",
    "read_manifest",
    "sidecar_path",
    "write_summary",
]


# ==============================================================================================
# The manifest
# ==============================================================================================
@dataclass(frozen=True)
class RowProblem:
    """One thing wrong with one manifest line (line 1 of a CSV is its header)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class ManifestError(InputError):
    """The manifest cannot be run: every problem, each with its line number, nothing ran."""

    def __init__(self, manifest: Path, problems: Sequence[RowProblem]) -> None:
        self.manifest = manifest
        self.problems = list(problems)
        bad_lines = sorted({p.line for p in self.problems})
        head = (
            f"manifest {manifest}: {len(bad_lines)} bad line{'s' if len(bad_lines) != 1 else ''} "
            "(nothing was run):"
        )
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": str(self.manifest), "errors": [asdict(p) for p in self.problems]}


@dataclass(frozen=True)
class BatchRow:
    """One checked manifest row, paths resolved, options and consent parsed."""

    index: int  # 0-based position among the rows
    line: int  # where it starts in the manifest file (1-based)
    video: Path
    audio: Path
    output: Path
    options: DubOptions  # the base options with this row's overrides applied
    overrides: dict[str, Any]  # just what the row set itself (converted: CSV "1" → 1)
    consent: Any  # latentdub.provenance.consent.ConsentRecord

    @property
    def consent_id(self) -> str:
        return str(getattr(self.consent, "id", "") or "")


def read_manifest(
    path: str | Path,
    *,
    outdir: str | Path | None = None,
    default_consent: Any = None,
    base_options: DubOptions | None = None,
) -> list[BatchRow]:
    """Parse and check a manifest; raise :class:`ManifestError` listing every bad line.

    ``video`` / ``audio`` (and a ``consent`` file path) relative to the manifest's folder;
    ``output`` relative to ``outdir`` when given, else to the manifest's folder. A row without a
    ``consent`` value uses ``default_consent`` (anything ``parse_consent`` takes, already
    checked by the caller); a row with neither is bad. Option columns override
    ``base_options`` (default: :class:`DubOptions` defaults); empty CSV cells and JSON ``null``
    mean "not set".
    """
    from latentdub.media.files import check_input_file

    manifest = Path(path).expanduser()
    check_input_file(manifest, "manifest (CSV or JSON Lines)")
    try:
        text = manifest.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports add a BOM
    except UnicodeDecodeError:
        raise InputError(f"manifest {manifest} is not UTF-8 text") from None
    except OSError as err:
        raise InputError(f"cannot read manifest {manifest}: {err.strerror or err}") from None

    kind = manifest_kind(manifest, text)
    problems: list[RowProblem] = []
    records = _parse_jsonl(text, problems) if kind == "jsonl" else _parse_csv(text, problems)
    if not records and not problems:
        raise InputError(f"manifest {manifest} has no rows (expected columns: {', '.join(REQUIRED_COLUMNS)})")

    base_dir = manifest.resolve().parent
    out_dir = Path(outdir).expanduser().resolve() if outdir is not None else base_dir
    base = base_options or DubOptions()
    consent_cache: dict[str, Any] = {}
    rows: list[BatchRow] = []
    files: list[tuple[int, dict[str, Path]]] = []  # every row's paths, bad rows' too
    for line, values in records:
        paths: dict[str, Path] = {}
        row = _check_row(
            len(rows), line, values, base_dir=base_dir, out_dir=out_dir, base=base,
            default_consent=default_consent, consent_cache=consent_cache, problems=problems, paths=paths,
        )
        files.append((line, paths))
        if row is not None:
            rows.append(row)

    _check_outputs(files, problems)
    if problems:
        raise ManifestError(manifest, sorted(problems, key=lambda p: p.line))
    return rows


def manifest_kind(path: Path, text: str) -> str:
    """``"csv"`` or ``"jsonl"``: by extension, else by the first non-blank character."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    first = text.lstrip()[:1]
    return "jsonl" if first in ("{", "[") else "csv"


def _column(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _parse_csv(text: str, problems: list[RowProblem]) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a CSV with a header line, as (start line, {column: value}); empty cells dropped."""
    # The delimiter is whichever of , ; TAB the header uses most (spreadsheets in some locales
    # export ";"); quoting stays Excel's, so JSON consent cells with doubled quotes work.
    header_line = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=header_line.count)
    reader = csv.reader(io.StringIO(text, newline=""), csv.excel, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as err:
        problems.append(RowProblem(1, f"the header is not valid CSV: {err}"))
        return []
    columns = [_column(c) for c in header]
    if not _check_columns(columns, problems):
        return []
    records: list[tuple[int, dict[str, Any]]] = []
    line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            problems.append(RowProblem(line, f"not valid CSV: {err}"))
            break
        if any(c.strip() for c in cells):  # blank lines are allowed between rows
            if len(cells) > len(columns):
                problems.append(RowProblem(line, f"{len(cells)} cells but the header has {len(columns)} columns"))
            else:
                records.append((line, {c: v.strip() for c, v in zip(columns, cells, strict=False) if v.strip()}))
        line = reader.line_num + 1
    return records


def _parse_jsonl(text: str, problems: list[RowProblem]) -> list[tuple[int, dict[str, Any]]]:
    """Objects of a JSON Lines file, as (line, {key: value}); blank and ``#`` lines skipped."""
    if text.lstrip().startswith("["):
        first = text[: len(text) - len(text.lstrip())].count("\n") + 1
        problems.append(RowProblem(first, "a JSON array; give JSON Lines instead: one JSON object per line"))
        return []
    records: list[tuple[int, dict[str, Any]]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as err:
            problems.append(RowProblem(number, f"not valid JSON: {err.msg} at column {err.colno}"))
            continue
        if not isinstance(data, dict):
            problems.append(RowProblem(number, f"must be a JSON object, not {type(data).__name__}"))
            continue
        values: dict[str, Any] = {}
        nested = data.pop("options", None)
        if nested is not None and not isinstance(nested, dict):
            problems.append(RowProblem(number, "options must be an object of option names to values"))
            nested = None
        for key, value in [*data.items(), *(nested or {}).items()]:
            name = _column(str(key))
            if name in values:
                problems.append(RowProblem(number, f"{name} is given twice"))
            if value is None:
                continue
            values[name] = value
        bad = [k for k in values if k not in KNOWN_COLUMNS]
        for name in bad:
            values.pop(name)
        if bad:
            problems.append(RowProblem(number, _unknown_message(bad)))
        records.append((number, values))
    return records


def _check_columns(columns: list[str], problems: list[RowProblem]) -> bool:
    ok = True
    unknown = [c for c in columns if c and c not in KNOWN_COLUMNS]
    if unknown:
        problems.append(RowProblem(1, _unknown_message(unknown)))
        ok = False
    if "" in columns:
        problems.append(RowProblem(1, "the header has an empty column name"))
        ok = False
    twice = sorted({c for c in columns if c and columns.count(c) > 1})
    if twice:
        problems.append(RowProblem(1, f"column{'s' if len(twice) > 1 else ''} given twice: {', '.join(twice)}"))
        ok = False
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        problems.append(RowProblem(1, f"missing column{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"))
        ok = False
    return ok


def _unknown_message(names: Iterable[str]) -> str:
    names = list(names)
    return (
        f"unknown column{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in names)}; the columns are "
        f"{', '.join(REQUIRED_COLUMNS)}, optional {CONSENT_COLUMN}, and options: {', '.join(OPTION_COLUMNS)}"
    )


def _check_row(
    index: int,
    line: int,
    values: dict[str, Any],
    *,
    base_dir: Path,
    out_dir: Path,
    base: DubOptions,
    default_consent: Any,
    consent_cache: dict[str, Any],
    problems: list[RowProblem],
    paths: dict[str, Path],
) -> BatchRow | None:
    """The checked row, or None after adding its problems; ``paths`` gets its resolved paths."""
    from latentdub.media.files import OUTPUT_EXTENSIONS, check_input_file

    count = len(problems)

    def bad(message: str) -> None:
        problems.append(RowProblem(line, message))

    for name in REQUIRED_COLUMNS:
        value = values.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            bad(f"{name} is missing")
            continue
        if not isinstance(value, str):
            bad(f"{name} must be a path (text), got {value!r}")
            continue
        p = Path(value.strip()).expanduser()
        paths[name] = (out_dir if name == "output" else base_dir) / p if not p.is_absolute() else p
    for name in ("video", "audio"):
        if name in paths:
            try:
                check_input_file(paths[name], name)
            except InputError as err:
                bad(f"{name}: {err}")
    if "output" in paths:
        out = paths["output"]
        if out.suffix.lower() not in OUTPUT_EXTENSIONS:
            bad(f"output {out} must end in {', '.join(OUTPUT_EXTENSIONS)}")
        elif out.is_dir():
            bad(f"output {out} is a folder")
        else:
            ancestor = _existing_ancestor(out.parent)
            if not ancestor.is_dir():
                bad(f"output {out}: {ancestor} is a file, not a folder")

    overrides = {k: v for k, v in values.items() if k in OPTION_COLUMNS}
    options: DubOptions | None = None
    try:
        options = base.replace(**overrides)
    except OptionError as err:
        bad(f"option {err}")

    consent = _row_consent(values.get(CONSENT_COLUMN), base_dir, default_consent, consent_cache, bad)
    if len(problems) > count or options is None or consent is None:
        return None
    resolved = options.to_dict()
    return BatchRow(
        index=index, line=line, video=paths["video"], audio=paths["audio"], output=paths["output"],
        options=options, overrides={k: resolved[k] for k in overrides}, consent=consent,
    )


def _row_consent(
    value: Any, base_dir: Path, default: Any, cache: dict[str, Any], bad: Callable[[str], None]
) -> Any:
    from latentdub.provenance.consent import parse_consent

    if value is None:
        if default is None:
            bad("no consent record: give a consent column (JSON text or a .json file) or --consent for every row")
            return None
        try:
            return parse_consent(default)
        except InputError as err:
            bad(f"consent (the default --consent): {err}")
            return None
    source: Any = value
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith(("{", "[")):
            p = Path(text).expanduser()
            source = p if p.is_absolute() else base_dir / p
    elif not isinstance(value, Mapping):
        bad(f"consent must be a JSON object, JSON text or a file path, got {value!r}")
        return None
    key = json.dumps(source, sort_keys=True, default=str)
    if key not in cache:
        try:
            cache[key] = parse_consent(source)
        except InputError as err:
            cache[key] = err
    parsed = cache[key]
    if isinstance(parsed, InputError):
        bad(f"consent: {parsed}")
        return None
    return parsed


def _existing_ancestor(folder: Path) -> Path:
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def _check_outputs(files: list[tuple[int, dict[str, Path]]], problems: list[RowProblem]) -> None:
    """No two rows may write the same file, and no output may be any row's input."""
    first: dict[str, int] = {}
    inputs: dict[str, int] = {}
    for line, paths in files:
        for name in ("video", "audio"):
            if name in paths:
                inputs.setdefault(_key(paths[name]), line)
    for line, paths in files:
        output = paths.get("output")
        if output is None:
            continue
        key = _key(output)
        if key in first:
            problems.append(RowProblem(line, f"output {output} is also the output of line {first[key]}"))
        else:
            first[key] = line
        if key in inputs:
            problems.append(RowProblem(line, f"output {output} is an input of line {inputs[key]}"))


def _key(path: Path) -> str:
    # resolve() follows symlinks, so two spellings of one file collide; normcase for Windows.
    return os.path.normcase(str(path.resolve()))


# ==============================================================================================
# Devices and models
# ==============================================================================================
def default_device() -> str:
    """The first GPU when there is one (CUDA, then Apple MPS), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda:0"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def parse_devices(text: str | None) -> list[str]:
    """``"cuda:0,cuda:1"`` → ``["cuda:0", "cuda:1"]``, each checked to exist on this machine.

    None or blank: the one :func:`default_device`. A bare ``cuda`` means ``cuda:0``.
    """
    import torch

    if text is None or not text.strip():
        return [default_device()]
    devices: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            raise InputError(f"--devices {text!r} has an empty entry; give a comma-separated list such as cuda:0,cuda:1")
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise InputError(f"--devices: unknown device {raw.strip()!r}; use cpu, cuda:N or mps") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise InputError(
                    f"--devices: {name} was requested but this machine has no CUDA GPU that torch can use; "
                    "use --devices cpu"
                )
            count = torch.cuda.device_count()
            index = 0 if device.index is None else device.index
            if index >= count:
                have = ", ".join(f"cuda:{i}" for i in range(count))
                raise InputError(f"--devices: {name} does not exist; this machine has {count} CUDA GPU(s): {have}")
            name = f"cuda:{index}"
        elif device.type == "mps":
            if not torch.backends.mps.is_available():
                raise InputError("--devices: mps was requested but Apple MPS is not available; use --devices cpu")
            name = "mps"
        elif device.type == "cpu":
            name = "cpu"
        else:
            raise InputError(f"--devices: {name!r} is not supported; use cpu, cuda:N or mps")
        if name in devices:
            raise InputError(f"--devices lists {name} twice; each device gets one worker with its own model")
        devices.append(name)
    return devices


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


def model_label(pipe: Any) -> dict[str, Any]:
    """What identifies the model in a sidecar: name, version, resolution, dtype, weights fingerprint.

    Not the device (a dub done on ``cuda:1`` is as good on a rerun that uses ``cuda:0``) and not
    the weights' source text (the hub path reads differently when it comes from the cache).
    """
    info = dict(getattr(pipe, "model_info", {}) or {})
    label = {k: info.get(k) for k in ("name", "version", "resolution", "random_weights", "dtype")}
    label["fingerprint"] = weights_fingerprint(pipe)
    return label


def weights_fingerprint(pipe: Any, sample: int = 4096) -> str:
    """A short hash of the loaded weights: every parameter's name and shape, and the first
    ``sample`` values of a few of them. Tells two models apart (another version, another
    random seed, another precision) in milliseconds, without hashing gigabytes of files."""
    import torch

    digest = hashlib.sha256()
    for name in ("unet", "vae", "audio_encoder"):
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            continue
        params = list(module.named_parameters())
        for pname, p in params:
            digest.update(f"{name}.{pname}:{tuple(p.shape)}:{p.dtype};".encode())
        picks = params[:3] + params[len(params) // 2 : len(params) // 2 + 1] + params[-3:]
        for _, p in picks:
            values = p.detach().reshape(-1)[:sample].to("cpu").contiguous()
            digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


# ==============================================================================================
# Sidecars
# ==============================================================================================
def sidecar_path(output: Path) -> Path:
    """``clip.mp4`` → ``clip.mp4.latentdub.json`` (beside it)."""
    return output.with_name(output.name + SIDECAR_SUFFIX)


def _sha256(path: Path) -> str:
    from latentdub.provenance.c2pa import sha256_file

    return sha256_file(path)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _result_summary(result: Any, seconds: float) -> dict[str, Any]:
    """The part of a DubResult a sidecar and the summary keep."""
    return {
        "seconds": round(seconds, 3),
        "duration_s": result.duration_s,
        "frames": result.frames,
        "dubbed_frames": result.dubbed_frames,
        "fps": result.fps,
        "width": result.width,
        "height": result.height,
        "passthrough_ranges": list(result.passthrough_ranges),
        "warnings": list(result.warnings),
        "timings": dict(result.timings),
    }


def make_sidecar(
    row: BatchRow, *, video_sha256: str, audio_sha256: str, model: dict[str, Any], result: dict[str, Any]
) -> dict[str, Any]:
    from latentdub import __version__

    out = row.output
    return {
        "kind": SIDECAR_KIND,
        "schema": SIDECAR_SCHEMA,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "latentdub": __version__,
        "video": {"path": str(row.video), "sha256": video_sha256},
        "audio": {"path": str(row.audio), "sha256": audio_sha256},
        "options": row.options.to_dict(),
        "consent_id": row.consent_id,
        "model": model,
        "output": {"path": out.name, "size": out.stat().st_size, "sha256": _sha256(out)},
        "result": result,
    }


def read_sidecar(output: Path) -> dict[str, Any] | None:
    """The sidecar of ``output``, or None when there is none or it is not a readable sidecar."""
    path = sidecar_path(output)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("kind") != SIDECAR_KIND:
        return None
    return data


def sidecar_mismatch(row: BatchRow, sidecar: Mapping[str, Any], model: Mapping[str, Any]) -> str | None:
    """Why ``row`` must be dubbed again despite its ``sidecar`` (None: it matches, skip it).

    Cheap checks first; the SHA-256 of the inputs and the output last.
    """
    try:
        if sidecar.get("schema") != SIDECAR_SCHEMA:
            return f"sidecar schema {sidecar.get('schema')!r} is not {SIDECAR_SCHEMA}"
        out = row.output
        if not out.is_file():
            return "the output is missing"
        recorded = sidecar["output"]
        if out.stat().st_size != recorded["size"]:
            return "the output's size differs from the sidecar's"
        try:
            options = DubOptions.from_dict(sidecar["options"]).to_dict()
        except InputError:
            options = None
        if options != row.options.to_dict():
            changed = sorted(k for k, v in row.options.to_dict().items() if (options or {}).get(k, object()) != v)
            return f"the options changed ({', '.join(changed) or 'unreadable'})"
        if sidecar.get("consent_id") != row.consent_id:
            return "the consent record changed"
        if dict(sidecar["model"]) != dict(model):
            return "the model changed"
        if sidecar["video"]["sha256"] != _sha256(row.video):
            return "the video changed"
        if sidecar["audio"]["sha256"] != _sha256(row.audio):
            return "the audio changed"
        if _sha256(out) != recorded["sha256"]:
            return "the output's content differs from the sidecar's"
    except (KeyError, TypeError, AttributeError):
        return "the sidecar is incomplete"
    except (OSError, InputError) as err:
        return f"cannot check the sidecar: {err}"
    return None


# ==============================================================================================
# Running
# ==============================================================================================
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
        from latentdub.pipeline import read_inputs

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
            row.output.parent.mkdir(parents=True, exist_ok=True)
            inputs = read_inputs(row.video, row.audio, row.output)
            start = time.perf_counter()
            result = pipe.dub(
                inputs, row.options, consent=row.consent, progress=self._on_event(worker, index), cancel=self.cancel,
            )
            summary = _result_summary(result, time.perf_counter() - start)
            with self._lock:
                self._workers[worker].stage = "sidecar"
            try:
                side = make_sidecar(row, video_sha256=inputs.video_sha256, audio_sha256=inputs.audio_sha256,
                                    model=model, result=summary)
                _write_atomic(sidecar_path(row.output), json.dumps(side, indent=2, default=str) + "\n")
            except (OSError, InputError) as err:
                return {"status": "failed", "note": note, **_row_fields(summary),
                        "error": f"the output was written, but not its sidecar {sidecar_path(row.output)} "
                                 f"(a rerun will dub it again): {getattr(err, 'strerror', None) or err}"}
            return {"status": "done", "note": note, "error": "", **_row_fields(summary)}
        except Cancelled:
            return {"status": "cancelled", "note": "interrupted in flight: no output was written", "error": ""}
        except LatentdubError as err:
            return {"status": "failed", "error": str(err), "note": note}
        except Exception as err:  # a bug or a device failure (e.g. out of memory): record it, go on
            log.debug("row at line %d failed", row.line, exc_info=True)
            _release_device_memory(pipe)
            return {"status": "failed", "error": f"internal error: {type(err).__name__}: {err}", "note": note}

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


# ==============================================================================================
# The summary
# ==============================================================================================
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
        writer.writerow({
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
        })
    data = report.to_dict()
    data["manifest"] = str(manifest) if manifest is not None else None
    data["summary"] = {"csv": str(csv_path), "json": str(json_path)}
    _write_atomic(csv_path, buffer.getvalue())
    _write_atomic(json_path, json.dumps(data, indent=2, default=str) + "\n")
    return csv_path, json_path
