"""Which files make up a LatentSync model, and where they are.

A version ("1.5" or "1.6"; "1.0" for local folders) is resolved to a :class:`ModelFiles`
either from a local folder in the official layout (:mod:`latentdub.weights.layout`) or from
the Hugging Face hub (through its cache, see :mod:`latentdub.weights.hub`).

1.5 and 1.6 checkpoints have identical keys and shapes (1.6 is 1.5 retrained at 512 px), so
a file cannot tell which it is: the version — and with it the face resolution (256 / 512) —
comes from the caller, or from ``latentdub.json`` when ``latentdub weights download --dir``
recorded it.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentdub.errors import WeightsError
from latentdub.files import atomic_write
from latentdub.weights.checkpoint import converted_is_fresh, log
from latentdub.weights.hub import (
    TINY_HINT,
    _download_message,
    _hub_cached,
    _hub_files,
    _hub_wanted,
    _tidy_on_failure,
    hub_cache_dir,
)
from latentdub.weights.layout import (
    CONFIG_FILE,
    DEFAULT_VERSION,
    HUB_REPOS,
    HUB_VERSIONS,
    LAYOUT_HELP,
    RESOLUTIONS,
    SUPPORTED_VERSIONS,
    UNET_FILE,
    UNET_FP16_FILE,
    VAE_FILES,
    VAE_REPO,
    VAE_SUBDIRS,
    WHISPER_FILE,
    WHISPER_FP16_FILE,
)
from latentdub.weights.syncnet import SYNCNET_FILE, read_syncnet_sidecar


@dataclass(frozen=True)
class ModelFiles:
    """The files of one model and what is needed to build it.

    ``unet`` / ``whisper`` are the official files (or the converted ones when only those
    exist); ``unet_fp16`` / ``whisper_fp16`` are the up-to-date fp16 safetensors written by
    ``latentdub weights convert``, if any. The loaders pick per dtype (see :meth:`unet_file`).
    """

    version: str
    unet: Path
    whisper: Path
    vae_dir: Path
    resolution: int
    unet_config: dict[str, Any] = field(repr=False)
    random_weights: bool = False
    source: str = ""
    unet_fp16: Path | None = None
    whisper_fp16: Path | None = None

    @property
    def label(self) -> str:
        """What the model is, for people: "LatentSync 1.6 (512 px)", or for ``make-tiny``
        output "tiny random model (1.6 layout, 256 px) — not a real dub"."""
        return model_label(self.version, self.resolution, self.random_weights)

    def unet_file(self, dtype: torch.dtype) -> Path:
        """The UNet file to read for inference in ``dtype``.

        16-bit inference reads the converted fp16 safetensors (half the bytes, no unpickling,
        the values casting the fp32 file would give). fp32 reads the official file: widening
        fp16 back would be slower and would lose the weights' low bits.
        """
        if self.unet_fp16 is not None and dtype in (torch.float16, torch.bfloat16):
            return self.unet_fp16
        return self.unet

    def whisper_file(self) -> Path:
        """The Whisper file to read: the converted one when present (lossless: the official
        tiny.pt is fp16 already)."""
        return self.whisper_fp16 or self.whisper

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (paths as strings), with the label."""
        out = asdict(self)
        for key in ("unet", "whisper", "vae_dir", "unet_fp16", "whisper_fp16"):
            out[key] = None if out[key] is None else str(out[key])
        out["label"] = self.label
        return out


def model_label(version: str, resolution: int, random_weights: bool) -> str:
    """The human name of a model (see :attr:`ModelFiles.label`)."""
    if random_weights:
        # Only `make-tiny` writes random weights; the version is just the file layout then.
        return f"tiny random model ({version} layout, {resolution} px) — not a real dub"
    return f"LatentSync {version} ({resolution} px)"


# --------------------------------------------------------------------------------------------
# versions and configs


def check_version(version: str, *, hub: bool = False) -> str:
    """Normalise and validate a version string ("1.6", "v1.6", "1.6.0" → "1.6")."""
    v = str(version).strip().lower().removeprefix("v")
    v = v[:-2] if v.endswith(".0") and v.count(".") == 2 else v
    allowed = HUB_VERSIONS if hub else SUPPORTED_VERSIONS
    if v in SUPPORTED_VERSIONS and v not in allowed:
        raise WeightsError(
            f"LatentSync {v} weights are not fetched automatically: put its latentsync_unet.pt "
            "and whisper/tiny.pt in a folder and pass the folder with --weights."
        )
    if v not in allowed:
        raise WeightsError(
            f"unknown LatentSync version {version!r}: expected one of {', '.join(allowed)}"
        )
    return v


def official_unet_config(version: str) -> dict[str, Any]:
    """The official ``model:`` config of a version (1.0 = 1.5 without motion modules)."""
    from latentdub.models.unet import unet_config

    if version == "1.0":
        try:
            return copy.deepcopy(unet_config("1.0"))
        except (KeyError, ValueError):
            # Derived per the 1.0 `second_stage.yaml`: same layout, no temporal layers.
            cfg = copy.deepcopy(unet_config("1.5"))
            cfg["use_motion_module"] = False
            cfg.setdefault("motion_module_kwargs", {})["temporal_position_encoding_max_len"] = 16
            return cfg
    return copy.deepcopy(unet_config(version))


# --------------------------------------------------------------------------------------------
# latentdub.json


def read_folder_config(folder: Path) -> dict[str, Any]:
    """``DIR/latentdub.json`` (``{}`` when absent), validated."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path} is not valid JSON ({err}); fix or delete it.") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} must hold a JSON object; fix or delete it.")
    checks: dict[str, type | tuple[type, ...]] = {
        "version": str,
        "resolution": int,
        "unet_config": dict,
        "random_weights": bool,
    }
    for key, kind in checks.items():
        if key in data and not isinstance(data[key], kind):
            raise WeightsError(f"{path}: {key!r} has the wrong type ({type(data[key]).__name__}).")
    if "resolution" in data and (data["resolution"] <= 0 or data["resolution"] % 8):
        raise WeightsError(f"{path}: resolution must be a positive multiple of 8.")
    if "version" in data:
        data["version"] = check_version(data["version"])
    return data


def write_folder_config(folder: Path, data: dict[str, Any]) -> Path:
    """Write ``DIR/latentdub.json`` atomically (a reader never sees half of it)."""
    return atomic_write(folder / CONFIG_FILE, json.dumps(data, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# local folders


def _pick(
    official: Path, converted: Path, prefer_converted: bool
) -> tuple[Path | None, Path | None]:
    """(main file, up-to-date converted file) for one component."""
    fresh = None
    if converted.is_file() and (prefer_converted or not official.exists()):
        if converted_is_fresh(converted, official):
            fresh = converted
        else:
            log.warning(
                "ignoring %s: %s changed after it was converted (re-run `latentdub weights "
                "convert`)",
                converted,
                official.name,
            )
    return (official if official.is_file() else fresh), fresh


def find_local_vae(folder: Path) -> Path | None:
    """The first VAE folder of the documented search order that holds a config.json."""
    for sub in VAE_SUBDIRS:
        candidate = folder / sub
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _resolve_local(
    folder: Path, version: str | None, *, download: bool, prefer_converted: bool
) -> ModelFiles:
    folder = folder.expanduser()
    if not folder.exists():
        raise WeightsError(f"weights folder {folder} does not exist.")
    if not folder.is_dir():
        raise WeightsError(
            f"--weights must be a folder in the official layout, but {folder} is a file. "
            f"Expected:\n{LAYOUT_HELP}"
        )
    folder = folder.resolve()
    cfg = read_folder_config(folder)
    recorded = cfg.get("version")
    if version is not None and recorded is not None and version != recorded:
        raise WeightsError(
            f"{folder} holds LatentSync {recorded} weights (per {CONFIG_FILE}) but version "
            f"{version} was requested; pass --version {recorded}, or use a folder with {version} "
            "weights."
        )
    version = version or recorded or DEFAULT_VERSION

    unet, unet_fp16 = _pick(folder / UNET_FILE, folder / UNET_FP16_FILE, prefer_converted)
    whisper, whisper_fp16 = _pick(
        folder / WHISPER_FILE, folder / WHISPER_FP16_FILE, prefer_converted
    )
    missing = [name for name, path in ((UNET_FILE, unet), (WHISPER_FILE, whisper)) if path is None]
    if missing:
        raise WeightsError(
            f"weights folder {folder} is missing {' and '.join(missing)}. Expected the official "
            f"layout:\n{LAYOUT_HELP}\nFill it with `latentdub weights download --version "
            f"{version if version in HUB_VERSIONS else DEFAULT_VERSION} --dir {folder}`."
        )
    assert unet is not None and whisper is not None

    vae_dir = find_local_vae(folder)
    source = f"local folder {folder}"
    if vae_dir is None:
        # The official checkpoints/ folder has no VAE: LatentSync fetches it from the hub.
        vae_dir = _hub_files(version, download=download, components=("vae",))["vae"]
        source += " (VAE from the Hugging Face cache)"

    unet_config = cfg.get("unet_config") or official_unet_config(version)
    return ModelFiles(
        version=version,
        unet=unet,
        whisper=whisper,
        vae_dir=vae_dir,
        resolution=int(cfg.get("resolution", RESOLUTIONS[version])),
        unet_config=unet_config,
        random_weights=bool(cfg.get("random_weights", False)),
        source=source,
        unet_fp16=unet_fp16,
        whisper_fp16=whisper_fp16,
    )


def _resolve_hub(
    version: str,
    *,
    download: bool,
    message: Callable[[str, list[tuple[str, str]], str, Path], str] | None = None,
) -> ModelFiles:
    version = check_version(version, hub=True)
    files = _hub_files(version, download=download, message=message)
    return ModelFiles(
        version=version,
        unet=files["unet"],
        whisper=files["whisper"],
        vae_dir=files["vae"],
        resolution=RESOLUTIONS[version],
        unet_config=official_unet_config(version),
        random_weights=False,
        source=f"Hugging Face cache ({HUB_REPOS[version]}, {VAE_REPO})",
    )


# --------------------------------------------------------------------------------------------
# public


def resolve_weights(
    version: str | None = DEFAULT_VERSION,
    weights_dir: str | Path | None = None,
    *,
    download: bool = True,
    prefer_converted: bool = True,
) -> ModelFiles:
    """Resolve a LatentSync version to its files.

    With ``weights_dir``, files come from that local folder (see :mod:`latentdub.weights.layout`
    for the layout); ``version=None`` then means "the version recorded in its latentdub.json, else
    1.6". Without it, they come from the Hugging Face cache, downloaded first if missing and
    ``download`` is true. Nothing is loaded here. Raises WeightsError with instructions when
    something is missing.
    """
    if version is not None:
        version = check_version(version, hub=weights_dir is None)
    if weights_dir is not None:
        return _resolve_local(
            Path(weights_dir), version, download=download, prefer_converted=prefer_converted
        )
    return _resolve_hub(version or DEFAULT_VERSION, download=download)


_VERSION_LIKE = re.compile(r"v?\d+(\.\d+){0,2}", re.IGNORECASE)


def resolve_version_or_folder(
    version_or_dir: str | os.PathLike[str],
    *,
    version: str | None = None,
    download: bool = True,
    prefer_converted: bool = True,
) -> ModelFiles:
    """Resolve what a user gave as "the model": a version ("1.5", "1.6") or a weights folder.

    An existing path, a ``Path`` object or anything that is not version-like ("1.6", "v1.6",
    "1.7") is a folder; a folder that does not exist is reported as such, not as an unknown
    version. ``version`` applies to a folder (``None``: the one recorded in its latentdub.json,
    else 1.6); ``download`` to the hub files only: a folder is used as it is.
    """
    text = os.fspath(version_or_dir)
    is_path = isinstance(version_or_dir, os.PathLike) or not _VERSION_LIKE.fullmatch(text.strip())
    if Path(text).expanduser().exists() or is_path:
        folder = Path(text).expanduser()
        if not folder.exists():
            bare = not isinstance(version_or_dir, os.PathLike) and not any(c in text for c in "/\\.~")
            also = f" (and {text!r} is not a LatentSync version: use 1.5 or 1.6)" if bare else ""
            raise WeightsError(
                f"weights folder {text} does not exist{also}; check the path, or fill it with "
                f"`latentdub weights download --dir {text}`.\n{TINY_HINT}"
            )
        return resolve_weights(version, folder, download=False, prefer_converted=prefer_converted)
    return resolve_weights(text.strip(), download=download, prefer_converted=prefer_converted)


def download_weights(
    version: str = DEFAULT_VERSION, dest_dir: str | Path | None = None, *, syncnet: bool = False
) -> ModelFiles:
    """Download a version's files: into ``dest_dir`` in the official layout (plus the VAE in
    ``dest_dir/sd-vae-ft-mse`` and a latentdub.json recording the version), or into the
    Hugging Face cache when ``dest_dir`` is None. Already complete files are not fetched again.
    ``syncnet`` also fetches the evaluation SyncNet (``auxiliary/syncnet_v2.model``, 55 MB).
    """
    version = check_version(version, hub=True)
    components = ("unet", "whisper", "vae", "syncnet") if syncnet else ("unet", "whisper", "vae")
    if dest_dir is None:
        if syncnet:
            _hub_files(version, download=True, components=components, message=_download_message)
        return _resolve_hub(version, download=True, message=_download_message)
    dest = Path(dest_dir).expanduser()
    if dest.exists() and not dest.is_dir():
        raise WeightsError(f"--dir {dest} is a file; give a folder.")
    recorded = read_folder_config(dest).get("version") if dest.is_dir() else None
    if recorded is not None and recorded != version:
        raise WeightsError(
            f"{dest} already holds LatentSync {recorded} weights; download {version} into "
            "another folder (1.5 and 1.6 files have the same names)."
        )
    with _tidy_on_failure(dest):
        dest.mkdir(parents=True, exist_ok=True)
        _hub_files(
            version, download=True, local_dir=dest, components=components, message=_download_message
        )
    cfg = read_folder_config(dest)
    cfg.update({"version": version, "source": f"{HUB_REPOS[version]} + {VAE_REPO}"})
    write_folder_config(dest, cfg)
    return _resolve_local(dest, version, download=False, prefer_converted=True)


@dataclass(frozen=True)
class SyncNetFile:
    """Where the evaluation SyncNet comes from (see :func:`resolve_syncnet`)."""

    path: Path
    source: str
    random_weights: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "source": self.source, "random_weights": self.random_weights}


def _syncnet_missing_message(
    version: str,
    failed: list[tuple[str, str]],
    reason: str,
    cache_dir: Path,
    *,
    folder: Path | None = None,
) -> str:
    v = version if version in HUB_VERSIONS else DEFAULT_VERSION
    where = f"is not in {folder / SYNCNET_FILE} and not" if folder is not None else "is not"
    repos = sorted({repo for repo, _ in failed}) or [HUB_REPOS[v]]
    return (
        f"The evaluation SyncNet ({SYNCNET_FILE}, needed for the lip-sync scores LSE-C / "
        f"LSE-D) {where} available from the Hugging Face hub: {reason}.\n"
        f"It is the classic SyncNet shipped in {' and '.join(repos)} (cache: {cache_dir}).\n"
        "Get it with one of:\n"
        f"  - latentdub weights download --version {v} --syncnet            (into the Hugging "
        "Face cache; `latentdub eval` then finds it)\n"
        f"  - latentdub weights download --version {v} --syncnet --dir DIR  (then pass --weights "
        "DIR)\n"
        "  - or copy syncnet_v2.model from that repository to DIR/auxiliary/syncnet_v2.model "
        "and pass --weights DIR (or --syncnet FILE)\n"
        "(Downloading needs network access; a token in HF_TOKEN is used if set.)"
    )


def resolve_syncnet(
    version: str | None = DEFAULT_VERSION,
    weights_dir: str | Path | None = None,
    *,
    download: bool = True,
) -> SyncNetFile:
    """Find the evaluation SyncNet file ``auxiliary/syncnet_v2.model``.

    With ``weights_dir``: ``DIR/auxiliary/syncnet_v2.model`` (the official ``checkpoints/``
    layout; ``make-tiny`` writes a random one there). When the folder has none, or without a
    folder, it comes from the Hugging Face cache of the version's hub repo (downloaded first if
    missing and ``download`` is true), exactly like the model weights. Raises WeightsError
    saying how to get it. Nothing is loaded here (see :func:`latentdub.weights.syncnet.
    load_syncnet`).
    """

    folder: Path | None = None
    if weights_dir is not None:
        folder = Path(weights_dir).expanduser()
        if not folder.exists():
            raise WeightsError(f"weights folder {folder} does not exist.")
        if not folder.is_dir():
            raise WeightsError(f"--weights must be a folder, but {folder} is a file.")
        folder = folder.resolve()
        candidate = folder / SYNCNET_FILE
        if candidate.is_file():
            side = read_syncnet_sidecar(candidate)
            return SyncNetFile(
                candidate, f"local folder {folder}", bool(side.get("random_weights", False))
            )
        if version is None:
            version = read_folder_config(folder).get("version")
    v = version or DEFAULT_VERSION
    v = v if v in HUB_VERSIONS else DEFAULT_VERSION  # a 1.0 folder: the file is the same

    def message(ver: str, failed: list[tuple[str, str]], reason: str, cache: Path) -> str:
        return _syncnet_missing_message(ver, failed, reason, cache, folder=folder)

    path = _hub_files(
        check_version(v, hub=True), download=download, components=("syncnet",), message=message
    )["syncnet"]
    return SyncNetFile(path, f"Hugging Face cache ({HUB_REPOS[v]})", False)


def weights_status(weights_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """What is present, without downloading or loading anything.

    One entry per hub version (1.5, 1.6) for the Hugging Face cache, plus one for
    ``weights_dir`` if given. Each entry: version, where ("hf-cache" / "folder"), location,
    unet / whisper / vae (path or None), syncnet (the evaluation SyncNet's path or None; not
    needed for dubbing, so not part of "complete"), converted (fp16 safetensors in use),
    random_weights, complete, and error (a message, or None).
    """
    entries: list[dict[str, Any]] = []
    cache_dir = hub_cache_dir()
    for version in HUB_VERSIONS:
        paths = {
            component: _hub_cached(repo, filename, cache_dir)
            for component, repo, filename in _hub_wanted(version, ("unet", "whisper"))
        }
        vae_hits = [_hub_cached(VAE_REPO, name, cache_dir) for name in VAE_FILES]
        vae = vae_hits[0].parent if all(vae_hits) and vae_hits[0] is not None else None
        syncnet = _hub_cached(HUB_REPOS[version], SYNCNET_FILE, cache_dir)
        entries.append(
            {
                "version": version,
                "where": "hf-cache",
                "location": str(cache_dir),
                "unet": str(paths["unet"]) if paths["unet"] else None,
                "whisper": str(paths["whisper"]) if paths["whisper"] else None,
                "vae": str(vae) if vae else None,
                "syncnet": str(syncnet) if syncnet else None,
                "converted": False,
                "random_weights": False,
                "complete": all(paths.values()) and vae is not None,
                "error": None,
            }
        )
    if weights_dir is not None:
        folder = Path(weights_dir).expanduser()
        entry: dict[str, Any] = {
            "version": None,
            "where": "folder",
            "location": str(folder),
            "unet": None,
            "whisper": None,
            "vae": None,
            "syncnet": None,
            "converted": False,
            "random_weights": False,
            "complete": False,
            "error": None,
        }
        if (folder / SYNCNET_FILE).is_file():
            entry["syncnet"] = str(folder / SYNCNET_FILE)
        try:
            files = _resolve_local(folder, None, download=False, prefer_converted=True)
        except WeightsError as err:
            entry["error"] = str(err)
            if folder.is_dir():
                entry["unet"] = str(folder / UNET_FILE) if (folder / UNET_FILE).is_file() else None
                entry["whisper"] = (
                    str(folder / WHISPER_FILE) if (folder / WHISPER_FILE).is_file() else None
                )
                vae_dir = find_local_vae(folder)
                entry["vae"] = str(vae_dir) if vae_dir else None
        else:
            entry.update(
                version=files.version,
                unet=str(files.unet),
                whisper=str(files.whisper),
                vae=str(files.vae_dir),
                converted=files.unet_fp16 is not None,
                random_weights=files.random_weights,
                complete=True,
            )
        entries.append(entry)
    return entries
