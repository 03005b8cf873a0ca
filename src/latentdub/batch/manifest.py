"""The manifest: parse a CSV (header row) or JSON Lines file and check every row up front.

:func:`read_manifest` returns checked :class:`BatchRow` objects or raises one
:class:`ManifestError` that lists every problem with its line number: unknown columns, bad
option values, missing input files, outputs that collide or cannot be written, missing or bad
consent. :func:`probe_media` (``batch --check``) also opens every row's video and audio.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from latentdub.errors import InputError
from latentdub.files import OUTPUT_EXTENSIONS, check_input_file, check_output, check_writable_folder
from latentdub.options import DubOptions, read_option_files

REQUIRED_COLUMNS = ("video", "audio", "output")
CONSENT_COLUMN = "consent"
#: The option columns of plain :class:`DubOptions`; a manifest read with ``base_options`` of a
#: subclass also accepts that subclass's fields.
OPTION_COLUMNS = tuple(DubOptions.model_fields)
KNOWN_COLUMNS = (*REQUIRED_COLUMNS, CONSENT_COLUMN, *OPTION_COLUMNS)


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


@dataclass(frozen=True)
class _Columns:
    """The columns a manifest may have: the fixed ones and the option fields of its options class."""

    options: tuple[str, ...]

    @property
    def known(self) -> tuple[str, ...]:
        return (*REQUIRED_COLUMNS, CONSENT_COLUMN, *self.options)

    def unknown_message(self, names: Iterable[str]) -> str:
        names = list(names)
        return (
            f"unknown column{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in names)}; the columns are "
            f"{', '.join(REQUIRED_COLUMNS)}, optional {CONSENT_COLUMN}, and options: {', '.join(self.options)}"
        )


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
    checked by the caller); a row with neither is bad. Option columns (the fields of
    ``base_options``' class) override ``base_options`` (default: :class:`DubOptions` defaults);
    empty CSV cells and JSON ``null`` mean "not set".
    """
    manifest = Path(path).expanduser()
    check_input_file(manifest, "manifest (CSV or JSON Lines)")
    try:
        text = manifest.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports add a BOM
    except UnicodeDecodeError:
        raise InputError(f"manifest {manifest} is not UTF-8 text") from None
    except OSError as err:
        raise InputError(f"cannot read manifest {manifest}: {err.strerror or err}") from None

    base = base_options or DubOptions()
    columns = _Columns(tuple(type(base).model_fields))
    problems: list[RowProblem] = []
    if manifest_kind(manifest, text) == "jsonl":
        records = _parse_jsonl(text, columns, problems)
    else:
        records = _parse_csv(text, columns, problems)
    if not records and not problems:
        raise InputError(f"manifest {manifest} has no rows (expected columns: {', '.join(REQUIRED_COLUMNS)})")

    base_dir = manifest.resolve().parent
    out_dir = Path(outdir).expanduser().resolve() if outdir is not None else base_dir
    consent_cache: dict[str, Any] = {}
    rows: list[BatchRow] = []
    files: list[tuple[int, dict[str, Path]]] = []  # every row's paths, bad rows' too
    for line, values in records:
        paths: dict[str, Path] = {}
        row = _check_row(
            len(rows), line, values, base_dir=base_dir, out_dir=out_dir, base=base, columns=columns,
            default_consent=default_consent, consent_cache=consent_cache, problems=problems, paths=paths,
        )
        files.append((line, paths))
        if row is not None:
            rows.append(row)

    _check_collisions(files, problems)
    if problems:
        raise ManifestError(manifest, sorted(problems, key=lambda p: p.line))
    return rows


def probe_media(rows: Sequence[BatchRow]) -> list[RowProblem]:
    """Open every row's video and audio as ``dub`` does before loading a model, cheaply: the
    video's header and first frame, the audio's container and stream list (nothing decoded
    whole). Returns the problems; a file used by several rows is opened once."""
    from latentdub.media.reader import check_video, probe_video

    seen: dict[tuple[str, Path], str | None] = {}

    def problem(kind: str, path: Path, probe: Callable[[Path], None]) -> str | None:
        if (kind, path) not in seen:
            try:
                probe(path)
                seen[kind, path] = None
            except InputError as err:
                seen[kind, path] = f"{kind}: {err}"
        return seen[kind, path]

    def video(path: Path) -> None:
        check_video(probe_video(path), path)

    problems: list[RowProblem] = []
    for row in rows:
        for kind, path, probe in (("video", row.video, video), ("audio", row.audio, _probe_audio)):
            message = problem(kind, path, probe)
            if message is not None:
                problems.append(RowProblem(row.line, message))
    return problems


def _probe_audio(path: Path) -> None:
    """Raise :class:`InputError` unless FFmpeg opens ``path`` and finds an audio stream in it."""
    import av

    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as err:
        reason = (getattr(err, "strerror", None) or str(err)).strip().rstrip(".") or type(err).__name__
        raise InputError(f"{path} is not an audio or video file FFmpeg can read ({reason})") from None
    with container:
        if not container.streams.audio:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
            raise InputError(f"{path} has no audio stream (it contains {kinds})")


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


def _parse_csv(text: str, columns: _Columns, problems: list[RowProblem]) -> list[tuple[int, dict[str, Any]]]:
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
    names = [_column(c) for c in header]
    if not _check_columns(names, columns, problems):
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
            if len(cells) > len(names):
                problems.append(RowProblem(line, f"{len(cells)} cells but the header has {len(names)} columns"))
            else:
                records.append((line, {c: v.strip() for c, v in zip(names, cells, strict=False) if v.strip()}))
        line = reader.line_num + 1
    return records


def _parse_jsonl(text: str, columns: _Columns, problems: list[RowProblem]) -> list[tuple[int, dict[str, Any]]]:
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
        records.append((number, _jsonl_values(number, data, columns, problems)))
    return records


def _jsonl_values(number: int, data: dict[str, Any], columns: _Columns, problems: list[RowProblem]) -> dict[str, Any]:
    """One JSON object's values by column; a nested ``options`` object counts as columns too."""
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
    bad = [k for k in values if k not in columns.known]
    for name in bad:
        values.pop(name)
    if bad:
        problems.append(RowProblem(number, columns.unknown_message(bad)))
    return values


def _check_columns(names: list[str], columns: _Columns, problems: list[RowProblem]) -> bool:
    ok = True
    unknown = [c for c in names if c and c not in columns.known]
    if unknown:
        problems.append(RowProblem(1, columns.unknown_message(unknown)))
        ok = False
    if "" in names:
        problems.append(RowProblem(1, "the header has an empty column name"))
        ok = False
    twice = sorted({c for c in names if c and names.count(c) > 1})
    if twice:
        problems.append(RowProblem(1, f"column{'s' if len(twice) > 1 else ''} given twice: {', '.join(twice)}"))
        ok = False
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        problems.append(RowProblem(1, f"missing column{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"))
        ok = False
    return ok


def _check_row(
    index: int,
    line: int,
    values: dict[str, Any],
    *,
    base_dir: Path,
    out_dir: Path,
    base: DubOptions,
    columns: _Columns,
    default_consent: Any,
    consent_cache: dict[str, Any],
    problems: list[RowProblem],
    paths: dict[str, Path],
) -> BatchRow | None:
    """The checked row, or None after adding its problems; ``paths`` gets its resolved paths."""
    count = len(problems)

    def bad(message: str) -> None:
        problems.append(RowProblem(line, message))

    _row_paths(values, base_dir, out_dir, paths, bad)
    for name in ("video", "audio"):
        if name in paths:
            try:
                check_input_file(paths[name], name)
            except InputError as err:
                bad(f"{name}: {err}")
    if "output" in paths:
        inputs = [paths[n] for n in ("video", "audio") if n in paths]
        try:
            _check_output(paths["output"], inputs)
        except InputError as err:
            bad(str(err))

    overrides = {k: v for k, v in values.items() if k in columns.options}
    options: DubOptions | None = None
    try:
        # A file option (segments) is a path relative to the manifest.
        options = base.replace(**read_option_files(type(base), overrides, base_dir=base_dir))
    except InputError as err:  # OptionError, or a file option that cannot be read
        bad(f"option {err}")

    consent = _row_consent(values.get(CONSENT_COLUMN), base_dir, default_consent, consent_cache, bad)
    if len(problems) > count or options is None or consent is None:
        return None
    resolved = options.to_dict()
    return BatchRow(
        index=index, line=line, video=paths["video"], audio=paths["audio"], output=paths["output"],
        options=options, overrides={k: resolved[k] for k in overrides}, consent=consent,
    )


def _row_paths(
    values: Mapping[str, Any], base_dir: Path, out_dir: Path, paths: dict[str, Path], bad: Callable[[str], None]
) -> None:
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


def _check_output(out: Path, inputs: Sequence[Path]) -> None:
    """The checks ``dub`` gives its output, except that missing folders are allowed: the batch
    creates them, so the nearest existing one must be a writable folder."""
    if out.parent.is_dir():
        check_output(out, *inputs)
        return
    if out.suffix.lower() not in OUTPUT_EXTENSIONS:
        check_output(out, extensions=OUTPUT_EXTENSIONS)  # raises the extension message
    ancestor = out.parent
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"output {out}: {ancestor} is a file, not a folder")
    check_writable_folder(ancestor, for_=out)


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


def _check_collisions(files: list[tuple[int, dict[str, Path]]], problems: list[RowProblem]) -> None:
    """No two rows may write the same file, and no output may be any row's input.

    By resolved path, since most outputs do not exist yet (``files.same_file`` needs both).
    """
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
        if key in inputs and inputs[key] != line:  # its own inputs: check_output said so already
            problems.append(RowProblem(line, f"output {output} is an input of line {inputs[key]}"))


def _key(path: Path) -> str:
    # resolve() follows symlinks, so two spellings of one file collide; normcase for Windows.
    return os.path.normcase(str(path.resolve()))
