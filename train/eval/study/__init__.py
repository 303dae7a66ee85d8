"""A blind pairwise preference study on ``generate`` outputs (supplement §1: "which image matches the prompt
better: A, B, or tied"), served as a local web page; answers in SQLite; ``--report`` for the numbers.

* :mod:`.pairs`   the pairs, from one or more ``generate`` outputs that pair up
* :mod:`.db`      the SQLite database: pairs, participants and their order, answers
* :mod:`.server`  the web server (access rules, routes); :mod:`.pages` its HTML
* :mod:`.results` shares with Wilson intervals, agreement between participants, CSV/JSON
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from fastenc.errors import ConfigError

log = logging.getLogger("fastenc.train")

TOKEN_ENV = "FASTENC_STUDY_TOKEN"


def open_db(args, out: Path):
    from .db import StudyDB
    from .pairs import build_items

    path = Path(args.db) if args.db else out / "study.sqlite"
    if args.images:
        items, about = build_items(args.images)
        return StudyDB(path, items=items, about=about, seed=args.seed)
    return StudyDB(path)


def report(args, out: Path) -> dict:
    from . import results

    db = open_db(args, out)
    try:
        result = results.write_report(db, out, args.confidence)
    finally:
        db.close()
    log.info("study: %d answers from %d participants: %s", result["answers"], result["participants"],
             ", ".join(f"{k} {v['share']:.1%}" for k, v in results.summary(result).items() if v["share"] is not None))
    return {**result, "overall": results.summary(result)}


def access(host: str, allow_remote: bool, token: str | None) -> str | None:
    """The token the server runs with: None on a loopback address, else ``token`` or a new one."""
    from .server import is_loopback

    token = token or os.environ.get(TOKEN_ENV) or None
    if is_loopback(host):
        return token
    if not allow_remote:
        raise ConfigError(f"--host {host}: not a loopback address; others on the network could answer and read the "
                          f"results: add --allow-remote (the study then asks for a token)")
    if token is not None and len(token) < 16:
        raise ConfigError(f"--token: {len(token)} characters; use at least 16 (or leave it out for a random one)")
    return token or secrets.token_urlsafe(24)


def _interrupt(signum, frame):  # SIGTERM stops the server as Ctrl-C does
    raise KeyboardInterrupt


def serve(args, out: Path) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM); prints one JSON line once it listens."""
    from .server import DEFAULT_QUESTION, StudyApp, bind

    if not 0 < args.confidence < 1:
        raise ConfigError(f"--confidence {args.confidence}: must be between 0 and 1")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be within 0..65535")
    token = access(args.host, args.allow_remote, args.token)
    db = open_db(args, out)
    missing = db.missing_files()
    if missing:
        db.close()
        raise ConfigError(f"--db {db.path}: image {missing[0]} is missing ({len(missing)} of the study's images)")
    app = StudyApp(db, host=args.host, token=token, question=args.question or DEFAULT_QUESTION,
                   confidence=args.confidence)
    server = bind(app, args.port)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    sys.stdout.write(json.dumps({"analysis": "study", "url": app.url(), "results": app.url("results"),
                                 "pairs": len(db.items), "participants": db.participant_count(), "db": str(db.path),
                                 "out": str(out)}) + "\n")
    sys.stdout.flush()
    log.info("study: %d pairs at %s (results: %s); Ctrl-C stops, answers are saved as they come", len(db.items),
             app.url(), app.url("results"))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("study: stopped; answers are in %s", db.path)
    finally:
        server.server_close()
        db.close()
    return 0
