"""Hugging Face hub access: released checkpoints, a fast offline check, one clear error.

Every hub download fastenc does goes through here. Before the first network request the hub's
reachability is checked once per process (``HF_HUB_OFFLINE``, then a TCP connect to the endpoint or
proxy with a short timeout), so an offline machine gets one error at once instead of minutes of
retries. Offline, files already in the local hub cache are still used. The error names the exact
``hf download`` command (the CLI that ships with ``huggingface_hub``) to run where the hub is
reachable, and the flag or argument that takes the downloaded folder.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from .errors import CheckpointError, ConfigError, FastencError

#: Named sizes that have a released, trained checkpoint on the hub (the paper released T5-Base only).
RELEASED: dict[str, str] = {"base": "LifuWang/DistillT5"}
#: What a checkpoint download fetches (weights and configs; never pickles).
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors")
PROBE_TIMEOUT_S = 3.0

log = logging.getLogger("fastenc")

_cli_words = False


class HubUnavailable(FastencError):
    """The hub cannot be reached (offline, no route, HF_HUB_OFFLINE) and no cached copy exists."""


def speak_cli(on: bool = True) -> None:
    """Word error messages with command-line flags (``--checkpoint DIR``) instead of Python arguments."""
    global _cli_words
    _cli_words = on


def _way(cli: str, api: str) -> str:
    return cli if _cli_words else api


def random_init_hint() -> str:
    return _way("--random-init", "random_init=True")


def released_checkpoint(size: str) -> str:
    """The hub id of the released checkpoint of ``size``; ConfigError naming the ways out when none exists."""
    repo = RELEASED.get(size)
    if repo is None:
        known = ", ".join(f"{s} ({r})" for s, r in RELEASED.items())
        raise ConfigError(
            f"size {size!r} has no released checkpoint (released: {known}); pass "
            f"{_way('--checkpoint DIR|HUB_ID', 'a checkpoint (folder or hub id)')} for trained weights, or "
            f"{random_init_hint()} for random weights of that size (timings only)"
        )
    return repo


def download_command(repo_id: str, *, include: tuple[str, ...] = (), files: tuple[str, ...] = ()) -> tuple[str, str]:
    """``(command, folder)``: the ``hf download`` line to run where the hub is reachable, and its output folder."""
    folder = repo_id.rsplit("/", 1)[-1]
    parts = ["hf", "download", repo_id, *files]
    for pattern in include:
        parts += ["--include", f"'{pattern}'"]
    parts += ["--local-dir", folder]
    return " ".join(parts), folder


def _proxy_target() -> tuple[str, int] | None:
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        value = os.environ.get(name)
        if value:
            url = urlparse(value if "://" in value else f"http://{value}")
            if url.hostname:
                return url.hostname, url.port or 80
    return None


def _endpoint() -> tuple[str, int]:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _env_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


@functools.lru_cache(maxsize=None)
def _probe(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to host:port opens within ``timeout`` s (name lookup included), else why not."""
    result: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(f"{host}:{port} unreachable: {exc.strerror or exc}")

    thread = threading.Thread(target=attempt, daemon=True)  # name lookup ignores socket timeouts
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"{host}:{port} did not answer within {timeout:g} s"


def offline_reason() -> str | None:
    """Why the hub cannot be used right now (None when it can): HF_HUB_OFFLINE, or no connection."""
    if _env_offline():
        return "HF_HUB_OFFLINE is set"
    timeout = float(os.environ.get("FASTENC_HUB_TIMEOUT", PROBE_TIMEOUT_S))
    proxy = _proxy_target()
    host, port = proxy or _endpoint()
    why = _probe(host, port, timeout)
    return None if why is None else f"the hub is unreachable ({'proxy ' if proxy else ''}{why})"


def download_checkpoint(repo_id: str, *, subfolder: str | None = None) -> Path:
    """Local folder of hub checkpoint ``repo_id`` (json + safetensors only), from the cache when offline."""
    import huggingface_hub

    patterns = list(CHECKPOINT_PATTERNS)
    if subfolder:
        patterns = [f"{subfolder}/{p}" for p in patterns]
    reason = offline_reason()
    if reason is None:
        from huggingface_hub import constants

        log.info("fastenc: fetching %s (%s) from the Hugging Face hub into its cache %s (`hf cache ls` lists it)",
                 repo_id, ", ".join(patterns), constants.HF_HUB_CACHE)
    try:
        local = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, local_files_only=reason is not None)
    except Exception as exc:  # offline without a cached copy, unknown or gated repo, network failure
        why = f"{reason}, and no copy in the local hub cache" if reason else _describe(exc)
        raise CheckpointError(_checkpoint_message(repo_id, subfolder, why)) from None
    path = Path(local) / subfolder if subfolder else Path(local)
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(_checkpoint_message(repo_id, subfolder, "no .safetensors file in the hub copy"))
    return path


def _checkpoint_message(repo_id: str, subfolder: str | None, why: str) -> str:
    include = (f"{subfolder}/*",) if subfolder else ()
    command, folder = download_command(repo_id, include=include)
    local = f"{folder}/{subfolder}" if subfolder else folder
    message = (f"{repo_id}: not a local path, and the hub download failed ({why}). Pass a local directory holding "
               f"config.json and model.safetensors instead: where the hub is reachable run `{command}`, copy "
               f"{folder}/ here and pass {_way(f'--checkpoint {local}', f'fastenc.load({local!r})')}")
    if repo_id in RELEASED.values():
        message += f"; or pass {random_init_hint()} for random weights (timings only)"
    return message


def fetch_file(repo_id: str, filename: str, *, subfolder: str | None = None) -> Path | None:
    """One file of hub repo ``repo_id`` (from the cache when offline); None when the repo has no such file.

    Raises :class:`HubUnavailable` when the hub cannot be reached and the file is not cached, and
    ConfigError for an unknown or gated repo.
    """
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    reason = offline_reason()
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, subfolder=subfolder,
                                                    local_files_only=reason is not None))
    except LocalEntryNotFoundError as exc:  # (a subclass of EntryNotFoundError) not cached, hub not used
        raise HubUnavailable(f"{reason}, and no copy in the local hub cache" if reason else _describe(exc)) from None
    except EntryNotFoundError:  # the repo exists and has no such file
        return None
    except Exception as exc:  # unknown repo, gated repo, network failure
        raise HubUnavailable(_describe(exc)) from None


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def tokenizer_hint(repo_id: str, subfolder: str | None = None) -> str:
    """How to get a tokenizer of hub repo ``repo_id`` onto an offline machine."""
    if subfolder:
        command, folder = download_command(repo_id, files=(f"{subfolder}/tokenizer.json",))
    else:
        command, folder = download_command(repo_id, include=("tokenizer*",))
    return (f"where the hub is reachable run `{command}`, copy {folder}/ here and pass "
            f"{_way(f'--tokenizer {folder}', f'tokenizer={folder!r}')}")
