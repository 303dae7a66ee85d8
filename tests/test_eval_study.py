"""``python -m train.eval study``: pairs from generate outputs, the SQLite store, shares with Wilson
intervals, agreement, bad input, and the whole study in Debian's headless Chromium driven by Selenium:
a participant answers with the keyboard, stops, the server is stopped and started again (now for remote
participants, with a token), they resume and finish; a second participant gets another order; the
report's shares are the answers given."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.eval.__main__ import main
from train.eval.study.db import StudyDB
from train.eval.study.pairs import build_items
from train.eval.study.results import agreement, compute, wilson

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = ["teacher", "base", "small"]
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def make_generate(root: Path, encoders=ENCODERS, prompts=PROMPTS, seed: int = 0, offset: int = 0) -> Path:
    """A folder as ``python -m train.eval generate`` writes it: one solid colour per (encoder, prompt)."""
    files = {}
    for k, enc in enumerate(encoders):
        files[enc] = []
        for i, prompt in enumerate(prompts):
            rel = f"images/{enc}/{i:03d}-{prompt.replace(' ', '-')}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((48, 64, 3), (30 + 60 * (k + offset), 40 * i, 200), np.uint8)).save(root / rel)
            files[enc].append(rel)
    settings = {"seed": seed, "guidance": 3.5, "steps": 28, "height": None, "width": None, "max_sequence_length": None}
    (root / "generate.json").write_text(json.dumps({"analysis": "generate", "pipeline": "FluxPipeline",
                                                    "encoders": encoders, "prompts": prompts, "settings": settings,
                                                    "files": {"grid": "grid.png", "images": files}}))
    return root


def _err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


# ---- statistics ----------------------------------------------------------------------------


def test_wilson_interval_known_values():
    lo, hi = wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    lo, hi = wilson(62, 75, confidence=0.99)  # z = 2.5758: centre 0.80011, half-width 0.11113, by hand
    assert (round(lo, 3), round(hi, 3)) == (0.689, 0.911)
    assert wilson(10, 10)[1] == 1.0
    assert wilson(0, 0) == (None, None)


def test_fleiss_kappa_by_hand(tmp_path):
    items, _ = build_items([make_generate(tmp_path / "g", encoders=["x", "y"], prompts=["p", "q", "r"])])
    # item 0: all three x; item 1: x, x, tie; item 2: x, y, tie; item 3 does not exist, one rater elsewhere
    winners = [(0, "x"), (0, "x"), (0, "x"), (1, "x"), (1, "x"), (1, "tie"), (2, "x"), (2, "y"), (2, "tie")]
    answers = [{"item": i, "winner": w} for i, w in winners]
    # P_i = 1, 1/3, 0 -> P = 4/9; p = (6, 1, 2) / 9 -> P_e = 41/81; kappa = (36 - 41) / (81 - 41)
    result = agreement(answers, items)
    assert result["pairs_rated_twice"] == 3
    assert result["pairwise_agreement"] == pytest.approx(4 / 9)
    assert result["fleiss_kappa"] == pytest.approx(-5 / 40)
    assert agreement(answers[:1], items) == {"pairs_rated_twice": 0, "pairwise_agreement": None, "fleiss_kappa": None}


def test_database_keeps_order_and_answers(tmp_path):
    items, about = build_items([make_generate(tmp_path / "g")])
    assert len(items) == len(PROMPTS) * 3  # three encoders: three pairs per prompt
    db = StudyDB(tmp_path / "s.sqlite", items=items, about=about, seed=3)
    one, two = db.new_participant(), db.new_participant()
    order = [db.shown(one, p).item_id for p in range(len(items))]
    assert sorted(order) == list(range(len(items)))
    assert order != [db.shown(two, p).item_id for p in range(len(items))]
    shown = db.shown(one)
    assert shown.position == 0 and db.answer(one, 0, "A") is True
    assert db.answer(one, 0, "B") is False  # a repeated form changes nothing
    db.close()
    again = StudyDB(tmp_path / "s.sqlite")  # reopened from the file alone
    assert again.shown(one).position == 1 and again.progress(one) == (1, len(items))
    (row,) = again.answers()
    assert row["choice"] == "A" and row["winner"] == shown.left and row["participant"] == 1
    result = compute(again)
    assert result["overall"][shown.left]["count"] == 1 and result["overall"]["n"] == 1
    again.close()


# ---- bad input -----------------------------------------------------------------------------


def test_folders_that_do_not_pair_up(tmp_path, capsys):
    a = make_generate(tmp_path / "a", encoders=["teacher"])
    b = make_generate(tmp_path / "b", encoders=["base"], prompts=[PROMPTS[0], "a castle"])
    c = make_generate(tmp_path / "c", encoders=["base"], seed=1)
    d = make_generate(tmp_path / "d", encoders=["teacher"])
    out = ["--out", str(tmp_path / "out"), "--port", "0"]
    cases = [
        (["--images", str(a), "--images", str(b)],
         f"--images {b} and {a} do not pair up: prompt 2 is 'a castle' vs 'a lighthouse at dusk'"),
        (["--images", str(a), "--images", str(c)], f"--images {c} and {a} do not pair up: seed 1 vs 0"),
        (["--images", str(a)], "a study needs at least 2 encoders; --images gives 1 (teacher)"),
        (["--images", str(a), "--images", str(d)], f"--images {d}: encoder 'teacher' is in another folder too"),
        (["--images", str(tmp_path / "none")], f"--images {tmp_path / 'none'}: not a directory"),
        (["--images", str(tmp_path)], f"--images {tmp_path}: no generate.json (give folders written by python -m "
                                      f"train.eval generate)"),
        (["--db", str(tmp_path / "missing.sqlite")],
         f"--db {tmp_path / 'missing.sqlite'}: no such study database (start one with --images DIR)"),
        (["--images", str(a), "--images", str(make_generate(tmp_path / "e", encoders=["base"])), "--host", "0.0.0.0"],
         "--host 0.0.0.0: not a loopback address; others on the network could answer and read the results: add "
         "--allow-remote (the study then asks for a token)"),
        (["--images", str(a), "--host", "0.0.0.0", "--allow-remote", "--token", "short"],
         "--token: 5 characters; use at least 16 (or leave it out for a random one)"),
    ]
    for argv, message in cases:
        assert main(["study", *out, *argv]) == 2, argv
        assert _err(capsys) == f"train.eval: error: {message}"

    (b / "images" / "base" / "001-a-castle.png").unlink()
    assert main(["study", *out, "--images", str(b)]) == 2
    assert _err(capsys) == (f"train.eval: error: {b / 'generate.json'} lists images/base/001-a-castle.png, which "
                            f"is missing")


def test_database_and_port_errors(tmp_path, capsys):
    gen = make_generate(tmp_path / "g")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not SQLite" * 100)
    assert main(["study", "--out", str(tmp_path / "o"), "--db", str(junk), "--report"]) == 2
    assert _err(capsys) == f"train.eval: error: --db {junk}: not a readable study database (file is not a database)"

    db = tmp_path / "o" / "study.sqlite"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["study", "--out", str(tmp_path / "o"), "--images", str(gen), "--port", str(port)]) == 2
    assert _err(capsys) == (f"train.eval: error: --port {port}: already in use on 127.0.0.1 (choose another, or "
                            f"--port 0 for a free one)")
    other = make_generate(tmp_path / "h", prompts=["something else entirely"])
    assert main(["study", "--out", str(tmp_path / "o"), "--images", str(other), "--report"]) == 2
    assert _err(capsys) == (f"train.eval: error: --db {db}: holds another study (6 pairs from {gen.resolve()}); "
                            f"give a new --db for these images")
    (gen / "images" / "small" / "000-a-red-fox-in-the-snow.png").unlink()  # moved away after the study began
    assert main(["study", "--out", str(tmp_path / "o"), "--port", "0"]) == 2
    assert _err(capsys) == (f"train.eval: error: --db {db}: image {gen.resolve()}/images/small/000-a-red-fox-in-the-"
                            f"snow.png is missing (1 of the study's images)")


# ---- the study in a browser ------------------------------------------------------------------


class Server:
    """``python -m train.eval study ...`` in its own process; ``url`` from its first line."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "train.eval", "study", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the study server did not start: {self.proc.stderr.read()}")
        self.info = json.loads(line)
        self.base = self.info["url"].split("?")[0]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=20) == 0  # SIGTERM stops it cleanly
        self.proc.stdout.close()
        self.proc.stderr.close()

    def kill(self) -> None:  # after a failed test: never leave a server behind
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def servers():
    started: list[Server] = []

    def start(*args: str) -> Server:
        started.append(Server(*args))
        return started[-1]

    yield start
    for server in started:
        server.kill()


def _status(url: str, data: bytes | None = None, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (bash scripts/ci_system_deps.sh "
                    "installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    options.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": 390, "height": 844,
                                                                          "pixelRatio": 3.0}})  # a phone's screen
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _encoder_of(url: str, pictures: dict[bytes, str], token: str | None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        return pictures[r.read()]


def _answer_pairs(driver, count: int, pictures: dict[bytes, str], rule, token: str | None = None) -> list[dict]:
    """Answer ``count`` pairs with the keyboard; returns what was shown and pressed (the encoders found
    by fetching each image and comparing it with the files)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    seen = []
    for _ in range(count):  # each pair's page: waited for (a key press or Start navigates; the click returns first)
        progress = WebDriverWait(driver, 15).until(ec.presence_of_element_located((By.ID, "progress")))
        prompt = driver.find_element(By.ID, "prompt").text
        left = _encoder_of(driver.find_element(By.ID, "img-A").get_attribute("src"), pictures, token)
        right = _encoder_of(driver.find_element(By.ID, "img-B").get_attribute("src"), pictures, token)
        assert not any(e in driver.page_source for e in ENCODERS)  # blind: no encoder named in the page
        key = rule(left, right)
        seen.append({"progress": progress.text, "prompt": prompt, "left": left, "right": right,
                     "winner": {"a": left, "b": right, "t": "tie"}[key]})
        driver.find_element(By.TAG_NAME, "body").send_keys(key)
        WebDriverWait(driver, 15).until(ec.staleness_of(progress))
    return seen


def test_study_in_a_browser(browser, servers, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    gen = make_generate(tmp_path / "gen")
    pictures = {(gen / f).read_bytes(): enc
                for enc, files in json.loads((gen / "generate.json").read_text())["files"]["images"].items()
                for f in files}
    db = tmp_path / "out" / "study.sqlite"
    total = len(PROMPTS) * 3

    def prefer_teacher(left, right):  # participant 1: the teacher when shown, else a tie
        return "a" if left == "teacher" else "b" if right == "teacher" else "t"

    server = servers("--images", str(gen), "--out", str(tmp_path / "out"), "--port", "0", "--seed", "7")
    assert server.info["pairs"] == total and server.info["db"] == str(db)
    assert _status(server.base, headers={"Host": f"elsewhere.example:{server.base.split(':')[-1]}"}) == 403
    driver.get(server.base)
    start = driver.switch_to.active_element  # the Start button has the focus: Enter starts
    assert start.get_attribute("id") == "start"
    start.send_keys(Keys.ENTER)
    layout = driver.execute_script(
        "const a = document.getElementById('img-A').getBoundingClientRect(),"
        " b = document.getElementById('img-B').getBoundingClientRect(),"
        " c = document.querySelector('button[value=tie]').getBoundingClientRect();"
        "return [document.documentElement.scrollWidth, innerWidth, innerHeight, a.left, a.right, a.top, b.left,"
        " b.right, b.top, c.bottom];")
    scroll_width, width, height, a_left, a_right, a_top, b_left, b_right, b_top, buttons_bottom = layout
    assert width <= 400 and scroll_width <= width  # no sideways scrolling on a phone
    assert 0 <= a_left < a_right <= b_left < b_right <= width and a_top == b_top  # side by side
    assert buttons_bottom <= height  # the answer buttons are on the first screen
    first = _answer_pairs(driver, 3, pictures, prefer_teacher)
    assert [s["progress"] for s in first] == [f"Pair {i} of {total}" for i in (1, 2, 3)]
    driver.find_element(By.TAG_NAME, "body").send_keys("s")  # stop for now
    assert driver.find_element(By.ID, "saved").text.startswith(f"3 of {total} answered.")
    pid = driver.current_url.rstrip("/").split("/")[-2]
    server.stop()

    token = "t0k3n-for-remote-participants"
    server = servers("--db", str(db), "--out", str(tmp_path / "out"), "--port", "0", "--host", "0.0.0.0",
                    "--allow-remote", "--token", token)
    assert server.info["url"] == f"{server.base}?token={token}" and server.info["participants"] == 1
    for path in ("", "results", "results.json", "results.csv", f"p/{pid}", f"p/{pid}/img/0/A"):
        assert _status(server.base + path) == 403, path
        assert _status(f"{server.base}{path}?token=wrong-{token}") == 403, path
    assert _status(server.base + "start", data=b"") == 403
    assert _status(server.base + "results.json", headers={"Authorization": f"Bearer {token}"}) == 200
    driver.get(server.info["url"])  # the token once; a cookie from then on
    resume = driver.switch_to.active_element
    assert resume.get_attribute("id") == "continue" and f"(3 of {total} answered)" in resume.text
    resume.send_keys(Keys.ENTER)
    rest = _answer_pairs(driver, total - 3, pictures, prefer_teacher, token)
    assert [s["progress"] for s in rest] == [f"Pair {i} of {total}" for i in range(4, total + 1)]
    assert driver.find_element(By.ID, "done").text == "Thank you!"
    one = first + rest
    assert sorted((s["prompt"], {s["left"], s["right"]} == {"teacher", "base"}) for s in one) == \
        sorted((p, pair) for p in PROMPTS for pair in (True, False, False))  # every pair once

    driver.delete_all_cookies()  # participant 2 on the same device: a new start
    driver.get(server.info["url"])
    driver.switch_to.active_element.send_keys(Keys.ENTER)
    two = _answer_pairs(driver, total, pictures, lambda left, right: "b", token)  # always the right-hand image
    assert [(s["prompt"], s["left"], s["right"]) for s in two] != [(s["prompt"], s["left"], s["right"]) for s in one]
    driver.get(server.base + "results")
    results_text = driver.find_element(By.TAG_NAME, "body").text
    server.stop()

    out = tmp_path / "report"
    assert main(["study", "--db", str(db), "--report", "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads((out / "study.json").read_text())
    n = 2 * total
    counts = Counter(s["winner"] for s in one + two)
    assert result["answers"] == n and result["participants"] == result["completed"] == 2
    for outcome in [*ENCODERS, "tie"]:
        assert result["overall"][outcome]["count"] == counts[outcome]
        assert result["overall"][outcome]["share"] == pytest.approx(counts[outcome] / n)
        assert result["overall"][outcome]["ci"] == pytest.approx(list(wilson(counts[outcome], n)))
        assert line["overall"][outcome]["share"] == pytest.approx(counts[outcome] / n)
        assert f"{100 * counts[outcome] / n:.1f} %" in results_text  # the results view shows the same shares
    for entry in result["per_prompt"]:
        mine = Counter(s["winner"] for s in one + two if s["prompt"] == entry["prompt"])
        assert entry["n"] == 6 and {o: entry[o]["count"] for o in [*ENCODERS, "tie"]} == \
            {o: mine[o] for o in [*ENCODERS, "tie"]}
    by_pair = {}
    for s in one + two:
        by_pair.setdefault((s["prompt"], frozenset((s["left"], s["right"]))), []).append(s["winner"])
    agree = sum(a == b for a, b in by_pair.values()) / len(by_pair)
    assert result["inter_rater"]["pairs_rated_twice"] == total
    assert result["inter_rater"]["pairwise_agreement"] == pytest.approx(agree)

    rows = (out / "answers.csv").read_text().splitlines()
    assert rows[0] == "participant,position,prompt_index,prompt,encoder_left,encoder_right,choice,winner,answered"
    assert len(rows) == 1 + n and pid not in (out / "answers.csv").read_text()  # resume keys stay private
    assert [r.split(",")[6] for r in rows[1 + total:]] == ["B"] * total
