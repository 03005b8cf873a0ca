"""``DubOptions``: the one schema for what a single dub may do differently.

The library, the CLI (its ``--help`` text comes from the field descriptions) and the HTTP API
(its OpenAPI field docs) all use this one model, so they can never disagree. Values are checked
once, at construction; a bad value raises :class:`OptionError`, which names the field and
speaks about options (``steps must be at least 1``), not about CLI flags.

Every default reproduces the official LatentSync sampler; the one opt-in that changes the
pictures beyond that (``sampler="dpm++"``) says so in its description and in the dub's warnings.

Loading choices (model version, device, dtype) are not here: they belong to the pipeline, which
is loaded once and then runs many dubs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from latentdub.errors import InputError
from latentdub.segments import Segment, load_segments, parse_segments

LengthPolicy = Literal["pingpong", "loop", "cut", "pad"]
FitMode = Literal["none", "stretch", "align"]
# "auto" (see below), then x264's presets fastest first ("placebo" left out: it costs many times
# veryslow for nothing visible).
Preset = Literal["auto", "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"]
PRESETS: tuple[str, ...] = get_args(Preset)[1:]  # the x264 ones
Encoder = Literal["auto", "x264", "nvenc"]
Sampler = Literal["ddim", "dpm++"]
Silence = Literal["auto", "generate"]
NoFacePolicy = Literal["pass", "fail"]
Occlusion = Literal["auto", "off"]
#: Steps used when ``steps`` is not given: the official 20 for DDIM; DPM-Solver++ (2nd order
#: multistep) reaches a similar level of detail in about half as many model calls.
DEFAULT_STEPS: dict[str, int] = {"ddim": 20, "dpm++": 10}
# preset "auto" (the default) is resolved per dub by the device it runs on:
# * CUDA: encode runs beside diffusion and must never be the slowest stage on a 16-core GPU host.
#   The targets need 25 fps / 1.2 s/s ≈ 21 fps at 512 and 25 / 0.4 ≈ 63 fps at 256; measured
#   x264 at 1080×1920 on a 16-core GPU host (bench/bench_encode.py): medium 42 fps (would bound
#   the 256 target), veryfast 83 fps (1.3× headroom at 256, 4× at 512). At crf 18 veryfast is
#   0.2-1.4 dB PSNR below medium (clip-dependent) for ~7-10 % more bits (bench/bench_encode.py).
# * elsewhere (CPU, MPS) diffusion is far slower than any preset, so the better-compressing
#   medium costs nothing, and keeps the end-of-stream frames above the suite's 40 dB bar.
AUTO_PRESETS: dict[str, str] = {"cuda": "veryfast"}
FALLBACK_PRESET = "medium"


@dataclass(frozen=True)
class FromFile:
    """Marks an option (``Annotated[T, FromFile(load)]``) whose CLI flag and batch manifest column
    is the path of a file that ``load`` reads into the value; elsewhere (the library, the HTTP
    API) the value itself is given. The options class never reads a path itself, so a value
    sent to the service can never make it read a server file."""

    load: Callable[[Path], Any]


def file_option(options_cls: type[DubOptions], name: str) -> FromFile | None:
    """The :class:`FromFile` marker of the field ``name``, or None for an ordinary option."""
    info = options_cls.model_fields.get(name)
    return next((m for m in info.metadata if isinstance(m, FromFile)), None) if info is not None else None


def read_option_files(
    options_cls: type[DubOptions], values: Mapping[str, Any], *, base_dir: Path | None = None
) -> dict[str, Any]:
    """``values`` with each file option given as a path (text) replaced by what its loader reads;
    relative paths from ``base_dir`` (else the working folder). A problem is an
    :class:`OptionError` naming the option."""
    out = dict(values)
    for name, value in values.items():
        marker = file_option(options_cls, name)
        if marker is None or not isinstance(value, str | Path):
            continue
        path = Path(value).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            out[name] = marker.load(path)
        except InputError as err:
            raise OptionError(name, f"file {err}") from None
    return out


class OptionError(InputError):
    """An option value that cannot be used; ``field`` is the option's name, ``reason`` the rest."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field} {reason}")


class DubOptions(BaseModel):
    """Everything a single dub can be asked to do differently. Immutable once made."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    steps: int = Field(
        DEFAULT_STEPS["ddim"],
        ge=1,
        le=1000,
        description="DDIM denoising steps (official: 20); with sampler dpm++ its solver steps, 10 when not given.",
    )
    guidance: float = Field(
        1.5, ge=0.0, le=20.0, description="Audio classifier-free guidance scale; 1 or less turns it off (official: 1.5)."
    )
    seed: int = Field(1247, ge=0, le=2**63 - 1, description="Random seed; the same seed gives the same dub (official: 1247).")
    deepcache: bool = Field(True, description="DeepCache (interval 3): reuse deep U-Net features on 2 of every 3 steps.")
    length_policy: LengthPolicy = Field(
        "pingpong",
        description="When video and audio lengths differ: pingpong (official), loop, cut or pad.",
    )
    fit: FitMode = Field(
        "none", description="Fit the dub's timing to the picture: none, stretch (WSOLA) or align (DTW to the original speech)."
    )
    max_stretch: float = Field(1.25, ge=1.0, le=4.0, description="Largest time-stretch ratio that fit may use.")
    face: str = Field(
        "auto",
        min_length=1,
        description="Which face to dub: auto (whoever speaks in the original at that moment), largest, "
        "X,Y@T (the face at pixel X,Y at T s), or track:N.",
    )
    silence: Silence = Field(
        "auto",
        description="Where the dub is silent: auto (the original frames pass through where the original is "
        "silent too; elsewhere the mouth is generated from silence, with 3-frame crossfades) or generate "
        "(every frame generated from the dub as it is, the official behaviour).",
    )
    occlusion: Occlusion = Field(
        "auto",
        description="What covers the mouth (a hand, a microphone, a cup, another person): auto (its pixels stay "
        "the original's and the model sees it; a frame whose lips are more than 60 % covered passes through, "
        "with 3-frame crossfades) or off (the mouth is painted over whatever is there, the official "
        "behaviour).",
    )
    crf: int = Field(
        18, ge=0, le=51, description="Video quality, lower is better (18 is visually lossless; NVENC uses it as -cq)."
    )
    preset: Preset = Field(
        "auto",
        description="x264 speed preset, ultrafast … veryslow (slower = smaller file at the same crf), or auto: "
        "veryfast on a CUDA GPU so encoding keeps up, medium elsewhere. NVENC maps it to p1 … p7.",
    )
    encoder: Encoder = Field(
        "auto",
        description="Video encoder: auto (NVIDIA NVENC when it can be opened, else x264), x264, or nvenc "
        "(fails if NVENC cannot be opened).",
    )
    sampler: Sampler = Field(
        "ddim",
        description="Diffusion sampler: ddim (the official one, exact) or dpm++ (DPM-Solver++, 10 steps by "
        "default: half the U-Net work) - dpm++ CHANGES THE OUTPUT vs the official sampler.",
    )
    watermark: bool = Field(
        True,
        description="Embed the invisible AI-generated watermark in every frame the model made. Turning it off "
        "is recorded in the signed content credentials.",
    )
    if_no_face: NoFacePolicy = Field(
        "pass",
        description="When no frame can be dubbed (no usable face): pass (the video passes through with the new "
        "audio, unmarked, its credentials saying no AI edit was made) or fail (an error, no output).",
    )
    segments: Annotated[tuple[Segment, ...] | None, FromFile(load_segments)] = Field(
        None,
        description="Who is dubbed when: a list of segments, each start and end (s), face (auto, track:N or "
        "X,Y@T; default auto), and optionally audio (the speech for it) and offset (s into that audio at "
        "start). The CLI and a batch manifest take a JSON or CSV file (audio paths relative to it); the "
        "HTTP API takes JSON text whose audio values are ids of uploaded audio assets.",
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise _option_error(err) from None

    @model_validator(mode="before")
    @classmethod
    def _sampler_steps(cls, data: Any) -> Any:
        """``steps`` not given: the chosen sampler's own default (20 for ddim, 10 for dpm++)."""
        if isinstance(data, dict) and "steps" not in data:
            sampler = data.get("sampler", "ddim")
            if isinstance(sampler, str) and sampler in DEFAULT_STEPS:
                data = {**data, "steps": DEFAULT_STEPS[sampler]}
        return data

    @field_validator("preset", mode="before")
    @classmethod
    def _known_preset(cls, value: Any) -> Any:
        # Named here rather than via the generic Literal message, so the error lists them in speed order.
        if isinstance(value, str) and value.strip().lower() in ("auto", *PRESETS):
            return value.strip().lower()
        choices = f"must be auto or one of {', '.join(PRESETS)}"
        if value == "placebo":
            raise ValueError(f"{choices}; placebo is not offered (many times slower than veryslow for no visible gain)")
        raise ValueError(f"{choices} (fastest to slowest), got {value!r}")

    @field_validator("face")
    @classmethod
    def _face_policy(cls, value: str) -> str:
        from latentdub.face.selection import parse_policy

        try:
            parse_policy(value)
        except InputError as err:
            raise ValueError(str(err)) from None
        return value.strip()

    @field_validator("segments", mode="before")
    @classmethod
    def _segments(cls, value: Any) -> Any:
        # Text is JSON, never a path: see FromFile. A message names the segment at fault.
        try:
            return parse_segments(value)
        except InputError as err:
            raise ValueError(str(err)) from None

    # -- conversion -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, every field present."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DubOptions:
        """Build from a mapping (a request body, a manifest row); unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise InputError(f"options must be a mapping of option names to values, got {type(data).__name__}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> DubOptions:
        """A copy with some fields changed, validated like a new instance.

        Changing ``sampler`` while ``steps`` sits at the old sampler's default moves ``steps`` to
        the new sampler's default (20 for ddim, 10 for dpm++); other step counts are kept.
        """
        if not changes:
            return self
        current = self.to_dict()
        if "sampler" in changes and "steps" not in changes and self.steps == DEFAULT_STEPS[self.sampler]:
            del current["steps"]
        return type(self)(**{**current, **changes})

    def for_device(self, device_type: str) -> DubOptions:
        """These options with ``preset="auto"`` made concrete for a dub on ``device_type`` (cuda, cpu, …)."""
        if self.preset != "auto":
            return self
        return self.replace(preset=AUTO_PRESETS.get(device_type, FALLBACK_PRESET))

    def output_change_warnings(self) -> list[str]:
        """Warnings for opt-in choices that make the dub differ from the official sampler's."""
        if self.sampler == "ddim":
            return []
        return [
            f"sampler {self.sampler} ({self.steps} steps) changes the output vs the official sampler "
            f"(ddim, {DEFAULT_STEPS['ddim']} steps): a faster opt-in profile, not the reference result"
        ]

    @classmethod
    def resolve(cls, options: DubOptions | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> DubOptions:
        """The options of one call: ``options`` (or the defaults) with keyword ``overrides`` on top."""
        if options is None:
            base = cls()
        elif isinstance(options, DubOptions):
            base = options
        else:
            base = cls.from_dict(options)
        return base.replace(**overrides)

    @classmethod
    def describe(cls, name: str) -> str:
        """The description of one field (the CLI's help text for its flag)."""
        return cls.model_fields[name].description or ""


def _option_error(err: ValidationError) -> OptionError:
    """Turn pydantic's first complaint into one sentence that names the option."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "options"
    kind = first["type"]
    ctx = first.get("ctx") or {}
    value = first.get("input")
    if kind == "extra_forbidden":
        known = ", ".join(DubOptions.model_fields)
        return OptionError(field, f"is not an option; the options are: {known}")
    if kind == "missing":
        return OptionError(field, "is required")
    reasons = {
        "greater_than_equal": lambda: f"must be at least {ctx.get('ge')}",
        "less_than_equal": lambda: f"must be at most {ctx.get('le')}",
        "greater_than": lambda: f"must be greater than {ctx.get('gt')}",
        "less_than": lambda: f"must be less than {ctx.get('lt')}",
        "literal_error": lambda: f"must be one of {ctx.get('expected')}",
        "int_parsing": lambda: "must be a whole number",
        "int_type": lambda: "must be a whole number",
        "int_from_float": lambda: "must be a whole number",
        "float_parsing": lambda: "must be a number",
        "float_type": lambda: "must be a number",
        "finite_number": lambda: "must be a finite number",
        "bool_parsing": lambda: "must be true or false",
        "bool_type": lambda: "must be true or false",
        "string_type": lambda: "must be text",
        "string_too_short": lambda: "must not be empty",
    }
    if kind in reasons:
        return OptionError(field, f"{reasons[kind]()}, got {value!r}")
    message = str(first.get("msg", "is invalid")).removeprefix("Value error, ")
    if message.startswith("must "):  # our own validators already speak in option terms
        return OptionError(field, message)
    return OptionError(field, f"is invalid: {message}")
