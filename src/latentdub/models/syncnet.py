"""The classic SyncNet used for LSE-C / LSE-D, state-dict compatible with ``syncnet_v2.model``.

This is the evaluation SyncNet of the lip-sync literature (Chung & Zisserman's "S" model, shipped
as ``auxiliary/syncnet_v2.model`` in the LatentSync hub repos), not LatentSync's own training
SyncNet. Its parameter names are the raw state dict's: four ``nn.Sequential`` towers whose
indices include the parameter-free ReLU / max-pool layers.

* Audio tower (``netcnnaud`` → ``netfcaud``): one MFCC window, ``(B, 1, 13, 20)`` (13
  coefficients × 20 steps of 10 ms = 0.2 s), six 2-D convolutions down to ``(B, 512, 1, 1)``,
  then Linear → BatchNorm → ReLU → Linear to a 1024-d embedding.
* Video tower (``netcnnlip`` → ``netfclip``): five consecutive face crops, ``(B, 3, 5, H, W)``
  (BGR, float 0–255, H = W = 224 for the official weights), six 3-D convolutions (the first one
  spans all five frames) down to ``(B, 512, 1, 1, 1)``, then the same head.

The embeddings are compared with a plain Euclidean distance (not normalised); that is the
protocol in :mod:`latentdub.evaluation.syncnet`. Reading files is ``weights/syncnet.py``'s job.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["SYNCNET_V2_DIMS", "TINY_SYNCNET_DIMS", "SyncNet", "SyncNetDims"]

# Fixed by the protocol (and by the final audio kernel, which covers what is left of 13 × 20).
MFCC_COEFFS = 13
MFCC_STEPS = 20
AUDIO_FINAL_KERNEL = (5, 4)


@dataclass(frozen=True)
class SyncNetDims:
    """Widths of the two towers; the official model is :data:`SYNCNET_V2_DIMS`.

    ``audio_widths`` / ``video_widths`` are the output channels of the six convolutions of each
    tower (the last is the width the fully connected head sees). ``image_size`` is the side of
    the square face crops; it sets the last video kernel so the map ends at 1 × 1.
    """

    audio_widths: tuple[int, ...] = (64, 192, 384, 256, 256, 512)
    video_widths: tuple[int, ...] = (96, 256, 256, 256, 256, 512)
    fc_hidden: int = 512
    embed_dim: int = 1024
    num_frames: int = 5
    image_size: int = 224
    in_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("audio_widths", "video_widths"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if len(value) != 6 or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value
            ):
                raise ValueError(f"{name} must be six positive integers, got {value!r}")
        for name in ("fc_hidden", "embed_dim", "num_frames", "image_size", "in_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.audio_widths[-1] != self.video_widths[-1]:
            raise ValueError("the last audio and video widths must be equal (shared head size)")
        if self.video_final_kernel < 1:
            raise ValueError(f"image_size {self.image_size} is too small for the video tower")

    @property
    def video_final_kernel(self) -> int:
        """Side of the spatial map before the last video convolution (its kernel size)."""

        def out(size: int, kernel: int, stride: int, pad: int = 0) -> int:
            return (size + 2 * pad - kernel) // stride + 1

        s = out(self.image_size, 7, 2)  # conv 0
        s = out(s, 3, 2)  # pool 3
        s = out(s, 5, 2, 1)  # conv 4
        s = out(s, 3, 2, 1)  # pool 7 (convs 8, 11, 14 keep the size)
        return out(s, 3, 2)  # pool 17

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SyncNetDims:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown SyncNet dims field(s) {', '.join(unknown)}")
        return cls(**{n: data[n] for n in names if n in data})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["audio_widths"] = list(self.audio_widths)
        d["video_widths"] = list(self.video_widths)
        return d


SYNCNET_V2_DIMS = SyncNetDims()
TINY_SYNCNET_DIMS = SyncNetDims(
    audio_widths=(4, 8, 8, 8, 8, 16),
    video_widths=(4, 8, 8, 8, 8, 16),
    fc_hidden=16,
    embed_dim=8,
    image_size=96,
)


def _audio_tower(d: SyncNetDims) -> nn.Sequential:
    """``netcnnaud``: 13 × 20 → 13 × 20 → 11 × 9 → 5 × 4 → 1 × 1."""
    w = d.audio_widths

    def block(cin: int, cout: int, kernel: Any = 3, pad: Any = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, kernel, padding=pad), nn.BatchNorm2d(cout), nn.ReLU(True)]

    return nn.Sequential(
        *block(1, w[0]),  # 0-2
        nn.MaxPool2d(1, 1),  # 3 (an identity kept for the indices)
        *block(w[0], w[1]),  # 4-6
        nn.MaxPool2d(3, (1, 2)),  # 7
        *block(w[1], w[2]),  # 8-10
        *block(w[2], w[3]),  # 11-13
        *block(w[3], w[4]),  # 14-16
        nn.MaxPool2d(3, 2),  # 17
        *block(w[4], w[5], AUDIO_FINAL_KERNEL, 0),  # 18-20
    )


def _video_tower(d: SyncNetDims) -> nn.Sequential:
    """``netcnnlip``: (5, 224, 224) → (1, 109, 109) → 54 → 26 → 13 → 6 → 1."""
    w = d.video_widths

    def block(cin: int, cout: int, kernel: Any, stride: Any = 1, pad: Any = 0) -> list[nn.Module]:
        conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=pad)
        return [conv, nn.BatchNorm3d(cout), nn.ReLU(True)]

    k = d.video_final_kernel
    return nn.Sequential(
        *block(d.in_channels, w[0], (d.num_frames, 7, 7), (1, 2, 2)),  # 0-2
        nn.MaxPool3d((1, 3, 3), (1, 2, 2)),  # 3
        *block(w[0], w[1], (1, 5, 5), (1, 2, 2), (0, 1, 1)),  # 4-6
        nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),  # 7
        *block(w[1], w[2], (1, 3, 3), 1, (0, 1, 1)),  # 8-10
        *block(w[2], w[3], (1, 3, 3), 1, (0, 1, 1)),  # 11-13
        *block(w[3], w[4], (1, 3, 3), 1, (0, 1, 1)),  # 14-16
        nn.MaxPool3d((1, 3, 3), (1, 2, 2)),  # 17
        *block(w[4], w[5], (1, k, k)),  # 18-20
    )


def _head(d: SyncNetDims) -> nn.Sequential:
    """``netfcaud`` / ``netfclip``: Linear → BatchNorm1d → ReLU → Linear."""
    width = d.audio_widths[-1]
    return nn.Sequential(
        nn.Linear(width, d.fc_hidden),
        nn.BatchNorm1d(d.fc_hidden),
        nn.ReLU(True),
        nn.Linear(d.fc_hidden, d.embed_dim),
    )


class SyncNet(nn.Module):
    """Audio and video towers mapping 0.2 s windows to comparable embeddings."""

    def __init__(self, dims: SyncNetDims = SYNCNET_V2_DIMS) -> None:
        super().__init__()
        self.dims = dims
        self.netcnnaud = _audio_tower(dims)
        self.netfcaud = _head(dims)
        self.netcnnlip = _video_tower(dims)
        self.netfclip = _head(dims)

    def forward_audio(self, mfcc: Tensor) -> Tensor:
        """``(B, 1, 13, 20)`` MFCC windows → ``(B, embed_dim)``."""
        if mfcc.ndim != 4 or tuple(mfcc.shape[1:]) != (1, MFCC_COEFFS, MFCC_STEPS):
            raise ValueError(
                f"audio input must be (B, 1, {MFCC_COEFFS}, {MFCC_STEPS}), got {tuple(mfcc.shape)}"
            )
        x = self.netcnnaud(mfcc)
        return self.netfcaud(x.flatten(1))

    def forward_video(self, frames: Tensor) -> Tensor:
        """``(B, C, num_frames, S, S)`` BGR crops (float 0–255) → ``(B, embed_dim)``."""
        d = self.dims
        want = (d.in_channels, d.num_frames, d.image_size, d.image_size)
        if frames.ndim != 5 or tuple(frames.shape[1:]) != want:
            raise ValueError(
                f"video input must be (B, {', '.join(map(str, want))}), got {tuple(frames.shape)}"
            )
        x = self.netcnnlip(frames)
        return self.netfclip(x.flatten(1))

    def forward(self, mfcc: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_audio(mfcc), self.forward_video(frames)
