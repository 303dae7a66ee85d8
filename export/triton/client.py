"""Encode prompts with a fastenc Triton ensemble over HTTP and save the result as .npz.

    python export/triton/client.py --url 127.0.0.1:8000 --model fastenc -o out.npz "a cat" "a red fox"

Writes ``text_embeddings`` [B, L, P] and ``attention_mask`` [B, L] (``numpy.load(out.npz)``).
A request the server could not take (connection refused or reset, server or model not ready, HTTP 502/503/504:
a restart or overload) is retried with exponential backoff (0.25 s doubling to 4 s, with jitter) until
``--deadline`` seconds have passed since the first try; then the last error is reported. A request the
server rejected (HTTP 400: bad input, batch too large) is not retried. Encoding is idempotent, so a retry
after a lost response is safe. Exit status 0 on success, 1 with one ``client.py: error: ...`` line.
Needs ``tritonclient[http]`` and numpy (both in the venv of scripts/triton_env.sh).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from typing import Callable

import numpy as np

#: Server messages that mean "not now" rather than "never" (a restart, a model still loading).
RETRY_MESSAGES = ("not ready", "unavailable", "is not found", "connection", "reset by peer", "broken pipe",
                  "timed out", "timeout", "eof", "remote end closed")
RETRY_STATUS = {"502", "503", "504", "StatusCode.UNAVAILABLE"}


class ClientError(RuntimeError):
    """The request failed for good: rejected by the server, or not served before the deadline."""


def _retryable(exc: Exception) -> bool:
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        if status == "400":
            return False
        text = str(exc.message() or "").lower()
        return status in RETRY_STATUS or any(m in text for m in RETRY_MESSAGES)
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or any(
        m in str(exc).lower() for m in RETRY_MESSAGES)


def _message(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def encode(url: str, model: str, prompts: list[str], timeout: float = 60.0, *, deadline: float = 120.0,
           backoff: float = 0.25, max_backoff: float = 4.0,
           on_retry: Callable[[int, Exception], None] | None = None) -> dict[str, np.ndarray]:
    """Prompts as a [B, 1] BYTES tensor -> {output name: array}, retried as the module docstring says.

    ``timeout`` bounds one attempt (connection and response), ``deadline`` all of them; ``on_retry(attempt,
    error)`` is called before each retry. Raises :class:`ClientError` naming the attempts made."""
    import tritonclient.http as httpclient

    if deadline <= 0 or timeout <= 0:
        raise ClientError(f"timeout and deadline must be > 0, got {timeout} and {deadline}")
    text = np.array([[p.encode("utf-8")] for p in prompts], dtype=object)  # [B, 1]
    names = ("text_embeddings", "attention_mask")
    start = time.monotonic()
    attempt, wait = 0, backoff
    while True:
        attempt += 1
        left = deadline - (time.monotonic() - start)
        per_try = max(0.1, min(timeout, left))
        try:
            client = httpclient.InferenceServerClient(url, connection_timeout=per_try, network_timeout=per_try)
            try:
                request = httpclient.InferInput("text", list(text.shape), "BYTES")
                request.set_data_from_numpy(text)
                result = client.infer(model, [request], outputs=[httpclient.InferRequestedOutput(n) for n in names])
                return {n: result.as_numpy(n) for n in names}
            finally:
                client.close()
        except Exception as exc:  # tritonclient raises InferenceServerException, gevent/socket errors
            if not _retryable(exc):
                raise ClientError(_message(exc)) from exc
            left = deadline - (time.monotonic() - start)
            if left <= 0:
                raise ClientError(f"not served within the {deadline:g} s deadline ({attempt} attempts); "
                                  f"last error: {_message(exc)}") from exc
            if on_retry is not None:
                on_retry(attempt, exc)
            time.sleep(min(wait * (0.5 + random.random()), left))
            wait = min(wait * 2, max_backoff)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port of the HTTP endpoint")
    parser.add_argument("--model", default="fastenc", help="ensemble name (fastenc triton-repo --name)")
    parser.add_argument("-o", "--output", required=True, help=".npz file to write")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for one attempt (default 60)")
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="seconds for all attempts, retries included (default 120)")
    args = parser.parse_args(argv)
    try:
        arrays = encode(args.url, args.model, args.prompts, args.timeout, deadline=args.deadline)
    except Exception as exc:
        sys.stderr.write(f"client.py: error: {_message(exc)}\n")
        return 1
    folder = os.path.dirname(os.path.abspath(args.output))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
