"""The Whisper audio encoder, state-dict compatible with OpenAI's ``tiny.pt``.

LatentSync conditions its U-Net on Whisper-tiny hidden states. Only the encoder is used, so
this module implements just that half of OpenAI's model, with parameter names identical to the
``encoder.*`` keys of the official checkpoint (minus the ``encoder.`` prefix). ``forward`` returns
all hidden states LatentSync reads: the stem output (convolutions + positional embedding) and
the output of every residual block, all *before* ``ln_post`` (whose weights still load).

Loading never unpickles arbitrary code (``torch.load(..., weights_only=True)``) and turns
every way a file can be unusable into a :class:`~latentdub.errors.WeightsError` that names it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentdub.errors import WeightsError

log = logging.getLogger(__name__)

__all__ = [
    "TINY_DIMS",
    "WhisperDims",
    "WhisperEncoder",
    "encoder_state_dict_shapes",
    "load_whisper_checkpoint",
    "save_whisper_safetensors",
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
        self.mlp = nn.Sequential(Linear(n_state, 4 * n_state), nn.GELU(), Linear(4 * n_state, n_state))
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


# ----------------------------------------------------------------------------------- loading

# Every parameter name OpenAI's text decoder has; used to recognise (and knowingly skip) it.
_DECODER_KEY = re.compile(
    r"decoder\.(?:positional_embedding|token_embedding\.weight|ln\.(?:weight|bias)"
    r"|blocks\.\d+\.(?:(?:attn|cross_attn)\.(?:query|key|value|out)\.(?:weight|bias)"
    r"|(?:attn_ln|cross_attn_ln|mlp_ln)\.(?:weight|bias)|mlp\.[02]\.(?:weight|bias)))"
)
_LIST_LIMIT = 12


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = len(items) - _LIST_LIMIT
    return shown + (f" … and {more} more" if more > 0 else "")


def _short_reason(err: BaseException) -> str:
    """One informative line of a low-level error (torch's are paragraphs of advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((ln for ln in lines if ln.startswith("Unsupported operand")), lines[0] if lines else "")
    return f"{type(err).__name__}: {detail[:200]}".rstrip(": ")


def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        return True
    # Content sniffing for renamed files: safetensors = u64 header length + JSON; torch's zip
    # format starts with "PK", legacy pickles with the protocol byte 0x80.
    with path.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _read_openai_checkpoint(path: Path) -> tuple[WhisperDims, dict[str, Tensor]]:
    """``{"dims": ..., "model_state_dict": ...}`` (OpenAI's ``tiny.pt``) → dims + encoder dict."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many unrelated types for unreadable files
        # weights_only names the first class/function it refused ("GLOBAL posix.system");
        # other weights_only failures ("Unsupported operand") are just damaged bytes.
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        if refused:
            raise WeightsError(
                f"Refusing to load {path}: it contains a pickled Python object "
                f"({refused.group(1)}) that could run code when loaded. A genuine Whisper "
                "checkpoint (OpenAI's tiny.pt) holds only tensors and numbers; re-download it "
                "or use a converted .safetensors file."
            ) from None
        raise WeightsError(
            f"Cannot read the Whisper checkpoint {path}: it is corrupt, truncated or not a PyTorch "
            f"file ({_short_reason(err)}). Re-download it (OpenAI tiny.pt is about 75.6 MB)."
        ) from None

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
            found = f"its top-level keys are {_listing([str(k) for k in obj]) or '(none)'}"
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
            f"encoder/decoder: {_listing(sorted(foreign))}."
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


def _read_safetensors(path: Path) -> tuple[WhisperDims, dict[str, Tensor]]:
    """A converted encoder: tensors (with or without ``encoder.``) + ``dims`` JSON metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            state = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:
        raise WeightsError(
            f"Cannot read {path} as safetensors: it is corrupt or truncated ({_short_reason(err)}). "
            "Convert the Whisper checkpoint again (latentdub weights convert)."
        ) from None
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
        problems.append(f"missing encoder keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected encoder keys: {_listing(unexpected)}")
    wrong: list[str] = []
    bad_dtype: list[str] = []
    for key in sorted(set(expected) & set(state)):
        value = state[key]
        if not isinstance(value, Tensor) or not value.is_floating_point():
            bad_dtype.append(f"{key} ({getattr(value, 'dtype', type(value).__name__)})")
        elif tuple(value.shape) != expected[key]:
            wrong.append(f"{key} {list(value.shape)} (expected {list(expected[key])})")
    if wrong:
        problems.append(f"wrong shapes: {_listing(wrong)}")
    if bad_dtype:
        problems.append(f"not floating-point tensors: {_listing(bad_dtype)}")
    if problems:
        raise WeightsError(
            f"{path} does not fit a Whisper encoder with its own dims "
            f"(n_mels {dims.n_mels}, width {dims.n_audio_state}, {dims.n_audio_layer} layers): "
            + "; ".join(problems)
            + ". The file is damaged or not an OpenAI Whisper checkpoint."
        )


def load_whisper_checkpoint(path: str | os.PathLike[str]) -> WhisperEncoder:
    """Load the audio encoder from OpenAI's ``tiny.pt`` format or a converted ``.safetensors``.

    The decoder is recognised and skipped; the encoder keys must match exactly (strict). The
    model is returned in float32 (fp16 file weights are widened, like the official) in eval
    mode; ``encoder.dims`` holds the file's dimensions. Every unusable file raises
    :class:`WeightsError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"Whisper checkpoint {path} does not exist or is not a file. Download OpenAI's "
            "tiny.pt (LatentSync's checkpoints/whisper/tiny.pt) or pass the right path."
        )
    try:
        is_st = _is_safetensors(path)
    except OSError as err:
        raise WeightsError(f"Cannot read {path}: {err.strerror or err}.") from None
    dims, state = _read_safetensors(path) if is_st else _read_openai_checkpoint(path)
    _check_encoder_state(path, dims, state)
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
            f"{path} is damaged: NaN or infinite values in {_listing(non_finite)}. "
            "Re-download the Whisper checkpoint."
        )
    return encoder.eval()


def save_whisper_safetensors(
    encoder: WhisperEncoder,
    dims: WhisperDims,
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write ``encoder``'s state dict (keys without ``encoder.``) with ``dims`` as JSON metadata.

    Written to a temporary name and renamed, so an interrupted write never leaves a
    half-written file under ``path``.
    """
    from safetensors.torch import save_file

    if dims != encoder.dims:
        raise ValueError(f"dims {dims} do not describe this encoder ({encoder.dims})")
    path = Path(path)
    tensors = {
        key: value.detach().to(device="cpu", dtype=dtype).contiguous()
        for key, value in encoder.state_dict().items()
    }
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt", "dims": json.dumps(dims.to_dict())})
    os.replace(tmp, path)
