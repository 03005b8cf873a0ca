"""The evaluation SyncNet file ``auxiliary/syncnet_v2.model`` (and tiny random stand-ins).

The official file is a raw ``torch.save``-d state dict (no wrapper, no dims). It is read with
:func:`~latentdub.weights.checkpoint.read_torch_file` (``weights_only``, so it cannot run code)
and loaded strictly: a missing, unexpected or mis-shaped key is a
:class:`~latentdub.errors.WeightsError` that lists it. The one exception are the BatchNorm
``num_batches_tracked`` counters: torch added them in 0.4.1 (2018), and a state dict saved
before that lacks them although its weights are complete. The official loader
(``SyncNetInstance.loadParameters`` in joonson/syncnet_python, copied by LatentSync's
``eval/syncnet/syncnet_eval.py``) copies key by key and never asks for them; they only count
training steps and play no part in an eval-mode forward pass. A file without them gets them
at torch's initial value 0; any other missing key is still refused.

A tiny random model (:func:`make_tiny_syncnet`) is written in the same raw format, plus a
sidecar ``<file>.json`` that records its dims and says ``"random_weights": true``; the loader
reads the sidecar when it exists, otherwise assumes the official dims. Scores computed with a
random model are meaningless, and the loaded model says so (``model.random_weights``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from latentdub.errors import WeightsError
from latentdub.files import atomic_path, atomic_write
from latentdub.models.syncnet import SYNCNET_V2_DIMS, TINY_SYNCNET_DIMS, SyncNet, SyncNetDims
from latentdub.weights.checkpoint import (
    listing,
    load_module_strict,
    read_torch_file,
)

log = logging.getLogger("latentdub.weights")

#: What a random SyncNet means: its scores, not a dub, are what is fake.
RANDOM_SYNCNET_WARNING = (
    "RANDOM SyncNet WEIGHTS (a make-tiny smoke-test model): the LSE-C, LSE-D and offset are "
    "meaningless"
)

#: Where the evaluation SyncNet sits in the official hub repos and weights folders.
SYNCNET_FILE = "auxiliary/syncnet_v2.model"

__all__ = [
    "SYNCNET_FILE",
    "load_syncnet",
    "make_tiny_syncnet",
    "read_syncnet_sidecar",
    "save_syncnet",
    "sidecar_path",
]

_WHAT = "SyncNet (syncnet_v2.model)"
_HINT = (
    "Expected the classic evaluation SyncNet, `auxiliary/syncnet_v2.model` from the "
    "ByteDance/LatentSync-1.5 or -1.6 hub repo (a raw state dict of 102 entries). Download it "
    "again (`latentdub weights download --syncnet`)."
)


def sidecar_path(path: str | Path) -> Path:
    """``syncnet_v2.model`` → ``syncnet_v2.model.json`` (dims and the random-weights label)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_syncnet_sidecar(path: str | Path) -> dict[str, Any]:
    """The sidecar's content, or ``{}`` when there is none (the official file has none)."""
    side = sidecar_path(path)
    if not side.exists():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightsError(f"SyncNet sidecar {side} is unreadable or not JSON ({err}).") from None
    if not isinstance(data, dict):
        raise WeightsError(f"SyncNet sidecar {side} must hold a JSON object.")
    return data


def _dims_from_sidecar(path: Path, side: Mapping[str, Any]) -> SyncNetDims:
    if "dims" not in side:
        return SYNCNET_V2_DIMS
    try:
        return SyncNetDims.from_dict(side["dims"])
    except (TypeError, ValueError) as err:
        raise WeightsError(
            f"SyncNet sidecar {sidecar_path(path)} has invalid dims ({err}); delete it to load "
            "the file as the official model."
        ) from None


_COUNTER = "num_batches_tracked"


def _with_batch_counters(state: Mapping[str, Any], dims: SyncNetDims) -> Mapping[str, Any]:
    """``state`` with every BatchNorm counter the model has and the file lacks set to 0.

    Only a counter whose layer's ``running_mean`` is in the file is filled, so a file that
    lacks a whole layer is still refused for its missing weights (and names them).
    """
    with torch.device("meta"):
        expected = SyncNet(dims).state_dict().keys()
    fill = [
        k
        for k in expected
        if k.endswith("." + _COUNTER)
        and k not in state
        and k[: -len(_COUNTER)] + "running_mean" in state
    ]
    if not fill:
        return state
    log.debug("SyncNet file lacks %d BatchNorm counters (pre-0.4.1 torch); set to 0", len(fill))
    out = dict(state)
    for k in fill:
        out[k] = torch.zeros((), dtype=torch.long)  # BatchNorm's initial value
    return out


def load_syncnet(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SyncNet:
    """Strictly load a SyncNet from a raw state-dict file, in eval mode.

    The returned module has ``random_weights`` (bool) set from the sidecar; a random model also
    logs :data:`RANDOM_SYNCNET_WARNING`.
    """
    path = Path(path)
    side = read_syncnet_sidecar(path)
    dims = _dims_from_sidecar(path, side)
    obj = read_torch_file(path, _WHAT)
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"{_WHAT} file {path} holds a {type(obj).__name__}, not a state dict. {_HINT}"
        )
    if "state_dict" in obj and not any(str(k).startswith("netcnn") for k in obj):
        inner = obj["state_dict"]
        names = [str(k) for k in inner] if isinstance(inner, Mapping) else []
        raise WeightsError(
            f"{_WHAT} file {path} is a wrapped training checkpoint ({{'state_dict': ...}} with "
            f"keys like {listing(names, 3) or '(none)'}), probably LatentSync's own "
            f"stable_syncnet.pt, which is not the evaluation model. {_HINT}"
        )
    obj = _with_batch_counters(obj, dims)
    model = load_module_strict(
        lambda: SyncNet(dims), obj, path, _WHAT, dtype=dtype, device=device, hint=_HINT
    )
    model.random_weights = bool(side.get("random_weights", False))  # type: ignore[attr-defined]
    if model.random_weights:
        log.warning("%s: %s", path, RANDOM_SYNCNET_WARNING)
    return model


def save_syncnet(
    model: SyncNet, path: str | Path, *, random_weights: bool, seed: int | None = None
) -> Path:
    """Write ``model`` as a raw state dict (the official format) plus its sidecar.

    The sidecar is always written for non-official dims or random weights, so the file loads
    back with :func:`load_syncnet`; both files are replaced atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    side = sidecar_path(path)
    if random_weights or model.dims != SYNCNET_V2_DIMS:
        info: dict[str, Any] = {
            "model": "syncnet_v2",
            "random_weights": bool(random_weights),
            "dims": model.dims.to_dict(),
        }
        if random_weights:
            info["warning"] = RANDOM_SYNCNET_WARNING
            info["seed"] = seed
        atomic_write(side, json.dumps(info, indent=1) + "\n")
    elif side.exists():
        side.unlink()
    return path


def make_tiny_syncnet(
    path: str | Path, *, seed: int = 0, dims: SyncNetDims = TINY_SYNCNET_DIMS
) -> Path:
    """Write a small, **random** SyncNet to ``path`` (raw state dict + labelled sidecar).

    For smoke tests of the evaluation path only: its LSE scores mean nothing. BatchNorm running
    statistics are randomised too, so eval-mode outputs are not trivially constant.
    """
    path = Path(path)
    side = read_syncnet_sidecar(path) if path.exists() else {}
    if path.exists() and not side.get("random_weights", False):
        raise WeightsError(
            f"{path} already exists and is not a random tiny SyncNet; refusing to overwrite it."
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SyncNet(dims)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=generator) + 0.5)
    return save_syncnet(model.eval(), path, random_weights=True, seed=seed)
