"""The study's SQLite database: its pairs, the participants with their order, and every answer.

Each answer is committed when it arrives, so stopping the server loses nothing. A participant's order
(pairs shuffled, left/right drawn per pair) is drawn once when they start and kept, so resuming gives
the same sequence. Participants are known by a random id (their resume key, kept out of exports) and
a running number.
"""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastenc.errors import ConfigError

from .pairs import Item, fingerprint

SCHEMA_VERSION = "1"
CHOICES = ("A", "B", "tie")  # A: the left image, B: the right one

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (id INTEGER PRIMARY KEY, prompt_index INTEGER NOT NULL, prompt TEXT NOT NULL,
                    encoder_a TEXT NOT NULL, encoder_b TEXT NOT NULL, file_a TEXT NOT NULL, file_b TEXT NOT NULL);
CREATE TABLE participants (id TEXT PRIMARY KEY, number INTEGER NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE assignments (participant TEXT NOT NULL REFERENCES participants(id), position INTEGER NOT NULL,
                          item INTEGER NOT NULL REFERENCES items(id), a_on_left INTEGER NOT NULL,
                          PRIMARY KEY (participant, position));
CREATE TABLE answers (participant TEXT NOT NULL REFERENCES participants(id), item INTEGER NOT NULL REFERENCES items(id),
                      position INTEGER NOT NULL, choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie')),
                      winner TEXT NOT NULL, answered REAL NOT NULL, PRIMARY KEY (participant, item));
"""


@dataclass(frozen=True)
class Shown:
    """A participant's pair at one position: which encoder's image is on which side."""

    position: int
    total: int
    item: Item
    item_id: int
    left: str  # encoder on the left (A)
    right: str
    left_file: str
    right_file: str


class StudyDB:
    """One connection, used under a lock (the server answers requests from several threads)."""

    def __init__(self, path: Path, *, items: list[Item] | None = None, about: dict | None = None,
                 seed: int | None = None):
        self.path = Path(path)
        self.lock = threading.Lock()
        if items is None and not self.path.is_file():
            raise ConfigError(f"--db {self.path}: no such study database (start one with --images DIR)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.con.execute("PRAGMA foreign_keys = ON")
            tables = {r[0] for r in self.con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"--db {self.path}: not a readable study database ({exc})") from None
        if not tables:
            if items is None:
                raise ConfigError(f"--db {self.path}: an empty database (start a study with --images DIR)")
            self._create(items, about or {}, seed)
        elif not {"meta", "items", "participants", "assignments", "answers"} <= tables:
            raise ConfigError(f"--db {self.path}: not a study database (tables {', '.join(sorted(tables))})")
        try:
            self.meta = dict(self.con.execute("SELECT key, value FROM meta"))
            self.items = self._items()
        except sqlite3.Error as exc:
            raise ConfigError(f"--db {self.path}: not a readable study database ({exc})") from None
        if self.meta.get("schema") != SCHEMA_VERSION:
            raise ConfigError(f"--db {self.path}: study schema {self.meta.get('schema')!r}, this version reads "
                              f"{SCHEMA_VERSION!r}")
        if items is not None and self.meta.get("fingerprint") != fingerprint(items):
            raise ConfigError(f"--db {self.path}: holds another study ({len(self.items)} pairs from "
                              f"{', '.join(self.about.get('sources', []))}); give a new --db for these images")
        if not self.items:
            raise ConfigError(f"--db {self.path}: the study has no pairs")

    # -------------------------------------------------------------------------------- set-up

    def _create(self, items: list[Item], about: dict, seed: int | None) -> None:
        try:
            with self.con:
                self.con.execute("BEGIN IMMEDIATE")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self.con.execute(statement)
                self.con.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("schema", SCHEMA_VERSION), ("fingerprint", fingerprint(items)),
                    ("about", json.dumps(about)), ("seed", "" if seed is None else str(seed)),
                    ("created", str(time.time()))])
                self.con.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)",
                                     [(i, it.prompt_index, it.prompt, it.encoder_a, it.encoder_b, it.file_a, it.file_b)
                                      for i, it in enumerate(items)])
        except sqlite3.Error as exc:
            raise ConfigError(f"--db {self.path}: cannot create the study database ({exc})") from None

    def _items(self) -> list[Item]:
        rows = self.con.execute("SELECT prompt_index, prompt, encoder_a, encoder_b, file_a, file_b FROM items "
                                "ORDER BY id").fetchall()
        return [Item(*r) for r in rows]

    @property
    def about(self) -> dict:
        try:
            return json.loads(self.meta.get("about") or "{}")
        except ValueError:
            return {}

    @property
    def encoders(self) -> list[str]:
        found = self.about.get("encoders")
        if found:
            return list(found)
        seen: list[str] = []
        for it in self.items:
            seen += [e for e in (it.encoder_a, it.encoder_b) if e not in seen]
        return seen

    def missing_files(self) -> list[str]:
        files = dict.fromkeys(f for it in self.items for f in (it.file_a, it.file_b))  # each image once
        return [f for f in files if not Path(f).is_file()]

    # -------------------------------------------------------------------------------- participants

    def new_participant(self) -> str:
        """A new participant with their own order; returns their id."""
        pid = secrets.token_urlsafe(12)
        with self.lock, self.con:
            self.con.execute("BEGIN IMMEDIATE")
            number = self.con.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM participants").fetchone()[0]
            seed = self.meta.get("seed")
            rng = random.Random(f"{seed}:{number}") if seed else random.SystemRandom()
            order = list(range(len(self.items)))
            rng.shuffle(order)
            self.con.execute("INSERT INTO participants VALUES (?, ?, ?)", (pid, number, time.time()))
            self.con.executemany("INSERT INTO assignments VALUES (?, ?, ?, ?)",
                                 [(pid, pos, item, int(rng.random() < 0.5)) for pos, item in enumerate(order)])
        return pid

    def participant(self, pid: str) -> int | None:
        """The participant's number, None when the id is unknown."""
        with self.lock:
            row = self.con.execute("SELECT number FROM participants WHERE id = ?", (pid,)).fetchone()
        return None if row is None else row[0]

    def progress(self, pid: str) -> tuple[int, int]:
        """(answered, total) for a participant."""
        with self.lock:
            done = self.con.execute("SELECT COUNT(*) FROM answers WHERE participant = ?", (pid,)).fetchone()[0]
        return done, len(self.items)

    def shown(self, pid: str, position: int | None = None) -> Shown | None:
        """The pair at ``position`` (default: the first one not answered yet); None when all are answered."""
        with self.lock:
            if position is None:
                row = self.con.execute(
                    "SELECT s.position, s.item, s.a_on_left FROM assignments s WHERE s.participant = ? AND NOT EXISTS "
                    "(SELECT 1 FROM answers a WHERE a.participant = s.participant AND a.item = s.item) "
                    "ORDER BY s.position LIMIT 1", (pid,)).fetchone()
            else:
                row = self.con.execute("SELECT position, item, a_on_left FROM assignments WHERE participant = ? "
                                       "AND position = ?", (pid, position)).fetchone()
        if row is None:
            return None
        pos, item_id, a_on_left = row
        it = self.items[item_id]
        if a_on_left:
            return Shown(pos, len(self.items), it, item_id, it.encoder_a, it.encoder_b, it.file_a, it.file_b)
        return Shown(pos, len(self.items), it, item_id, it.encoder_b, it.encoder_a, it.file_b, it.file_a)

    def answer(self, pid: str, position: int, choice: str) -> bool:
        """Record ``choice`` (A, B or tie) for the pair at ``position``; False when it was answered already."""
        if choice not in CHOICES:
            raise ConfigError(f"answer {choice!r}: expected one of {', '.join(CHOICES)}")
        shown = self.shown(pid, position)
        if shown is None:
            raise ConfigError(f"participant has no pair at position {position}")
        winner = {"A": shown.left, "B": shown.right, "tie": "tie"}[choice]
        with self.lock, self.con:
            self.con.execute("BEGIN IMMEDIATE")
            cur = self.con.execute("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                                   (pid, shown.item_id, position, choice, winner, time.time()))
        return cur.rowcount == 1

    # -------------------------------------------------------------------------------- results

    def answers(self) -> list[dict]:
        """Every answer with what was shown, in the order given (participant number, then position)."""
        with self.lock:
            rows = self.con.execute(
                "SELECT p.number, a.position, a.item, a.choice, a.winner, a.answered, s.a_on_left FROM answers a "
                "JOIN participants p ON p.id = a.participant "
                "JOIN assignments s ON s.participant = a.participant AND s.position = a.position "
                "ORDER BY p.number, a.position").fetchall()
        out = []
        for number, position, item_id, choice, winner, answered, a_on_left in rows:
            it = self.items[item_id]
            left, right = (it.encoder_a, it.encoder_b) if a_on_left else (it.encoder_b, it.encoder_a)
            out.append({"participant": number, "position": position, "item": item_id, "prompt_index": it.prompt_index,
                        "prompt": it.prompt, "encoder_left": left, "encoder_right": right, "choice": choice,
                        "winner": winner, "answered": answered})
        return out

    def participant_count(self) -> int:
        with self.lock:
            return self.con.execute("SELECT COUNT(*) FROM participants").fetchone()[0]

    def close(self) -> None:
        self.con.close()
