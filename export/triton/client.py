"""Encode prompts with a fastenc Triton ensemble over HTTP and save the result as .npz.

    python export/triton/client.py --url 127.0.0.1:8000 --model fastenc -o out.npz "a cat" "a red fox"

Writes ``text_embeddings`` [B, L, P] and ``attention_mask`` [B, L] (``numpy.load(out.npz)``).
Needs ``tritonclient[http]`` and numpy (both in the venv of scripts/triton_env.sh).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np


def encode(url: str, model: str, prompts: list[str], timeout: float = 60.0) -> dict[str, np.ndarray]:
    """One inference request: prompts as a [B, 1] BYTES tensor -> {output name: array}."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
    text = np.array([[p.encode("utf-8")] for p in prompts], dtype=object)  # [B, 1]
    request = httpclient.InferInput("text", list(text.shape), "BYTES")
    request.set_data_from_numpy(text)
    names = ("text_embeddings", "attention_mask")
    result = client.infer(model, [request], outputs=[httpclient.InferRequestedOutput(n) for n in names])
    return {n: result.as_numpy(n) for n in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port of the HTTP endpoint")
    parser.add_argument("--model", default="fastenc", help="ensemble name (fastenc triton-repo --name)")
    parser.add_argument("-o", "--output", required=True, help=".npz file to write")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for the connection and the request")
    args = parser.parse_args(argv)
    try:
        arrays = encode(args.url, args.model, args.prompts, args.timeout)
    except Exception as exc:  # tritonclient raises InferenceServerException and socket errors
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sys.stderr.write(f"client.py: error: {message}\n")
        return 1
    folder = os.path.dirname(os.path.abspath(args.output))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
