"""The provenance of one dub: the hooks the pipeline adds to every render.

* the invisible watermark, a frame filter that runs after the caller's filters (so nothing the
  caller draws can sit on top of it) — unless ``DubOptions.watermark`` is off. It goes only on
  the frames the model made: a frame passed through unchanged (no usable face, silence) is not
  AI-made and is not marked, and the time ranges of the made frames go into the credentials. A
  dub that made no frame at all carries no mark and credentials that record the pass-through;
* the frame's time ranges (``generated``) and whether any were made are known only once the last
  frame is written, so the credentials' claims are completed when the finalizer runs;
* signed content credentials (C2PA), a finalizer that runs after the caller's finalizers (the
  signature covers the final bytes);
* an entry in the hash-chained audit log, written once the signed file is complete and before
  it is renamed into place, so no output exists without its audit entry. A dub given a
  ``job_id`` (the service's jobs) is logged once per job: a re-run after a crash does not add
  a second, unrelated entry (see :meth:`~latentdub.provenance.audit.AuditLog.append_job`).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentdub.files import sha256_file
from latentdub.provenance.audit import AuditLog, chain_path, chain_paths, dub_entry
from latentdub.provenance.c2pa import C2paSigner, ProvenanceClaims
from latentdub.provenance.fingerprint import FingerprintFilter
from latentdub.provenance.keys import SigningKeys, default_signing

log = logging.getLogger(__name__)
_announce_lock = threading.Lock()
_announced: set[Path] = set()


@dataclass
class ProvenanceSettings:
    """Where a deployment keeps its signing keys and audit log (per pipeline, not per dub)."""

    signing: SigningKeys | None = None  # None: the user's keys in the data folder, made on first use
    audit_log: Path | None = None  # None: ``audit.jsonl`` in the data folder
    # A folder of per-machine chains (the service's ``audit/``): this machine appends to
    # ``<audit_dir>/<host>.jsonl`` and a job's earlier entry is looked up in every chain there.
    # Wins over ``audit_log``.
    audit_dir: Path | None = None
    # The deployment's secret watermark key: these bytes, or else ``watermark.key`` in
    # ``watermark_key_dir`` (None: the latentdub data folder), made on first use.
    watermark_key: bytes | None = None
    watermark_key_dir: Path | None = None

    def watermark_secret(self) -> bytes:
        """The key the watermark is made with (see :mod:`latentdub.provenance.watermark_key`)."""
        if self.watermark_key is not None:
            return self.watermark_key
        from latentdub.provenance.watermark_key import ensure_key, key_path

        key, created = ensure_key(self.watermark_key_dir)
        if created:
            log.warning("created a secret watermark key in %s (verify needs it: keep it)", key_path(self.watermark_key_dir))
        return key

    def audit_paths(self) -> tuple[Path | None, list[Path]]:
        """The log this process appends to (None: the default) and the other chains beside it."""
        if self.audit_dir is None:
            return self.audit_log, []
        mine = chain_path(self.audit_dir)
        return mine, [p for p in chain_paths(self.audit_dir) if p.name != mine.name]

    def keys(self) -> SigningKeys:
        if self.signing is not None:
            return self.signing
        keys, created = default_signing()
        if created:
            with _announce_lock:
                if keys.chain_pem_path not in _announced:
                    _announced.add(keys.chain_pem_path)
                    log.warning(
                        "created a local signing key for content credentials in %s "
                        "(use your own with --signing-cert/--signing-key)", keys.chain_pem_path.parent
                    )
        return keys


class GeneratedFrames:
    """A frame filter that lets only the frames a model made through to ``mark`` (the watermark,
    or nothing) and keeps their time ranges. Frames arrive in output order, one sink per dub."""

    def __init__(self, mark: Any | None) -> None:
        self.mark = mark
        self.frames = 0
        self._ranges: list[list[float]] = []  # [start_s, time of the last frame] per run
        self._last: int | None = None  # index of the previous generated frame
        self._step = 0.04  # the latest frame interval seen: the length of a run's last frame

    def __call__(self, frame: Any, info: Any = None) -> Any:
        if info is None or not info.dubbed:
            return frame
        if self._ranges and self._last == info.index - 1:
            self._step = max(1e-3, info.time_s - self._ranges[-1][1])
            self._ranges[-1][1] = info.time_s
        else:
            self._ranges.append([info.time_s, info.time_s])
        self._last = info.index
        self.frames += 1
        return frame if self.mark is None else self.mark(frame, info)

    def ranges(self) -> tuple[tuple[float, float], ...]:
        """``(start_s, end_s)`` of each run of generated frames, to the millisecond."""
        return tuple((round(s, 3), round(e + self._step, 3)) for s, e in self._ranges)


class DubProvenance:
    """Watermark, content credentials and audit entry of one dub."""

    def __init__(
        self,
        *,
        video_sha256: str,
        audio_sha256: str,
        options: Mapping[str, Any],
        model: Mapping[str, Any],
        consent: Any | None = None,
        job_id: str | None = None,
        settings: ProvenanceSettings | None = None,
    ) -> None:
        self.settings = settings or ProvenanceSettings()
        self.job_id = job_id or uuid.uuid4().hex
        self._given_job_id = job_id is not None  # only a caller's job can have been logged before
        self.consent = consent
        self.options = dict(options)
        self.model = dict(model)
        self.video_sha256, self.audio_sha256 = video_sha256, audio_sha256
        self.watermark_on = bool(self.options.get("watermark", True))
        self._watermarker: Any = None
        self.watermark_id: str | None = None
        if self.watermark_on:
            from latentdub.provenance.watermark import Watermarker, payload_for_job

            payload = payload_for_job(self.job_id)
            self._watermarker = Watermarker(payload, key=self.settings.watermark_secret())
            self.watermark_id = payload.hex
        self.generated = GeneratedFrames(self._watermarker)
        # What the output looks like, for verify's copied-mark check (after the mark: as written).
        self.fingerprint = FingerprintFilter() if self.watermark_on else None
        self.keys = self.settings.keys()  # before any work: a bad key fails the dub in a second
        self._signer = C2paSigner(self.keys)
        self.claims = ProvenanceClaims(
            model=self.model,
            video_sha256=video_sha256,
            audio_sha256=audio_sha256,
            consent_id=self.consent_id,
            watermark=self.watermark_on,
            watermark_id=self.watermark_id,
            options=self.options,
        )

    @property
    def consent_id(self) -> str | None:
        if self.consent is None:
            return None
        return str(getattr(self.consent, "id", None) or dict(self.consent).get("id") or "") or None

    def frame_filters(self) -> list[Any]:
        return [self.generated] + ([self.fingerprint] if self.fingerprint is not None else [])

    def finalizers(self) -> list[Any]:
        return [self._sign, self._audit]

    @property
    def marked(self) -> bool:
        """Whether any frame carries the watermark (a dub that made no frame has none)."""
        return self.watermark_on and self.generated.frames > 0

    def final_claims(self) -> ProvenanceClaims:
        """The claims with what only the finished render knows: the generated time ranges."""
        from dataclasses import replace

        marked = self.marked
        return replace(self.claims, generated=self.generated.ranges(), watermark=marked,
                       watermark_id=self.watermark_id if marked else None)

    def _sign(self, tmp_path: Path) -> dict[str, Any]:
        """Sign the finished file with the final claims (content credentials, C2PA)."""
        return {"c2pa": self._signer.sign_in_place(Path(tmp_path), self.final_claims())}

    def _audit(self, tmp_path: Path) -> dict[str, Any]:
        """Record the finished (signed) file; runs just before the rename."""
        entry = dub_entry(
            consent=self.consent,
            video_sha256=self.video_sha256,
            audio_sha256=self.audio_sha256,
            output_sha256=sha256_file(tmp_path),
            options=self.options,
            model=self.model,
            job_id=self.job_id,
            watermark_id=self.watermark_id if self.marked else None,
            generated_ranges=[list(r) for r in self.generated.ranges()],
            **({"fingerprint": self.fingerprint.fingerprint().to_dict()} if self.fingerprint and self.marked else {}),
        )
        path, peers = self.settings.audit_paths()
        audit_log = AuditLog(path)
        if self._given_job_id:  # a re-run of a job (crash before it was marked done): one entry per job
            written, _ = audit_log.append_job(entry, peers=peers)
        else:
            written = audit_log.append(entry)
        info = {"seq": written.get("seq"), "hash": written.get("hash"), "log": str(audit_log.path)}
        if isinstance(written.get("supersedes"), dict):
            info["supersedes"] = written["supersedes"]
        return {"audit": info}

    def summary(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "consent_id": self.consent_id,
            "watermark": {"on": self.watermark_on, "id": self.watermark_id, "marked_frames": self.generated.frames},
            "generated_ranges": [list(r) for r in self.generated.ranges()],
            "inputs": {"video_sha256": self.video_sha256, "audio_sha256": self.audio_sha256},
        }
