"""Uploads: streamed to ``data_dir/uploads/<uuid>.<ext>`` with a byte limit, then sniffed.

The stored name is a fresh UUID and the extension comes from what PyAV finds in the content;
the client's filename and content type are never used. Limits (bytes, duration, frame size)
come from :class:`~latentdub.service.settings.ServiceSettings`, and so does the per-key storage
limit an upload is recorded within (``key_storage_bytes``).
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import anyio

from latentdub.errors import InputError
from latentdub.service.models import Asset
from latentdub.service.settings import ServiceSettings
from latentdub.service.store import JobStore, StorageQuotaReached

UPLOADS_DIR = "uploads"
CHUNK = 1 << 20
MIN_AUDIO_S = 0.5

# Container format (PyAV's names) → the extension the stored file gets.
_EXTENSIONS = (
    ("mp4", "mp4"),
    ("mov", "mov"),
    ("matroska", "mkv"),
    ("webm", "webm"),
    ("avi", "avi"),
    ("mpegts", "ts"),
    ("wav", "wav"),
    ("mp3", "mp3"),
    ("flac", "flac"),
    ("ogg", "ogg"),
    ("aac", "aac"),
)


class UploadError(Exception):
    """An upload refused: HTTP ``status``, error ``code``, a message naming the field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        super().__init__(message)


def _extension(format_name: str) -> str:
    names = format_name.split(",")
    for name, ext in _EXTENSIONS:
        if name in names:
            return ext
    return "bin"


def _clean(message: str, path: Path, field: str) -> str:
    """An error message without the server's storage path (the field's name instead)."""
    return message.replace(str(path), f"the {field} upload").replace(path.name, f"the {field} upload")


async def receive(upload: Any, field: str, settings: ServiceSettings) -> tuple[Path, str, int]:
    """Stream ``upload`` (a Starlette ``UploadFile``) to a new file: ``(path, sha256, bytes)``."""
    folder = settings.data_dir / UPLOADS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4()}.part"
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("xb") as fh:
            while True:
                chunk = await upload.read(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise UploadError(
                        413,
                        "upload_too_large",
                        f"{field}: the upload is larger than the limit of {settings.max_upload_bytes} bytes",
                        field,
                    )
                digest.update(chunk)
                await anyio.to_thread.run_sync(fh.write, chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if size == 0:
        path.unlink(missing_ok=True)
        raise UploadError(422, "empty_upload", f"{field}: the uploaded file is empty (0 bytes)", field)
    return path, digest.hexdigest(), size


def sniff(path: Path, field: str, kind: str, settings: ServiceSettings) -> Path:
    """Check the content with PyAV and give the file its extension; returns the final path.

    Not media at all (or no stream of the needed kind) → 415; media that cannot be dubbed
    (too short, one frame, broken) → 422; over the duration or frame size limits → 413 / 422.
    """
    import av

    try:
        try:
            with av.open(str(path), mode="r") as container:
                fmt = container.format.name
                has_video = bool(container.streams.video)
                has_audio = bool(container.streams.audio)
        except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as err:
            raise UploadError(
                415,
                "unsupported_media",
                f"{field}: the file is not a media file that can be read (or it is truncated); "
                f"upload a {kind} file ({getattr(err, 'strerror', None) or type(err).__name__})",
                field,
            ) from None
        if kind == "video" and not has_video:
            raise UploadError(415, "unsupported_media", f"{field}: the file has no video stream", field)
        if kind == "audio" and not has_audio:
            raise UploadError(415, "unsupported_media", f"{field}: the file has no audio stream", field)
        final = path.with_suffix(f".{_extension(fmt)}")
        path.rename(final)
        path = final
        if kind == "video":
            _check_video(path, field, settings)
        else:
            _check_audio(path, field, settings)
        return path
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _check_video(path: Path, field: str, settings: ServiceSettings) -> None:
    from latentdub.media.reader import check_video, probe_video

    try:
        info = probe_video(path)
        check_video(info, path)
    except InputError as err:
        raise UploadError(422, "bad_video", f"{field}: {_clean(str(err), path, field)}", field) from None
    if info.frame_pixels > settings.max_frame_pixels:
        raise UploadError(
            422,
            "frame_too_large",
            f"{field}: the frame size {info.width}x{info.height} is over the limit of "
            f"{settings.max_frame_pixels} pixels",
            field,
        )
    if info.duration_s > settings.max_duration_s:
        raise UploadError(
            413,
            "too_long",
            f"{field}: the video is {info.duration_s:.1f} s long; the limit is {settings.max_duration_s:g} s",
            field,
        )


def _check_audio(path: Path, field: str, settings: ServiceSettings) -> None:
    from latentdub.media.audio_io import AudioTooLongError, load_audio

    # The limit goes into the decoding: a few KB can declare, or jump to, hours of audio, and
    # decoding all of it before comparing cost a minute and GBs. 16 kHz mono, as this check
    # keeps no samples: 600 s of it is 38 MB whatever the file's rate and channels.
    try:
        load_audio(path, min_duration_s=MIN_AUDIO_S, max_duration_s=settings.max_duration_s, mono_16k=True)
    except AudioTooLongError as err:
        raise UploadError(413, "too_long", f"{field}: {_clean(str(err), path, field)}", field) from None
    except InputError as err:
        raise UploadError(422, "bad_audio", f"{field}: {_clean(str(err), path, field)}", field) from None


def _storage_quota(err: StorageQuotaReached, field: str) -> UploadError:
    return UploadError(413, "storage_quota", f"{field}: {err}", field)


def check_storage(settings: ServiceSettings, store: JobStore, api_key_id: str | None, field: str) -> None:
    """An early 413 ``storage_quota`` when the key already stores its limit, before an upload
    streams in; :meth:`~.store.JobStore.add_asset` decides, under the key's lock."""
    limit = settings.key_storage_bytes
    if api_key_id is None or not limit:
        return
    used = store.storage_usage(api_key_id).bytes
    if used >= limit:
        raise _storage_quota(StorageQuotaReached(limit, used, 1), field)


async def save_upload(
    upload: Any, field: str, kind: str, settings: ServiceSettings, store: JobStore, api_key_id: str | None
) -> Asset:
    """Receive, sniff and record one upload as an :class:`Asset` (through the job store), within
    the key's storage limit (``settings.key_storage_bytes``: 413 ``storage_quota`` past it)."""
    await anyio.to_thread.run_sync(check_storage, settings, store, api_key_id, field)
    path, sha, size = await receive(upload, field, settings)
    final = await anyio.to_thread.run_sync(sniff, path, field, kind, settings)
    try:
        return await anyio.to_thread.run_sync(
            lambda: store.add_asset(kind=kind, sha256=sha, size=size, path=str(final), api_key_id=api_key_id,
                                    limit_bytes=settings.key_storage_bytes)
        )
    except StorageQuotaReached as err:
        final.unlink(missing_ok=True)
        raise _storage_quota(err, field) from None
    except BaseException:
        final.unlink(missing_ok=True)
        raise
