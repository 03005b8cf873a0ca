"""Device names: the one parser that the pipeline, the CLI, eval and batch call.

``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"`` are accepted and checked against this machine,
so a wrong device fails before any model loads, with a message saying what to use instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from latentdub.errors import InputError

if TYPE_CHECKING:
    import torch


def default_device() -> str:
    """The first GPU when there is one (CUDA, then Apple MPS), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda:0"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def parse_device(name: str | torch.device, *, flag: str = "device") -> torch.device:
    """``name`` as a ``torch.device`` that exists here; :class:`InputError` otherwise.

    ``flag`` names the setting in messages (``"--devices"``). A CUDA index is checked against
    the GPUs torch sees; a bare ``cuda`` stays ``cuda`` (the current GPU).
    """
    import torch

    try:
        device = torch.device(name.strip().lower() if isinstance(name, str) else name)
    except (RuntimeError, TypeError):
        raise InputError(f"{flag}: unknown device {str(name).strip()!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"{flag}: {device} was requested but this machine has no CUDA GPU that torch can use; use cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            have = ", ".join(f"cuda:{i}" for i in range(count))
            raise InputError(f"{flag}: {device} does not exist; this machine has {count} CUDA GPU(s): {have}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"{flag}: mps was requested but Apple MPS is not available; use cpu")
    elif device.type != "cpu":
        raise InputError(f"{flag}: {str(name)!r} is not supported; use cpu, cuda:N or mps")
    return device


def parse_devices(text: str | None, *, flag: str = "--devices") -> list[str]:
    """``"cuda:0,cuda:1"`` → ``["cuda:0", "cuda:1"]``, each checked; one worker per device.

    None or blank: the one :func:`default_device`. A bare ``cuda`` means ``cuda:0``.
    """
    if text is None or not text.strip():
        return [default_device()]
    devices: list[str] = []
    for raw in text.split(","):
        if not raw.strip():
            raise InputError(f"{flag} {text!r} has an empty entry; give a comma-separated list such as cuda:0,cuda:1")
        device = parse_device(raw, flag=flag)
        name = f"cuda:{device.index or 0}" if device.type == "cuda" else device.type
        if name in devices:
            raise InputError(f"{flag} lists {name} twice; each device gets one worker with its own model")
        devices.append(name)
    return devices
