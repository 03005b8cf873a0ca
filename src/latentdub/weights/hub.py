"""The Hugging Face hub side of the weights: its cache, its reachability, downloads.

Files are fetched through huggingface_hub's cache (once, resumably, honouring ``HF_TOKEN`` /
``HF_HUB_OFFLINE`` / ``HF_HOME`` / ``HF_ENDPOINT``); an unreachable hub is reported in seconds,
once, with what to do without network. A failed download into a folder leaves that folder as
it found it, except for partial files, which the next try resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from latentdub.errors import WeightsError
from latentdub.weights.checkpoint import short_reason
from latentdub.weights.layout import (
    DEFAULT_VERSION,
    HUB_REPOS,
    HUB_VERSIONS,
    LAYOUT_HELP,
    UNET_FILE,
    VAE_FILES,
    VAE_REPO,
    VAE_SUBDIRS,
    WHISPER_FILE,
)
from latentdub.weights.syncnet import SYNCNET_FILE


def hub_offline() -> bool:
    """Offline mode, read at call time (huggingface_hub only reads it when imported)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The hub cache folder, read at call time (same rules as huggingface_hub)."""
    from huggingface_hub import constants

    if value := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(value).expanduser()
    if value := os.environ.get("HF_HOME"):
        return Path(value).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _hub_wanted(version: str, components: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(component, repo, filename) for what a version needs from the hub."""
    wanted = []
    if "unet" in components:
        wanted.append(("unet", HUB_REPOS[version], UNET_FILE))
    if "whisper" in components:
        wanted.append(("whisper", HUB_REPOS[version], WHISPER_FILE))
    if "vae" in components:
        wanted += [("vae", VAE_REPO, name) for name in VAE_FILES]
    if "syncnet" in components:
        wanted.append(("syncnet", HUB_REPOS[version], SYNCNET_FILE))
    return wanted


HUB_PROBE_TIMEOUT_S = 3.0
"""How long the reachability check waits for the hub's first answer (any HTTP status)."""


def hub_endpoint() -> str:
    """The hub address, read at call time (``HF_ENDPOINT``; huggingface_hub reads it only
    when imported)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_unreachable_reason(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """``None`` if ``endpoint`` answers HTTP at all within ``timeout`` seconds, else why not.

    One request with no retries, through huggingface_hub's own client (so proxies and
    certificates are as for the downloads). huggingface_hub would retry a dead address for
    ~30 s per file; this answers in seconds. Run in a thread with a hard deadline because
    name resolution is not covered by the client's timeout.
    """
    from huggingface_hub.utils import get_session

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=timeout)
        except Exception as err:  # any failure to get an HTTP answer means unreachable
            outcome.append(short_reason(err.__cause__ or err))
        else:
            outcome.append(None)

    thread = threading.Thread(target=probe, name="latentdub-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return outcome[0] if outcome else f"no answer within {timeout:.0f} s"


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Mute huggingface_hub's own warnings (retries; printed twice, by its handler and by
    propagation): failures reach the user as one WeightsError instead."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _describe_failure(err: Exception) -> str:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(err, GatedRepoError | RepositoryNotFoundError):
        return (
            "the hub refused access (set HF_TOKEN to a token that may read the repository): "
            + short_reason(err)
        )
    if not isinstance(err, HfHubHTTPError):
        return (
            f"the Hugging Face hub could not be reached ({short_reason(err.__cause__ or err)}) "
            "and they are not in the cache"
        )
    return f"they could not be downloaded ({short_reason(err)})"


def _hub_files(
    version: str,
    *,
    download: bool,
    components: tuple[str, ...] = ("unet", "whisper", "vae"),
    local_dir: Path | None = None,
    message: Callable[[str, list[tuple[str, str]], str, Path], str] | None = None,
) -> dict[str, Path]:
    """Find the hub files in the cache, download what is missing; one WeightsError listing
    all that failed.

    The cache (or ``local_dir``) is looked at first, so a filled cache needs no network at
    all. Before any download the hub is probed once: when it cannot be reached the error
    comes in seconds instead of after huggingface_hub's retries for every file. ``message``
    builds the error text (default: the one for the model weights).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    describe = message or _missing_message
    offline = hub_offline()
    cache_dir = hub_cache_dir()
    endpoint = hub_endpoint()

    def fetch(component: str, repo: str, filename: str, network: bool) -> Path:
        target = None
        if local_dir is not None:
            target = local_dir / VAE_SUBDIRS[0] if component == "vae" else local_dir
        with _quiet_hub():
            path = hf_hub_download(
                repo,
                filename,
                cache_dir=cache_dir,
                local_dir=target,
                token=None,  # let huggingface_hub read HF_TOKEN / the stored login
                local_files_only=not network,
                endpoint=endpoint,
            )
        return Path(path)

    found: dict[str, Path] = {}
    missing: list[tuple[str, str, str]] = []
    for component, repo, filename in _hub_wanted(version, components):
        try:
            path = fetch(component, repo, filename, network=False)
        except Exception:  # not in the cache (or an unreadable cache entry)
            missing.append((component, repo, filename))
            continue
        found[component] = path.parent if component == "vae" else path

    failed = [(repo, filename) for _, repo, filename in missing]
    reason = ""
    if missing and offline:
        reason = "offline mode is on (HF_HUB_OFFLINE=1) and they are not in the cache"
    elif missing and not download:
        reason = "they are not in the cache (and downloading was not allowed)"
    elif missing:
        unreachable = hub_unreachable_reason(endpoint)
        if unreachable is not None:
            reason = (
                f"the Hugging Face hub ({endpoint}) cannot be reached ({unreachable}) and "
                "they are not in the cache"
            )
    if reason:
        raise WeightsError(describe(version, failed, reason, cache_dir))

    failed = []
    network = True
    for component, repo, filename in missing:
        if not network:
            failed.append((repo, filename))
            continue
        try:
            path = fetch(component, repo, filename, network=True)
        except Exception as err:  # network, auth: all become one message
            reason = reason or _describe_failure(err)
            failed.append((repo, filename))
            # The connection broke: further tries would each cost huggingface_hub's retries.
            network = isinstance(err, HfHubHTTPError)
            continue
        found[component] = path.parent if component == "vae" else path
    if failed:
        raise WeightsError(describe(version, failed, reason, cache_dir))
    return found


TINY_HINT = (
    "To try latentdub without the real weights (offline, seconds): `latentdub weights make-tiny "
    "DIR`, then pass --weights DIR (a tiny random model: a smoke test, its output is not a dub)."
)


def _needed(failed: list[tuple[str, str]]) -> str:
    by_repo: dict[str, list[str]] = {}
    for repo, filename in failed:
        by_repo.setdefault(repo, []).append(filename)
    return "\n".join(f"  - {repo}: {', '.join(names)}" for repo, names in by_repo.items())


def _missing_message(
    version: str, failed: list[tuple[str, str]], reason: str, cache_dir: Path
) -> str:
    v = version if version in HUB_VERSIONS else DEFAULT_VERSION
    return (
        f"LatentSync {version} weights are not available: {reason}.\n"
        f"Needed from the Hugging Face hub (cache: {cache_dir}):\n{_needed(failed)}\n"
        "Get them with one of:\n"
        f"  - latentdub weights download --version {v}            (into the Hugging Face cache)\n"
        f"  - latentdub weights download --version {v} --dir DIR  (then pass --weights DIR)\n"
        "  - or copy the files into a folder yourself and pass --weights DIR; layout:\n"
        f"{textwrap.indent(LAYOUT_HELP, '    ')}\n"
        "(Downloading needs network access; a token in HF_TOKEN is used if set.)\n"
        f"{TINY_HINT}"
    )


def _download_message(
    version: str, failed: list[tuple[str, str]], reason: str, cache_dir: Path
) -> str:
    """The error of ``weights download`` itself: it must not suggest running it again as is."""
    if hub_offline():
        retry = (
            "unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) on a machine "
            "with network access and run it again"
        )
    else:
        retry = (
            "check the network (and HF_ENDPOINT, HF_TOKEN) and run it again; files already "
            "downloaded are kept and partial ones resume"
        )
    return (
        f"could not download LatentSync {version} weights: {reason}.\n"
        f"Needed from the Hugging Face hub:\n{_needed(failed)}\n"
        f"To fix: {retry}.\n"
        "Without network: copy the files (from a machine that has them) into a folder in this "
        "layout and pass --weights DIR:\n"
        f"{textwrap.indent(LAYOUT_HELP, '    ')}\n"
        f"{TINY_HINT}"
    )


def _hub_cached(repo: str, filename: str, cache_dir: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    except Exception:  # an odd cache layout must not break a status report
        return None
    return Path(hit) if isinstance(hit, str) else None


# --------------------------------------------------------------------------------------------
# failed downloads

# What huggingface_hub creates in a local_dir before it has any data: lock files, the
# markers of its .cache folder, and (empty) folders.
_HUB_BOOKKEEPING = ("CACHEDIR.TAG", ".gitignore")


def _download_tree(folder: Path) -> set[Path]:
    """The paths a download into ``folder`` can create: its entries, and everything under the
    subfolders it writes to (not a walk of all of ``folder``: ``--dir .`` must stay cheap)."""
    if not folder.is_dir():
        return set()
    paths = set(folder.iterdir())
    for name in {".cache", VAE_SUBDIRS[0], *(Path(f).parts[0] for f in (WHISPER_FILE, SYNCNET_FILE))}:
        sub = folder / name
        if sub.is_dir() and not sub.is_symlink():
            paths |= set(sub.rglob("*"))
    return paths


@contextlib.contextmanager
def _tidy_on_failure(folder: Path) -> Iterator[None]:
    """On an error, remove what was created under ``folder`` that holds no downloaded data
    (huggingface_hub's lock files and empty folders), and ``folder`` itself and the parents
    made for it if they are then empty: a failed download leaves the disk as it found it.
    Partial downloads (``*.incomplete``) are kept, so the next try resumes them."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    before = _download_tree(folder)
    try:
        yield
    except BaseException:
        if folder.is_dir():
            # Deepest first, so a folder is looked at after its contents.
            for path in sorted(_download_tree(folder) - before, key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    if path.is_dir() and not path.is_symlink():
                        path.rmdir()  # only if empty
                    elif path.name.endswith(".lock") or path.name in _HUB_BOOKKEEPING:
                        path.unlink()
        for path in created:  # folder first, then its new parents
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
