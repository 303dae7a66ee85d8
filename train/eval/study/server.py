"""The study as a local web page (stdlib ``http.server``, one thread per request, answers in SQLite).

Bound to 127.0.0.1 by default; there every request must name this machine in its Host header (so a web
page elsewhere cannot reach the study through DNS rebinding) and a form must come from the study's own
pages. Any other address needs ``--allow-remote`` and runs with a token: every request then carries it
(``?token=`` once, then a cookie, or ``Authorization: Bearer``) or is refused with 403, results included.

Routes: ``/`` start (or continue, from the cookie), ``POST /start`` a new participant, ``/p/<id>`` the
next pair, ``POST /p/<id>/answer``, ``/p/<id>/img/<position>/<A|B>``, ``/p/<id>/stop``; ``/results``
(HTML), ``/results.json``, ``/results.csv`` (answers), ``/shares.csv``.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import mimetypes
import socket
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from fastenc.errors import ConfigError

from . import pages, results
from .db import CHOICES, StudyDB

log = logging.getLogger("fastenc.train")

TOKEN_COOKIE = "fastenc_study_token"
DEFAULT_QUESTION = "Which image matches the prompt better?"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class StudyApp:
    """What the handler needs: the database, the access rule and the page texts."""

    def __init__(self, db: StudyDB, *, host: str, token: str | None, question: str = DEFAULT_QUESTION,
                 confidence: float = 0.95):
        self.db, self.host, self.token = db, host, token
        self.question, self.confidence = question, confidence
        self.cookie = f"fastenc_study_{db.meta['fingerprint'][:8]}"  # one cookie per study: ports share cookies
        self.port = 0

    def local_hosts(self) -> set[str]:
        return {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]", self.host)}

    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"http://{host}:{self.port}/"

    def url(self, path: str = "") -> str:
        suffix = f"?token={quote(self.token)}" if self.token else ""
        return self.base_url() + path + suffix


class Handler(BaseHTTPRequestHandler):
    server_version = "fastenc-study"
    timeout = 30  # seconds a connection may stay silent
    app: StudyApp  # set on the subclass the server builds

    def log_message(self, fmt, *args):  # requests go to the log at debug level, not stderr
        log.debug("study: %s %s", self.address_string(), fmt % args)

    # -------------------------------------------------------------------------------- plumbing

    def _send(self, status: int, body: bytes | str, ctype: str = "text/html; charset=utf-8",
              headers: dict | None = None, cache: str = "no-store") -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        for k, v in (headers or {}).items():
            for one in (v if isinstance(v, list) else [v]):
                self.send_header(k, one)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _redirect(self, location: str, cookies: list[str] | None = None) -> None:
        self._send(HTTPStatus.SEE_OTHER, "", headers={"Location": location, "Set-Cookie": cookies or []})

    def _cookies(self) -> dict[str, str]:
        jar = SimpleCookie()
        try:
            jar.load(self.headers.get("Cookie", ""))
        except Exception:  # a malformed Cookie header counts as none
            return {}
        return {k: m.value for k, m in jar.items()}

    def _set_cookie(self, name: str, value: str) -> str:
        return f"{name}={value}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Strict"

    def _refuse(self, why: str) -> None:
        self._send(HTTPStatus.FORBIDDEN, pages.message("Forbidden", why))

    def _access(self) -> tuple[bool, list[str]]:
        """(allowed, cookies to set). Local: the Host header names this machine. Remote: the token."""
        app = self.app
        if app.token is None:
            if self.headers.get("Host", "") not in app.local_hosts():
                self._refuse("this study answers only requests addressed to this machine")
                return False, []
            if self.command == "POST":
                origin = self.headers.get("Origin")
                if origin and origin != "null" and urlsplit(origin).netloc not in app.local_hosts():
                    self._refuse("forms are accepted only from the study's own pages")
                    return False, []
            return True, []
        given = [v for v in parse_qs(urlsplit(self.path).query).get("token", [])]
        given.append(self._cookies().get(TOKEN_COOKIE, ""))
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given.append(auth[7:])
        if any(hmac.compare_digest(g.encode(), app.token.encode()) for g in given if g):
            return True, [self._set_cookie(TOKEN_COOKIE, quote(app.token))]
        self._refuse("this study needs its token: open the address with ?token=... that the researcher gave you")
        return False, []

    # -------------------------------------------------------------------------------- routes

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        ok, cookies = self._access()
        if not ok:
            return
        db, app = self.app.db, self.app
        parts = [p for p in urlsplit(self.path).path.split("/") if p]
        extra = {"Set-Cookie": cookies} if cookies else None
        if not parts:
            pid = self._cookies().get(app.cookie)
            resume = None
            if pid and db.participant(pid) is not None:
                done, total = db.progress(pid)
                resume = (pid, done, total)
            return self._send(200, pages.start(app.question, len(db.items), resume), headers=extra)
        if parts[0] == "p" and len(parts) >= 2:
            pid = parts[1]
            if db.participant(pid) is None:
                return self._send(404, pages.message("Unknown participant", "Start again from the study's first page."))
            if len(parts) == 2:
                shown = db.shown(pid)
                body = pages.finished(len(db.items)) if shown is None else pages.pair(pid, shown, app.question)
                return self._send(200, body, headers=extra)
            if len(parts) == 3 and parts[2] == "stop":
                done, total = db.progress(pid)
                return self._send(200, pages.stopped(pid, done, total, app.url(f"p/{pid}")), headers=extra)
            if len(parts) == 5 and parts[2] == "img" and parts[3].isdigit() and parts[4] in ("A", "B"):
                return self._image(pid, int(parts[3]), parts[4])
        if parts == ["results"]:
            return self._send(200, pages.results(results.compute(db, app.confidence)), headers=extra)
        if parts == ["results.json"]:
            text = json.dumps(results.compute(db, app.confidence), indent=2, ensure_ascii=False)
            return self._send(200, text, "application/json; charset=utf-8", headers=extra)
        if parts == ["results.csv"]:
            return self._send(200, results.answers_csv(db), "text/csv; charset=utf-8", headers=extra)
        if parts == ["shares.csv"]:
            shares = results.shares_csv(results.compute(db, app.confidence))
            return self._send(200, shares, "text/csv; charset=utf-8", headers=extra)
        self._send(404, pages.message("Not found", self.path.split("?")[0]))

    def _image(self, pid: str, position: int, side: str) -> None:
        shown = self.app.db.shown(pid, position)
        if shown is None:
            return self._send(404, pages.message("Not found", "no such pair"))
        path = Path(shown.left_file if side == "A" else shown.right_file)
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.error("study: %s: %s", path, exc)
            return self._send(500, pages.message("Image missing", "an image of this pair cannot be read"))
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(200, data, ctype, cache="private, max-age=3600")

    def do_POST(self):
        ok, cookies = self._access()
        if not ok:
            return
        db, app = self.app.db, self.app
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= 4096:
            return self._send(400, pages.message("Bad request", "form too large or without a length"))
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        parts = [p for p in urlsplit(self.path).path.split("/") if p]
        if parts == ["start"]:
            pid = db.new_participant()
            return self._redirect(f"/p/{pid}", cookies + [self._set_cookie(app.cookie, pid)])
        if len(parts) == 3 and parts[0] == "p" and parts[2] == "answer":
            pid = parts[1]
            if db.participant(pid) is None:
                return self._send(404, pages.message("Unknown participant", "Start again from the study's first page."))
            choice = (form.get("choice") or [""])[0]
            position = (form.get("position") or [""])[0]
            if choice not in CHOICES or not position.isdigit() or int(position) >= len(db.items):
                return self._send(400, pages.message("Bad request", "expected choice A, B or tie and a position"))
            db.answer(pid, int(position), choice)  # a repeated form (back button, double press) changes nothing
            return self._redirect(f"/p/{pid}", cookies)
        self._send(404, pages.message("Not found", self.path.split("?")[0]))


def bind(app: StudyApp, port: int) -> ThreadingHTTPServer:
    handler = type("StudyHandler", (Handler,), {"app": app})
    family = socket.AF_INET6 if ":" in app.host else socket.AF_INET
    server_class = type("StudyServer", (ThreadingHTTPServer,), {"address_family": family})
    try:
        server = server_class((app.host.strip("[]"), port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port}: already in use on {app.host} (choose another, or --port 0 for a "
                              f"free one)") from None
        raise ConfigError(f"--host {app.host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    server.daemon_threads = True  # an idle browser connection never holds up stopping; SQLite keeps commits whole
    app.port = server.server_address[1]
    return server
