"""Safe, strict reading of checkpoint files and loading them into modules.

Everything here turns the many ways a weights file can be wrong (empty, truncated, a pickle
that wants to run code, the wrong model, stale conversions) into one
:class:`~latentdub.errors.WeightsError` that names the file and says what to do. Only
``torch.load(weights_only=True)`` and safetensors are ever used, so no file can execute code.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch
from torch import nn

from latentdub.errors import WeightsError
from latentdub.files import atomic_path

log = logging.getLogger("latentdub.weights")

RANDOM_WEIGHTS_WARNING = "RANDOM WEIGHTS (smoke-test model) — output is not a real dub"

# Metadata keys written into converted safetensors files to tie them to their source.
META_SOURCE_NAME = "latentdub_source"
META_SOURCE_SIZE = "latentdub_source_size"
META_SOURCE_MTIME = "latentdub_source_mtime_ns"

M = TypeVar("M", bound=nn.Module)

_LIST_LIMIT = 10


def listing(items: list[str], limit: int = _LIST_LIMIT) -> str:
    """``a, b, c … and 7 more``: long key lists stay readable in an error message."""
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    return shown + (f" … and {more} more" if more > 0 else "")


def short_reason(err: BaseException) -> str:
    """One informative line of a low-level error (torch's are paragraphs of advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    # weights_only failures on damaged bytes name the bad opcode on a later line.
    return next((ln for ln in lines if ln.startswith("Unsupported operand")), lines[0])[:200]


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise WeightsError(f"{what} file not found: {path}")
    if path.is_dir():
        raise WeightsError(f"{what}: expected a file but {path} is a folder")
    if path.stat().st_size == 0:
        raise WeightsError(
            f"{what} file {path} is empty (0 bytes) — probably an interrupted download or copy. "
            "Delete it and download it again (`latentdub weights download`)."
        )


def is_safetensors(path: Path) -> bool:
    """By suffix, else by content (renamed files): safetensors = u64 header length + JSON;
    torch's zip format starts with "PK", legacy pickles with the protocol byte 0x80."""
    if path.suffix.lower() == ".safetensors":
        return True
    with path.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def read_torch_file(path: Path, what: str) -> Any:
    """``torch.load`` restricted to plain tensors/containers (never runs code from the file).

    Zip-format files (everything ``torch.save`` wrote since torch 1.6) are memory-mapped, so a
    5 GB checkpoint is not copied into RAM before the model takes its tensors.
    """
    path = Path(path)
    _check_readable(path, what)
    mmap = zipfile.is_zipfile(path)  # legacy (non-zip) pickles cannot be memory-mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError/...
        message = str(err)
        # weights_only names the first class/function it refused ("GLOBAL posix.system");
        # its "Unsupported operand" failures are just damaged bytes.
        blocked = re.search(r"GLOBAL (\S+)", message)
        if blocked or (
            "Weights only load failed" in message and "Unsupported operand" not in message
        ):
            detail = f" (it references {blocked.group(1)})" if blocked else ""
            raise WeightsError(
                f"Refusing to load {what} file {path}: it contains Python objects that would "
                f"run code when loaded{detail}. latentdub only loads plain tensors. Use the "
                "official file from the Hugging Face hub (`latentdub weights download`)."
            ) from None
        raise WeightsError(
            f"{what} file {path} could not be read: it is truncated or corrupt, or not a "
            f"PyTorch checkpoint ({short_reason(err)}). Delete it and download it again "
            "(`latentdub weights download`)."
        ) from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_header(fh: BinaryIO, size: int) -> tuple[dict[str, Any], dict[str, str], int]:
    """Tensor entries, string metadata and data offset of a safetensors file (u64 length +
    JSON header), bounds-checked."""
    head = fh.read(8)
    header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
    if header_len <= 0 or 8 + header_len > size:
        raise ValueError("invalid header length")
    header = json.loads(fh.read(header_len))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    return header, {str(k): str(v) for k, v in metadata.items()}, 8 + header_len


def _parse_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors as zero-copy views of a private memory map of the file (like ``torch.load``
    with ``mmap=True``): loading a 2.4 GB UNet costs page-cache reads, not a second copy."""
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        header, metadata, base = _read_header(fh, size)
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write, writable
    tensors: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        shape = [int(n) for n in info["shape"]]
        start, end = (int(n) for n in info["data_offsets"])
        count = math.prod(shape)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if end - start != nbytes or start < 0 or base + end > size:
            raise ValueError(f"tensor {key!r} does not fit in the file")
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start)
            tensors[key] = flat.view(shape)
    return tensors, metadata


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (memory-mapped, copy-on-write) and the string metadata of a safetensors
    file, with bounds checked so a truncated file is an error rather than a crash."""
    path = Path(path)
    _check_readable(path, what)
    try:
        return _parse_safetensors(path)
    except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError) as err:
        raise WeightsError(
            f"{what} file {path} is not a readable safetensors file: it is truncated or corrupt "
            f"({short_reason(err)}). Delete it and create it again (`latentdub weights convert`) "
            "or download the original."
        ) from None


def read_safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of the header only (cheap); ``None`` when the file is unreadable."""
    try:
        with Path(path).open("rb") as fh:
            return _read_header(fh, os.fstat(fh.fileno()).st_size)[1]
    except (ValueError, OSError, UnicodeDecodeError):
        return None


def _titled(title: str, items: list[str]) -> str:
    return f"  {len(items)} {title}: {listing(items)}"


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    found: Mapping[str, torch.Tensor],
    path: Path,
    what: str,
    hint: str = "",
) -> None:
    """Raise a WeightsError listing missing, unexpected and mis-shaped keys (the official
    loader silently ignores them, which hides wrong or damaged files)."""
    not_tensors = [k for k, v in found.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(
            f"{what} file {path} is not a state dict of tensors: "
            + _titled("entries are not tensors", not_tensors).strip()
            + ". It is not a model checkpoint of the expected kind."
        )
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k} (file {list(found[k].shape)}, model {list(expected[k])})"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{what} file {path} does not fit the model it is meant for:"]
    if missing:
        lines.append(_titled("missing keys (in the model, not in the file)", missing))
    if unexpected:
        lines.append(_titled("unexpected keys (in the file, not in the model)", unexpected))
    if wrong:
        lines.append(_titled("keys with the wrong shape", wrong))
    lines.append(
        hint
        or "It is a different model or a damaged file; download the official weights again "
        "(`latentdub weights download`)."
    )
    raise WeightsError("\n".join(lines))


def load_module_strict(
    factory: Callable[[], M],
    state_dict: Mapping[str, torch.Tensor],
    path: Path,
    what: str,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    hint: str = "",
) -> M:
    """Build a module and fill it from ``state_dict``, strictly.

    The module is created on the meta device (no memory, no random init: for the 1.27 B
    parameter UNet that init alone takes ~18 s of CPU, the meta build ~1 s) and the
    checkpoint's (memory-mapped) tensors are assigned into it, so nothing is copied twice and
    a wrong file is rejected before any real allocation. (The first meta build in a process
    pays a one-time ~1-2 s for torch's meta-kernel imports.) A module whose ``__init__``
    cannot run on meta, or that keeps non-persistent buffers (which a checkpoint cannot
    provide), is built normally, so the result is always complete.
    """
    model: M | None = None
    try:
        with torch.device("meta"):
            model = factory()
    except Exception:  # an __init__ that computes with real values: build it normally
        log.debug("meta-device build failed; building %s normally", what, exc_info=True)
    if model is None:
        try:
            model = factory()
        except (ValueError, KeyError, TypeError) as err:  # an invalid configuration
            raise WeightsError(
                f"cannot build the {what} for {path} from its configuration: {err}. If the "
                "folder has a latentdub.json with a model config, fix or remove that entry."
            ) from None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state_dict, path, what, hint)

    volatile = any(name not in expected for name, _ in model.named_buffers())
    if volatile and any(t.is_meta for t in model.buffers()):
        model = factory()
    # The module takes the checkpoint's tensors as they are (memory-mapped, any dtype);
    # the cast below brings them to one dtype and device.
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    # nn.Module.to, not diffusers' override, which warns spuriously on every dtype cast.
    nn.Module.to(model, device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def converted_is_fresh(converted: Path, source: Path) -> bool:
    """Whether ``converted`` (a safetensors file written by ``convert``) may stand in for
    ``source``.

    A converted file records the size and mtime of the file it was made from. It is used
    when the source is gone (the user kept only the compact file), or when the source still
    has the recorded size and has not been modified after the conversion (a copied folder
    changes mtimes but keeps their order). Anything else means the source was replaced: the
    converted file is stale and ignored.
    """
    if not converted.is_file():
        return False
    if not source.exists():
        return True
    meta = read_safetensors_metadata(converted)
    if meta is None:
        return False
    src = source.stat()
    recorded_size = meta.get(META_SOURCE_SIZE)
    if recorded_size is not None and recorded_size != str(src.st_size):
        return False
    if meta.get(META_SOURCE_MTIME) == str(src.st_mtime_ns):
        return True
    return src.st_mtime_ns <= converted.stat().st_mtime_ns


def source_metadata(source: Path) -> dict[str, str]:
    """Metadata that ties a converted file to ``source`` (see :func:`converted_is_fresh`)."""
    st = source.stat()
    return {
        META_SOURCE_NAME: source.name,
        META_SOURCE_SIZE: str(st.st_size),
        META_SOURCE_MTIME: str(st.st_mtime_ns),
    }


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]
) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves a half file
    that would later be mistaken for a good conversion. The file gets the usual umask mode
    (safetensors itself creates it 0600)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata=dict(metadata),
        )
