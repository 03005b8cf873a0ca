"""The provenance of one dub: the hooks the pipeline adds to every render.

* the invisible watermark, a frame filter that runs after the caller's filters (so nothing the
  caller draws can sit on top of it) — unless ``DubOptions.watermark`` is off;
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
from latentdub.provenance.c2pa import ProvenanceClaims, c2pa_finalizer
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
            self._watermarker = Watermarker(payload)
            self.watermark_id = format(payload.job_id, "x")
        self.keys = self.settings.keys()  # before any work: a bad key fails the dub in a second
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
        return [self._watermarker] if self._watermarker is not None else []

    def finalizers(self) -> list[Any]:
        return [c2pa_finalizer(self.keys, self.claims), self._audit]

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
            watermark_id=self.watermark_id,
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
            "watermark": {"on": self.watermark_on, "id": self.watermark_id},
            "inputs": {"video_sha256": self.video_sha256, "audio_sha256": self.audio_sha256},
        }
