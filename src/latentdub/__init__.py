"""latentdub: photorealistic AI video dubbing compatible with LatentSync 1.5 / 1.6.

The public API, imported lazily (torch loads only when the pipeline is used)::

    from latentdub import LipSyncPipeline, DubOptions, Cancelled
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LipSyncPipeline": "latentdub.pipeline",
    "DubResult": "latentdub.pipeline",
    "read_inputs": "latentdub.pipeline",
    "DubOptions": "latentdub.options",
    "OptionError": "latentdub.options",
    "ProgressEvent": "latentdub.progress",
    "FrameInfo": "latentdub.hooks",
    "LatentdubError": "latentdub.errors",
    "InputError": "latentdub.errors",
    "WeightsError": "latentdub.errors",
    "Cancelled": "latentdub.errors",
    "HookError": "latentdub.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'latentdub' has no attribute {name!r}")
