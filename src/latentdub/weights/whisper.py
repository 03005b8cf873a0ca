"""Whisper checkpoint files: OpenAI's ``tiny.pt`` and the converted ``.safetensors``.

Reading goes through :mod:`latentdub.weights.checkpoint` (``weights_only`` torch files,
bounds-checked safetensors), so no file can run code and every unusable file becomes a
:class:`~latentdub.errors.WeightsError` that names it. The encoder itself lives in
:mod:`latentdub.models.whisper`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latentdub.errors import WeightsError
from latentdub.models.whisper import WhisperDims, WhisperEncoder, encoder_state_dict_shapes
from latentdub.weights.checkpoint import (
    is_safetensors,
    listing,
    read_safetensors,
    read_torch_file,
    save_safetensors_atomic,
)

log = logging.getLogger("latentdub.weights")

__all__ = ["load_whisper_checkpoint", "read_whisper_checkpoint", "save_whisper_safetensors"]

# Every parameter name OpenAI's text decoder has; used to recognise (and knowingly skip) it.
_DECODER_KEY = re.compile(
    r"decoder\.(?:positional_embedding|token_embedding\.weight|ln\.(?:weight|bias)"
    r"|blocks\.\d+\.(?:(?:attn|cross_attn)\.(?:query|key|value|out)\.(?:weight|bias)"
    r"|(?:attn_ln|cross_attn_ln|mlp_ln)\.(?:weight|bias)|mlp\.[02]\.(?:weight|bias)))"
)
_LIST_LIMIT = 12
_WHAT = "Whisper"


def _read_openai_checkpoint(path: Path) -> tuple[WhisperDims, dict[str, Tensor]]:
    """``{"dims": ..., "model_state_dict": ...}`` (OpenAI's ``tiny.pt``) → dims + encoder dict."""
    obj = read_torch_file(path, _WHAT)
    if not isinstance(obj, Mapping) or "model_state_dict" not in obj or "dims" not in obj:
        raise WeightsError(_not_whisper_message(path, obj))
    try:
        dims = WhisperDims.from_dict(obj["dims"])
    except (TypeError, ValueError) as err:
        raise WeightsError(
            f"{path} is not a usable Whisper checkpoint: its 'dims' entry is invalid ({err})."
        ) from None
    state = obj["model_state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(
            f"{path} is not a usable Whisper checkpoint: 'model_state_dict' is a "
            f"{type(state).__name__}, not a mapping of tensors."
        )
    return dims, _split_full_state_dict(path, dims, state)


def _not_whisper_message(path: Path, obj: object) -> str:
    if isinstance(obj, Mapping):
        inner = obj.get("state_dict", obj)
        names = [str(k) for k in inner] if isinstance(inner, Mapping) else []
        if any(n.startswith(("down_blocks.", "up_blocks.", "conv_in.")) for n in names):
            found = "it looks like a LatentSync U-Net checkpoint"
        elif any(n.startswith("encoder.conv1") for n in names):
            found = "it holds Whisper-like weights but no 'dims' entry"
        else:
            keys = listing([str(k) for k in obj], _LIST_LIMIT)
            found = f"its top-level keys are {keys or '(none)'}"
    else:
        found = f"it holds a {type(obj).__name__}"
    return (
        f"{path} is not an OpenAI Whisper checkpoint: expected a dict with 'dims' and "
        f"'model_state_dict' (the format of OpenAI's tiny.pt), but {found}. Point the Whisper "
        "path at checkpoints/whisper/tiny.pt."
    )


def _split_full_state_dict(
    path: Path, dims: WhisperDims, state: Mapping[str, Any]
) -> dict[str, Tensor]:
    """Keep ``encoder.*`` (prefix stripped); verify and skip the decoder; reject anything else."""
    encoder: dict[str, Tensor] = {}
    decoder: list[str] = []
    foreign: list[str] = []
    for key, value in state.items():
        name = str(key)
        if name.startswith("encoder."):
            encoder[name.removeprefix("encoder.")] = value
        elif _DECODER_KEY.fullmatch(name):
            decoder.append(name)
        else:
            foreign.append(name)
    if foreign:
        raise WeightsError(
            f"{path} does not look like a Whisper checkpoint: unexpected keys outside the "
            f"encoder/decoder: {listing(sorted(foreign), _LIST_LIMIT)}."
        )
    embedding = state.get("decoder.token_embedding.weight")
    expected = (dims.n_vocab, dims.n_text_state)
    if isinstance(embedding, Tensor) and tuple(embedding.shape) != expected:
        raise WeightsError(
            f"{path} is inconsistent: decoder.token_embedding.weight has shape "
            f"{list(embedding.shape)} but its dims say {list(expected)}."
        )
    log.debug("%s: skipped %d decoder tensors (only the encoder is used)", path, len(decoder))
    return encoder


def _read_converted(path: Path) -> tuple[WhisperDims, dict[str, Tensor]]:
    """A converted encoder: tensors (with or without ``encoder.``) + ``dims`` JSON metadata."""
    state, metadata = read_safetensors(path, _WHAT)
    if "dims" not in metadata:
        raise WeightsError(
            f"{path} has no 'dims' metadata, so it is not a Whisper encoder written by "
            "latentdub weights convert; convert OpenAI's tiny.pt again."
        )
    try:
        dims = WhisperDims.from_dict(json.loads(metadata["dims"]))
    except (TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise WeightsError(f"{path} has invalid 'dims' metadata ({err}).") from None
    if any(key.startswith(("encoder.", "decoder.")) for key in state):
        return dims, _split_full_state_dict(path, dims, state)
    return dims, state


def _check_encoder_state(path: Path, dims: WhisperDims, state: Mapping[str, Any]) -> None:
    """Strict key / shape / dtype check with one message listing every problem."""
    expected = encoder_state_dict_shapes(dims)
    problems: list[str] = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing encoder keys: {listing(missing, _LIST_LIMIT)}")
    if unexpected:
        problems.append(f"unexpected encoder keys: {listing(unexpected, _LIST_LIMIT)}")
    wrong: list[str] = []
    bad_dtype: list[str] = []
    for key in sorted(set(expected) & set(state)):
        value = state[key]
        if not isinstance(value, Tensor) or not value.is_floating_point():
            bad_dtype.append(f"{key} ({getattr(value, 'dtype', type(value).__name__)})")
        elif tuple(value.shape) != expected[key]:
            wrong.append(f"{key} {list(value.shape)} (expected {list(expected[key])})")
    if wrong:
        problems.append(f"wrong shapes: {listing(wrong, _LIST_LIMIT)}")
    if bad_dtype:
        problems.append(f"not floating-point tensors: {listing(bad_dtype, _LIST_LIMIT)}")
    if problems:
        raise WeightsError(
            f"{path} does not fit a Whisper encoder with its own dims "
            f"(n_mels {dims.n_mels}, width {dims.n_audio_state}, {dims.n_audio_layer} layers): "
            + "; ".join(problems)
            + ". The file is damaged or not an OpenAI Whisper checkpoint."
        )


def read_whisper_checkpoint(
    path: str | os.PathLike[str],
) -> tuple[WhisperDims, dict[str, Tensor]]:
    """The dims and the (strictly checked) encoder state dict of a Whisper file, either
    OpenAI's ``tiny.pt`` format or a converted ``.safetensors`` (recognised by content too)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"Whisper checkpoint {path} does not exist or is not a file. Download OpenAI's "
            "tiny.pt (LatentSync's checkpoints/whisper/tiny.pt) or pass the right path."
        )
    try:
        converted = is_safetensors(path)
    except OSError as err:
        raise WeightsError(f"Cannot read {path}: {err.strerror or err}.") from None
    dims, state = _read_converted(path) if converted else _read_openai_checkpoint(path)
    _check_encoder_state(path, dims, state)
    return dims, state


def load_whisper_checkpoint(path: str | os.PathLike[str]) -> WhisperEncoder:
    """Load the audio encoder from OpenAI's ``tiny.pt`` format or a converted ``.safetensors``.

    The decoder is recognised and skipped; the encoder keys must match exactly (strict). The
    model is returned in float32 (fp16 file weights are widened, like the official) in eval
    mode; ``encoder.dims`` holds the file's dimensions. Every unusable file raises
    :class:`WeightsError` naming it.
    """
    path = Path(path)
    dims, state = read_whisper_checkpoint(path)
    # Built on the meta device and filled by assignment: no time spent on a random init that
    # the file overwrites anyway. fp16 file weights are widened to fp32, like the official.
    with torch.device("meta"):
        encoder = WhisperEncoder(dims)
    fp32_state = {key: value.to(torch.float32) for key, value in state.items()}
    encoder.load_state_dict(fp32_state, strict=True, assign=True)  # shapes already verified
    # min/max propagate NaN and expose inf; far cheaper than isfinite() on fp16 CPU tensors.
    non_finite = [
        key
        for key, value in encoder.state_dict().items()
        if not all(math.isfinite(v) for v in torch.aminmax(value))
    ]
    if non_finite:
        raise WeightsError(
            f"{path} is damaged: NaN or infinite values in {listing(non_finite, _LIST_LIMIT)}. "
            "Re-download the Whisper checkpoint."
        )
    return encoder.eval()


def save_whisper_safetensors(
    encoder: WhisperEncoder,
    dims: WhisperDims,
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float16,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``encoder``'s state dict (keys without ``encoder.``) with ``dims`` as JSON metadata
    (plus ``metadata``), atomically: an interrupted write never leaves a half file at ``path``.
    """
    if dims != encoder.dims:
        raise ValueError(f"dims {dims} do not describe this encoder ({encoder.dims})")
    tensors = {key: value.to(dtype=dtype) for key, value in encoder.state_dict().items()}
    meta = {"format": "pt", "dims": json.dumps(dims.to_dict()), **(metadata or {})}
    save_safetensors_atomic(tensors, Path(path), meta)
