"""What a study found: shares per encoder and tie with Wilson intervals, agreement, CSV/JSON export.

Shares are over answers: the fraction won by each encoder and the fraction tied (they add up to 1),
overall, per prompt and per pair of encoders. Each share has a Wilson score interval at ``confidence``.
Agreement between participants is over pairs answered by two or more of them, each answer read as
"the first encoder of the pair", "the second" or "tie": the mean fraction of agreeing participant
pairs per pair shown, and Fleiss' kappa (for varying numbers of raters per pair), which discounts the
agreement expected by chance.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter, defaultdict
from pathlib import Path
from statistics import NormalDist

from fastenc.errors import ConfigError
from fastenc.fileio import atomic_write

from ..report import write_json
from .db import StudyDB


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return None, None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends: rounding would leave 1e-17 off them
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def shares(winners: list[str], outcomes: list[str], confidence: float) -> dict:
    """``{outcome: {count, share, ci}}`` and ``n`` for a list of winners (an encoder or 'tie')."""
    counts = Counter(winners)
    n = len(winners)
    out = {"n": n}
    for o in outcomes:
        lo, hi = wilson(counts[o], n, confidence)
        out[o] = {"count": counts[o], "share": counts[o] / n if n else None, "ci": [lo, hi]}
    return out


def agreement(answers: list[dict], items) -> dict:
    """Pairwise agreement and Fleiss' kappa over the pairs rated by at least two participants."""
    by_item: dict[int, Counter] = defaultdict(Counter)
    for a in answers:
        it = items[a["item"]]
        category = "tie" if a["winner"] == "tie" else ("first" if a["winner"] == it.encoder_a else "second")
        by_item[a["item"]][category] += 1
    rated = [c for c in by_item.values() if sum(c.values()) >= 2]
    if not rated:
        return {"pairs_rated_twice": 0, "pairwise_agreement": None, "fleiss_kappa": None}
    p_i = [(sum(v * v for v in c.values()) - sum(c.values())) / (sum(c.values()) * (sum(c.values()) - 1))
           for c in rated]
    total = sum(sum(c.values()) for c in rated)
    p_j = [sum(c[k] for c in rated) / total for k in ("first", "second", "tie")]
    p_bar, p_e = sum(p_i) / len(p_i), sum(p * p for p in p_j)
    kappa = None if p_e >= 1 else (p_bar - p_e) / (1 - p_e)  # undefined when every answer is the same
    return {"pairs_rated_twice": len(rated), "pairwise_agreement": p_bar, "fleiss_kappa": kappa}


def compute(db: StudyDB, confidence: float = 0.95) -> dict:
    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence {confidence}: must be between 0 and 1")
    answers = db.answers()
    encoders = db.encoders
    outcomes = [*encoders, "tie"]
    per_prompt: dict[int, list[str]] = defaultdict(list)
    per_pair: dict[str, list[str]] = defaultdict(list)
    for a in answers:
        it = db.items[a["item"]]
        per_prompt[a["prompt_index"]].append(a["winner"])
        per_pair[f"{it.encoder_a} vs {it.encoder_b}"].append(a["winner"])
    prompts = {}
    for it in db.items:
        prompts.setdefault(it.prompt_index, it.prompt)
    pair_names = list(dict.fromkeys(f"{it.encoder_a} vs {it.encoder_b}" for it in db.items))
    return {
        "analysis": "study", "confidence": confidence, "interval": "Wilson score", "encoders": encoders,
        "participants": db.participant_count(), "answers": len(answers), "pairs": len(db.items),
        "completed": sum(1 for n in Counter(a["participant"] for a in answers).values() if n == len(db.items)),
        "overall": shares([a["winner"] for a in answers], outcomes, confidence),
        "per_prompt": [{"prompt_index": i, "prompt": p, **shares(per_prompt[i], outcomes, confidence)}
                       for i, p in sorted(prompts.items())],
        "per_pair": {name: shares(per_pair[name], outcomes, confidence) for name in pair_names},
        "inter_rater": agreement(answers, db.items),
    }


ANSWER_COLUMNS = ["participant", "position", "prompt_index", "prompt", "encoder_left", "encoder_right", "choice",
                  "winner", "answered"]
SHARE_COLUMNS = ["scope", "key", "outcome", "count", "n", "share", "ci_low", "ci_high"]


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def answers_csv(db: StudyDB) -> str:
    return _csv(db.answers(), ANSWER_COLUMNS)


def shares_csv(result: dict) -> str:
    rows = []

    def add(scope: str, key: str, s: dict) -> None:
        for o in result["encoders"] + ["tie"]:
            rows.append({"scope": scope, "key": key, "outcome": o, "count": s[o]["count"], "n": s["n"],
                         "share": s[o]["share"], "ci_low": s[o]["ci"][0], "ci_high": s[o]["ci"][1]})

    add("overall", "", result["overall"])
    for p in result["per_prompt"]:
        add("prompt", p["prompt"], p)
    for name, s in result["per_pair"].items():
        add("pair", name, s)
    return _csv(rows, SHARE_COLUMNS)


def write_report(db: StudyDB, out: Path, confidence: float = 0.95) -> dict:
    """``study.json``, ``answers.csv`` and ``shares.csv`` under ``out``."""
    result = compute(db, confidence)
    result["files"] = {"json": "study.json", "answers": "answers.csv", "shares": "shares.csv"}
    result["db"] = str(db.path)
    for name, text in (("answers.csv", answers_csv(db)), ("shares.csv", shares_csv(result))):
        atomic_write(out / name, lambda p, t=text: p.write_text(t, encoding="utf-8"))
    write_json(out / "study.json", result)
    return result


def summary(result: dict) -> dict:
    """The one-line form: shares overall with their intervals."""
    return {o: {"share": result["overall"][o]["share"], "ci": result["overall"][o]["ci"]}
            for o in result["encoders"] + ["tie"]}
