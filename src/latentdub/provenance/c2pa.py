"""Content credentials (C2PA) for dubbed videos: sign the output, read a file's credentials back.

What a signed dub says (one manifest, signed with :mod:`latentdub.provenance.keys`):

* a parent ingredient, the input video (named by its SHA-256; when the caller passes the file,
  its own content credentials, if any, are carried over);
* actions ``c2pa.opened`` (that ingredient) then ``c2pa.edited`` with the IPTC digital source
  type *trainedAlgorithmicMedia* and a ``softwareAgent`` naming latentdub and the model: the
  picture was altered by an AI model;
* ``com.latentdub.dub``: the model (name, version, whether its weights were random), the
  SHA-256 of the input video and audio, the consent record id, the watermark (on/off, payload
  id) and the dub options.

Only the model's public description goes into the file (name, version, resolution, random
weights): the local weights path, device and dtype are not published.

The signer made by ``latentdub keys init-signing`` is a local CA, which no verifier trusts, so
readers report ``signingCredential.untrusted``: :func:`read_credentials` counts that as *valid
but untrusted* (``trusted=False``); any other failure (a hash mismatch after an edit) is invalid.

The ``c2pa`` SDK (a native library) is imported only when signing or reading.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from latentdub.errors import InputError, LatentdubError

# Its home is latentdub.files; the name stays importable here until every caller moves.
from latentdub.files import sha256_file as sha256_file
from latentdub.provenance.keys import SigningKeys, check_signing

try:  # POSIX: keeps another writer's stale-partial cleanup off our half-signed file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

ASSERTION_LABEL = "com.latentdub.dub"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
UNTRUSTED_CODES = frozenset({"signingCredential.untrusted"})
# Containers C2PA can embed a manifest in, among those latentdub writes (no Matroska).
MIME_TYPES = {".mp4": "video/mp4", ".m4v": "video/x-m4v", ".mov": "video/quicktime"}
_READ_MIME_TYPES = {**MIME_TYPES, ".avi": "video/avi", ".m4a": "audio/mp4", ".wav": "audio/wav", ".mp3": "audio/mpeg"}
# The writer's temporary names: ".NAME.partial-XXXXXXXX.EXT" (media/writer.py).
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-[a-z0-9_]{8}(?P<ext>\.[^./]+)$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PUBLIC_MODEL_KEYS = ("name", "version", "resolution", "random_weights")


class CredentialsError(LatentdubError):
    """Content credentials could not be made (unsupported container, signer refused)."""

    exit_code = 1


@dataclass(frozen=True)
class ProvenanceClaims:
    """What the manifest of one dub states. ``video_sha256``/``audio_sha256`` are lowercase hex.

    ``source_video``/``source_title`` are optional: the input file (to carry its own content
    credentials over into the parent ingredient) and the name to show for it.

    ``generated``: the time ranges ``(start_s, end_s)`` of the frames the model made. Empty: it
    made none (no usable face: every frame passed through), so nothing is claimed as AI-made.
    None: not recorded (a caller outside the pipeline), read as "the model made the video".
    """

    model: Mapping[str, Any]
    video_sha256: str
    audio_sha256: str
    consent_id: str | None
    watermark: bool
    watermark_id: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    source_video: Path | None = None
    source_title: str = "input video"
    generated: tuple[tuple[float, float], ...] | None = None

    @property
    def ai_generated(self) -> bool:
        """Whether a model made any frame (the only case the credentials claim an AI edit)."""
        return self.generated is None or len(self.generated) > 0

    def __post_init__(self) -> None:
        for name in ("video_sha256", "audio_sha256"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _HEX64.match(value):
                raise InputError(f"{name} must be a SHA-256 as 64 lowercase hex digits, got {value!r}")
        if self.watermark_id is not None and not self.watermark:
            raise InputError("watermark_id was given but watermark is off")
        if self.consent_id is not None and not str(self.consent_id).strip():
            raise InputError("consent_id must not be empty (use None when there is no consent record)")

    def assertion(self) -> dict[str, Any]:
        """The ``com.latentdub.dub`` assertion's data."""
        return {
            "model": public_model(self.model),
            "video_sha256": self.video_sha256,
            "audio_sha256": self.audio_sha256,
            "consent_id": self.consent_id,
            "watermark": bool(self.watermark),
            "watermark_id": self.watermark_id if self.watermark else None,
            "options": dict(self.options),
            **({} if self.generated is None else {"generated_ranges": [[s, e] for s, e in self.generated]}),
        }


def public_model(model: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a model description that may be published (no local paths, no device)."""
    out = {k: model[k] for k in _PUBLIC_MODEL_KEYS if k in model}
    out["random_weights"] = bool(model.get("random_weights", False))
    return out


def mime_type_for(path: str | os.PathLike[str]) -> str:
    """The C2PA MIME type for a file latentdub writes; :class:`CredentialsError` if it has none."""
    ext = Path(path).suffix.lower()
    if ext not in MIME_TYPES:
        raise CredentialsError(
            f"content credentials (C2PA) cannot be embedded in a {ext or 'extension-less'} file; "
            f"write one of: {', '.join(MIME_TYPES)}."
        )
    return MIME_TYPES[ext]


def check_signable(output: str | os.PathLike[str]) -> None:
    """Fail before a dub starts if its output could not carry content credentials."""
    mime_type_for(output)


class C2paSigner:
    """Signs videos with one set of keys (checked once, when made)."""

    def __init__(self, keys: SigningKeys) -> None:
        check_signing(keys)
        self.keys = keys
        self._chain = keys.chain_pem()
        self._key = keys.key_pkcs8_pem()
        self._alg = keys.algorithm()
        info = keys.describe()
        self.issuer: str = info["issuer"]
        self.subject: str = info["subject"]

    def manifest(self, claims: ProvenanceClaims, *, title: str, mime: str) -> dict[str, Any]:
        """The manifest definition handed to the c2pa builder."""
        from latentdub import __version__

        model = public_model(claims.model)
        model_name = str(model.get("name") or "unknown model")
        if claims.ai_generated:
            # The model's label stands on its own after a colon: labels may carry their own clauses.
            description = (
                f"An AI lip-sync model re-generated the mouth region{_where(claims.generated)} to match a new "
                f"speech track. Model: {model_name}."
            )
            if model["random_weights"]:
                description += " Its weights were random: a test run, not a real lip-sync."
            edit = {
                "action": "c2pa.edited",
                "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": {"name": "latentdub", "version": __version__, "model": model_name},
                "description": description,
            }
        else:  # nothing was generated: say so, and claim no AI edit
            edit = {
                "action": "c2pa.transcoded",
                "softwareAgent": {"name": "latentdub", "version": __version__},
                "description": "No frame was changed by an AI model: no usable face was found, so every frame "
                "was passed through and re-encoded with the new speech track.",
            }
        definition: dict[str, Any] = {
            "claim_generator_info": [{"name": "latentdub", "version": __version__}],
            "title": title,
            "format": mime,
            "assertions": [
                {
                    "label": "c2pa.actions",
                    "data": {
                        "actions": [
                            {"action": "c2pa.opened", "parameters": {"ingredientIds": ["source"]}},
                            edit,
                        ]
                    },
                },
                {"label": ASSERTION_LABEL, "data": claims.assertion()},
            ],
        }
        if _source_mime(claims) is None:
            # No file c2pa can read: the parent is declared by its hash alone.
            definition["ingredients"] = [_declared_parent(claims)]
        return definition

    def sign_file(self, src: Path, dst: Path, claims: ProvenanceClaims, *, title: str | None = None) -> dict[str, Any]:
        """Write a signed copy of ``src`` to ``dst`` (an open-able new path); returns what was signed."""
        import c2pa as sdk

        src, dst = Path(src), Path(dst)
        mime = mime_type_for(src)
        definition = self.manifest(claims, title=title or src.name, mime=mime)
        try:
            builder = _make_builder(sdk, definition, claims)
            signer = sdk.Signer.from_info(
                sdk.C2paSignerInfo(getattr(sdk.C2paSigningAlg, self._alg.upper()), self._chain, self._key, None)
            )
            with open(src, "rb") as fin, open(dst, "w+b") as fout:
                builder.sign(signer, mime, fin, fout)
        except sdk.C2paError as err:
            raise CredentialsError(f"signing {src.name} with content credentials failed: {_sdk_message(err)}") from None
        except OSError as err:  # a full disk, a vanished file: the user's to fix, not a bug
            raise CredentialsError(f"signing {src.name} failed: cannot read or write it ({err.strerror or err})") from None
        # Read our own signature back: a file that does not verify must never be published.
        report = read_credentials(dst)
        if not report.valid:
            raise CredentialsError(
                f"the freshly signed {src.name} does not verify: {'; '.join(report.failures) or report.validation_state}"
            )
        return {
            "signed": True,
            "issuer": self.issuer,
            "signer": self.subject,
            "alg": self._alg,
            "manifest_label": report.manifest_label,
            "trusted": report.trusted,
        }

    def sign_in_place(self, path: Path, claims: ProvenanceClaims, *, title: str | None = None) -> dict[str, Any]:
        """Sign ``path`` in place: a signed sibling is made, then renamed over it (atomic).

        On any failure the sibling is deleted and ``path`` is left exactly as it was. The file
        keeps its permission bits. Caveat for the writer's locked partials: after the rename the
        writer's lock is on the old inode, so until the writer's own rename (moments later) the
        signed file is unlocked; only a second writer starting on the very same output in that
        instant could treat it as stale.
        """
        path = Path(path)
        mime_type_for(path)  # before making any file
        # Not files.atomic_path: this sibling is named like the writer's partials, flock-ed while
        # signing, and keeps the signed file's own mode.
        prefix, suffix = _sibling_affixes(path)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            fd, tmp2 = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
        except OSError as err:
            raise CredentialsError(f"cannot sign {path}: {err.strerror or err}") from None
        try:
            os.fchmod(fd, mode)
            if fcntl is not None:
                # Named like the writer's partials (so a killed run's leftover is cleaned up by the
                # next writer) and locked (so a live one is not).
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX)
            start = time.perf_counter()
            info = self.sign_file(path, Path(tmp2), claims, title=title or _final_name(path))
            info["sign_s"] = round(time.perf_counter() - start, 4)
            os.replace(tmp2, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp2)
            raise
        finally:
            os.close(fd)
        return info


def c2pa_finalizer(keys: SigningKeys, claims: ProvenanceClaims) -> Callable[[Path], dict[str, Any]]:
    """A render finalizer that signs the finished temporary video in place.

    Its result, ``{"c2pa": {"signed": True, "issuer": …, "manifest_label": …, …}}``, is merged
    into ``DubResult.provenance``. The keys are checked now, before the dub runs.
    """
    signer = C2paSigner(keys)

    def sign_c2pa(tmp_path: Path) -> dict[str, Any]:
        return {"c2pa": signer.sign_in_place(Path(tmp_path), claims)}

    return sign_c2pa


# -- reading ----------------------------------------------------------------------------------
@dataclass
class C2paReport:
    """What a file's content credentials say, and whether they hold.

    ``valid``: a manifest is present and nothing but the signer's trust failed. ``trusted``:
    the signer chains to a trust anchor (never, for latentdub's local CA, unless the verifier
    is given its ``ca.pem``). ``failures``: ``"code: explanation"`` for every failure,
    including the tolerated ``signingCredential.untrusted``.
    """

    path: str
    present: bool
    valid: bool
    trusted: bool
    validation_state: str | None
    failures: list[str] = field(default_factory=list)
    claims: dict[str, Any] = field(default_factory=dict)
    manifest_label: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_credentials(path: str | os.PathLike[str], *, trust_anchors: str | os.PathLike[str] | None = None) -> C2paReport:
    """Read and validate the content credentials of ``path``.

    ``trust_anchors``: a PEM file of CA certificates to trust (e.g. the ``ca.pem`` that
    ``keys init-signing`` wrote); with it, a file signed under that CA reports ``trusted``.
    """
    import c2pa as sdk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    mime = _READ_MIME_TYPES.get(path.suffix.lower(), "")  # "" lets c2pa sniff the bytes
    try:
        context = _trust_context(sdk, trust_anchors)
        with open(path, "rb") as f:
            reader = sdk.Reader(mime, f, context=context) if context is not None else sdk.Reader(mime, f)
            try:
                store = json.loads(reader.json())
                state = reader.get_validation_state()
                results = reader.get_validation_results() or {}
            finally:
                reader.close()
    except sdk.C2paError.ManifestNotFound:
        return C2paReport(str(path), present=False, valid=False, trusted=False, validation_state=None)
    except sdk.C2paError.NotSupported as err:
        return C2paReport(
            str(path), present=False, valid=False, trusted=False, validation_state=None,
            failures=[f"this kind of file cannot carry content credentials ({_sdk_message(err)})"],
        )  # fmt: skip
    except sdk.C2paError as err:
        # A manifest is there but cannot even be parsed: present, and not valid.
        return C2paReport(
            str(path), present=True, valid=False, trusted=False, validation_state="Invalid",
            failures=[f"unreadable manifest: {_sdk_message(err)}"],
        )  # fmt: skip

    active = (results.get("activeManifest") or {}) if isinstance(results, dict) else {}
    failure_entries = active.get("failure") or store.get("validation_status") or []
    codes = [str(e.get("code", "")) for e in failure_entries]
    failures = [f"{e.get('code')}: {e.get('explanation', '')}".rstrip(": ") for e in failure_entries]
    label = store.get("active_manifest")
    manifest = (store.get("manifests") or {}).get(label) if label else None
    present = manifest is not None
    hard = [c for c in codes if c not in UNTRUSTED_CODES]
    valid = present and state != "Invalid" and not hard
    return C2paReport(
        path=str(path),
        present=present,
        valid=valid,
        trusted=valid and state == "Trusted" and not any(c in UNTRUSTED_CODES for c in codes),
        validation_state=state,
        failures=failures,
        claims=_summarise(manifest) if manifest else {},
        manifest_label=label,
    )


def _summarise(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a manifest a person checks: who signed, what was done, what latentdub said."""
    actions: list[dict[str, Any]] = []
    custom: dict[str, Any] | None = None
    for assertion in manifest.get("assertions") or []:
        label = str(assertion.get("label", ""))
        data = assertion.get("data") or {}
        if label.startswith("c2pa.actions"):
            actions.extend(data.get("actions") or [])
        elif label == ASSERTION_LABEL:
            custom = dict(data)
    sig = manifest.get("signature_info") or {}
    return {
        "title": manifest.get("title"),
        "claim_generator": manifest.get("claim_generator_info") or [],
        "signer": {k: sig.get(k) for k in ("issuer", "common_name", "alg", "time") if sig.get(k) is not None},
        "actions": actions,
        "ai_edited": any("trainedAlgorithmicMedia" in str(a.get("digitalSourceType", "")) for a in actions),
        "ingredients": [
            {k: i.get(k) for k in ("title", "format", "relationship", "instance_id", "active_manifest") if i.get(k) is not None}
            for i in manifest.get("ingredients") or []
        ],
        "latentdub": custom,
    }


# -- helpers ----------------------------------------------------------------------------------
_RANGES_IN_TEXT = 8  # the assertion lists every range; the sentence only the first few


def _where(generated: tuple[tuple[float, float], ...] | None) -> str:
    """`` in 0.00–3.20 s and 5.00–8.00 s`` for a sentence, or nothing when not recorded."""
    if not generated:
        return ""
    parts = [f"{s:.2f}–{e:.2f} s" for s, e in generated[:_RANGES_IN_TEXT]]
    more = len(generated) - len(parts)
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + (", " if more else " and ") + parts[-1]
    return f" in {listed}" + (f" and {more} more ranges" if more else "")


def _declared_parent(claims: ProvenanceClaims) -> dict[str, Any]:
    return {
        "title": claims.source_title,
        "relationship": "parentOf",
        "instance_id": f"sha256:{claims.video_sha256}",
        "label": "source",
    }


def _source_mime(claims: ProvenanceClaims) -> str | None:
    """The MIME type to read the source video with, or None to declare it by hash alone."""
    if claims.source_video is None:
        return None
    return _READ_MIME_TYPES.get(Path(claims.source_video).suffix.lower())  # None: mkv, webm…


def _make_builder(sdk: Any, definition: dict[str, Any], claims: ProvenanceClaims) -> Any:
    """A c2pa builder (edit intent) whose parent ingredient is the input video.

    Read from the file when c2pa can (its own content credentials, if any, travel with it);
    otherwise, or if c2pa cannot parse it, declared by its SHA-256.
    """
    smime = _source_mime(claims)
    if smime is not None:
        builder = sdk.Builder(definition)
        builder.set_intent(sdk.C2paBuilderIntent.EDIT)
        ingredient = {"title": claims.source_title, "relationship": "parentOf", "label": "source"}
        try:
            with open(claims.source_video, "rb") as f:  # type: ignore[arg-type]
                builder.add_ingredient_from_stream(ingredient, smime, f)
            return builder
        except OSError as err:
            builder.close()
            raise InputError(f"cannot read the source video {claims.source_video}: {err.strerror or err}") from None
        except sdk.C2paError:
            builder.close()  # a file c2pa cannot parse: fall back to the hash
    builder = sdk.Builder({**definition, "ingredients": [_declared_parent(claims)]})
    builder.set_intent(sdk.C2paBuilderIntent.EDIT)
    return builder


def _sibling_affixes(path: Path) -> tuple[str, str]:
    """mkstemp prefix/suffix for the signed copy: a partial of the same output if ``path`` is one."""
    m = _PARTIAL.match(path.name)
    if m:
        return f".{m['name']}.partial-", m["ext"]
    return f".{path.name}.c2pa-", path.suffix


def _final_name(path: Path) -> str:
    """The name the file will have (the writer's partial name, undone)."""
    m = _PARTIAL.match(path.name)
    return m["name"] if m else path.name


def _trust_context(sdk: Any, trust_anchors: str | os.PathLike[str] | None) -> Any:
    if trust_anchors is None:
        return None
    anchors = Path(trust_anchors)
    try:
        pem = anchors.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the trust anchors {anchors}: {getattr(err, 'strerror', None) or err}") from None
    if "BEGIN CERTIFICATE" not in pem:
        raise InputError(f"the trust anchors file {anchors} holds no PEM certificate")
    return sdk.Context.from_dict({"verify": {"verify_trust": True}, "trust": {"user_anchors": pem}})


def _sdk_message(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
