"""``DubOptions``: the one schema for what a single dub may do differently.

The library, the CLI (its ``--help`` text comes from the field descriptions) and the HTTP API
(its OpenAPI field docs) all use this one model, so they can never disagree. Values are checked
once, at construction; a bad value raises :class:`OptionError`, which names the field and
speaks about options (``steps must be at least 1``), not about CLI flags.

Loading choices (model version, device, dtype) are not here: they belong to the pipeline, which
is loaded once and then runs many dubs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from latentdub.errors import InputError

LengthPolicy = Literal["pingpong", "loop", "cut", "pad"]
FitMode = Literal["none", "stretch", "align"]


class OptionError(InputError):
    """An option value that cannot be used; ``field`` is the option's name, ``reason`` the rest."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field} {reason}")


class DubOptions(BaseModel):
    """Everything a single dub can be asked to do differently. Immutable once made."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    steps: int = Field(20, ge=1, le=1000, description="DDIM denoising steps (official: 20).")
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
        "largest", min_length=1, description="Which face to dub: largest, X,Y@T (the face at pixel X,Y at T s), or track:N."
    )
    crf: int = Field(18, ge=0, le=51, description="x264 quality, lower is better (18 is visually lossless).")
    watermark: bool = Field(
        True,
        description="Embed the invisible AI-generated watermark in every frame. Turning it off is recorded "
        "in the signed content credentials.",
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise _option_error(err) from None

    @field_validator("face")
    @classmethod
    def _face_policy(cls, value: str) -> str:
        from latentdub.face.selection import parse_policy

        try:
            parse_policy(value)
        except InputError as err:
            raise ValueError(str(err)) from None
        return value.strip()

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
        """A copy with some fields changed, validated like a new instance."""
        if not changes:
            return self
        return type(self)(**{**self.to_dict(), **changes})

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
    return OptionError(field, f"is invalid: {message}")
