"""Resume records: the sidecar ``OUTPUT.latentdub.json`` written beside each finished output.

It records the inputs' SHA-256, the options, the consent id, the model and the output's size
and SHA-256. A rerun skips a row whose sidecar still matches all of these, without loading a
frame; a row whose inputs, options, consent or model changed, or whose output was edited or
removed, is dubbed again. The sidecar is written (atomically) after the output is in place, so
a crash in between leaves an output without a matching sidecar: it is redone, never wrongly
skipped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from latentdub.batch.manifest import BatchRow
from latentdub.errors import InputError
from latentdub.files import atomic_write, sha256_file

SIDECAR_SUFFIX = ".latentdub.json"
SIDECAR_KIND = "latentdub-batch-sidecar"
SIDECAR_SCHEMA = 1


def sidecar_path(output: Path) -> Path:
    """``clip.mp4`` → ``clip.mp4.latentdub.json`` (beside it)."""
    return output.with_name(output.name + SIDECAR_SUFFIX)


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


def result_summary(result: Any, seconds: float) -> dict[str, Any]:
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
        "output": {"path": out.name, "size": out.stat().st_size, "sha256": sha256_file(out)},
        "result": result,
    }


def write_sidecar(output: Path, sidecar: Mapping[str, Any]) -> Path:
    """Write ``sidecar`` beside ``output`` atomically (a reader never sees half of it)."""
    return atomic_write(sidecar_path(output), json.dumps(sidecar, indent=2, default=str) + "\n")


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
        wanted = row.options.to_dict()
        try:
            options = type(row.options).from_dict(sidecar["options"]).to_dict()
        except InputError:
            options = None
        if options != wanted:
            changed = sorted(k for k, v in wanted.items() if (options or {}).get(k, object()) != v)
            return f"the options changed ({', '.join(changed) or 'unreadable'})"
        if sidecar.get("consent_id") != row.consent_id:
            return "the consent record changed"
        if dict(sidecar["model"]) != dict(model):
            return "the model changed"
        if sidecar["video"]["sha256"] != sha256_file(row.video):
            return "the video changed"
        if sidecar["audio"]["sha256"] != sha256_file(row.audio):
            return "the audio changed"
        if sha256_file(out) != recorded["sha256"]:
            return "the output's content differs from the sidecar's"
    except (KeyError, TypeError, AttributeError):
        return "the sidecar is incomplete"
    except (OSError, InputError) as err:
        return f"cannot check the sidecar: {err}"
    return None
