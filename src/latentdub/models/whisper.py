"""The Whisper audio encoder, state-dict compatible with OpenAI's ``tiny.pt``.

LatentSync conditions its U-Net on Whisper-tiny hidden states. Only the encoder is used, so
this module implements just that half of OpenAI's model, with parameter names identical to the
``encoder.*`` keys of the official checkpoint (minus the ``encoder.`` prefix). ``forward`` returns
all hidden states LatentSync reads: the stem output (convolutions + positional embedding) and
the output of every residual block, all *before* ``ln_post`` (whose weights still load).

Reading and writing checkpoint files is ``weights/whisper.py``'s job (models never read files).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = [
    "TINY_DIMS",
    "WhisperDims",
    "WhisperEncoder",
    "encoder_state_dict_shapes",
    "sinusoids",
]


@dataclass(frozen=True)
class WhisperDims:
    """Model dimensions; field names match OpenAI's ``ModelDimensions`` (the checkpoint's ``dims``)."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if self.n_audio_state % self.n_audio_head:
            raise ValueError(
                f"n_audio_state ({self.n_audio_state}) is not divisible by n_audio_head "
                f"({self.n_audio_head})"
            )
        if self.n_audio_state % 2 or self.n_audio_state < 4:
            # The sinusoidal embedding splits the width into equal sin/cos halves.
            raise ValueError(f"n_audio_state must be even and >= 4, got {self.n_audio_state}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WhisperDims:
        """Build from a checkpoint's ``dims`` mapping; unknown extra fields are ignored."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        extra = sorted(set(data) - set(names))
        if extra:
            log.debug("ignoring unknown Whisper dims fields: %s", extra)
        return cls(**{n: data[n] for n in names})

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def num_hidden_states(self) -> int:
        """Hidden states returned by the encoder: the stem output plus one per block."""
        return self.n_audio_layer + 1


# OpenAI Whisper "tiny" (multilingual), the model LatentSync 1.5/1.6 uses.
TINY_DIMS = WhisperDims(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=384,
    n_audio_head=6,
    n_audio_layer=4,
    n_vocab=51865,
    n_text_ctx=448,
    n_text_state=384,
    n_text_head=6,
    n_text_layer=4,
)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's fixed positional embedding: ``[sin | cos]`` halves, geometric timescales."""
    if channels % 2:
        raise ValueError(f"channels must be even, got {channels}")
    half = channels // 2
    log_increment = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(half, dtype=torch.float32))
    scaled_time = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 whatever the input dtype, then cast back (as OpenAI's).

    fp16 statistics over 384 channels lose too much precision; computing them in fp32 keeps
    half-precision runs close to the fp32 reference.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class Linear(nn.Linear):
    """Linear layer whose weights follow the input dtype, so fp32 weights can serve fp16/bf16
    inputs (the official runs an fp32 model on fp16 inputs this way)."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv1d(nn.Conv1d):
    """1-D convolution whose weights follow the input dtype (see :class:`Linear`)."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super()._conv_forward(
            x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        )


class MultiHeadAttention(nn.Module):
    """Self-attention with OpenAI's parameter names; ``key`` has no bias."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = Linear(n_state, n_state)
        self.key = Linear(n_state, n_state, bias=False)
        self.value = Linear(n_state, n_state)
        self.out = Linear(n_state, n_state)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)

        # SDPA's default 1/sqrt(head_dim) scale equals OpenAI's head_dim**-0.25 applied to both
        # q and k; the encoder is unmasked.
        attended = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        )
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(attn_ln(x))`` then ``x + mlp(mlp_ln(x))``."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.mlp = nn.Sequential(
            Linear(n_state, 4 * n_state), nn.GELU(), Linear(4 * n_state, n_state)
        )
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class WhisperEncoder(nn.Module):
    """OpenAI Whisper audio encoder returning every pre-``ln_post`` hidden state.

    ``forward(mel)`` takes a normalised log-mel batch ``(B, n_mels, T)`` with ``T <= 2 *
    n_audio_ctx`` and returns ``(B, n_audio_layer + 1, ceil(T / 2), n_audio_state)``: index 0
    is the convolution stem + positional embedding, index ``i`` the output of block ``i``.
    The official always feeds ``T = 3000`` (30 s); shorter inputs use the leading rows of the
    positional embedding.
    """

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        self.dims = dims
        width = dims.n_audio_state
        self.conv1 = Conv1d(dims.n_mels, width, kernel_size=3, padding=1)
        self.conv2 = Conv1d(width, width, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(dims.n_audio_ctx, width))
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(width, dims.n_audio_head) for _ in range(dims.n_audio_layer)
        )
        # Unused by LatentSync (it reads the pre-ln_post states) but part of the checkpoint.
        self.ln_post = LayerNorm(width)

    positional_embedding: Tensor

    @property
    def max_mel_frames(self) -> int:
        """Longest input the positional embedding covers (3000 mel frames = 30 s for tiny)."""
        return 2 * self.dims.n_audio_ctx

    def forward(self, mel: Tensor) -> Tensor:
        if mel.ndim != 3 or mel.shape[1] != self.dims.n_mels:
            raise ValueError(
                f"expected a log-mel batch of shape (B, {self.dims.n_mels}, T), got {tuple(mel.shape)}"
            )
        if mel.shape[2] > self.max_mel_frames:
            raise ValueError(
                f"{mel.shape[2]} mel frames exceed the encoder's context of {self.max_mel_frames}"
            )
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = (x + self.positional_embedding[: x.shape[1]]).to(x.dtype)
        hidden = [x]
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return torch.stack(hidden, dim=1)


def encoder_state_dict_shapes(dims: WhisperDims) -> dict[str, tuple[int, ...]]:
    """Every encoder state-dict key and its shape for ``dims``, without building the model.

    Used to validate a file *before* allocating a model sized by the file's own ``dims``.
    """
    w, m = dims.n_audio_state, 4 * dims.n_audio_state
    shapes: dict[str, tuple[int, ...]] = {
        "positional_embedding": (dims.n_audio_ctx, w),
        "conv1.weight": (w, dims.n_mels, 3),
        "conv1.bias": (w,),
        "conv2.weight": (w, w, 3),
        "conv2.bias": (w,),
    }
    for i in range(dims.n_audio_layer):
        p = f"blocks.{i}."
        for proj in ("query", "key", "value", "out"):
            shapes[f"{p}attn.{proj}.weight"] = (w, w)
            if proj != "key":
                shapes[f"{p}attn.{proj}.bias"] = (w,)
        for ln in ("attn_ln", "mlp_ln"):
            shapes[f"{p}{ln}.weight"] = (w,)
            shapes[f"{p}{ln}.bias"] = (w,)
        shapes[f"{p}mlp.0.weight"] = (m, w)
        shapes[f"{p}mlp.0.bias"] = (m,)
        shapes[f"{p}mlp.2.weight"] = (w, m)
        shapes[f"{p}mlp.2.bias"] = (w,)
    shapes["ln_post.weight"] = (w,)
    shapes["ln_post.bias"] = (w,)
    return shapes
