"""The study's HTML: the start page, one page per pair, the end and stop pages, and the results view.

No page names an encoder a participant is judging: images are served by position and side
(``img/<position>/A``). Keys: A or 1 or Left for the left image, B or 2 or Right for the right one,
T or 3 or Down for a tie, S to stop; every control is also a button reachable with Tab and Enter.
The layout keeps both images side by side down to phone widths.
"""

from __future__ import annotations

from html import escape

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;padding:16px;max-width:1200px;
     color:#111;background:#fafafa;line-height:1.4}
h1{font-size:1.3rem;margin:0 0 8px}
.prompt{font-size:1.15rem;margin:8px 0 12px;padding:10px 12px;background:#fff;border-left:4px solid #36c}
.progress{color:#555;font-size:.9rem}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px}
figure{margin:0;text-align:center}
figure img{width:100%;height:auto;max-height:68vh;object-fit:contain;display:block;background:#eee;border-radius:4px}
figcaption{font-weight:600;margin-top:4px}
.choices{display:grid;grid-template-columns:1fr 1fr 1fr;gap:8px;margin-top:14px}
button,.button{font-size:1.1rem;padding:12px 8px;min-height:48px;border:1px solid #888;border-radius:6px;
       background:#fff;cursor:pointer;text-align:center;color:#111;text-decoration:none;display:inline-block}
button:focus,.button:focus{outline:3px solid #36c;outline-offset:2px}
kbd{border:1px solid #999;border-bottom-width:2px;border-radius:3px;padding:0 4px;font-size:.85em}
.foot{margin-top:16px;font-size:.9rem;color:#555}
table{border-collapse:collapse;margin:8px 0 16px;width:100%;font-size:.9rem}
th,td{border:1px solid #ccc;padding:4px 6px;text-align:left}
.scroll{overflow-x:auto}
@media (max-width:600px){
  body{padding:8px}
  h1{font-size:1.05rem}
  .prompt{font-size:1rem;padding:8px}
  .pair{gap:6px}
  .choices{gap:6px}
  button,.button{font-size:1rem;padding:10px 4px}
  .keys{display:none}
}
"""

KEYS_JS = """
document.addEventListener('keydown', function (e) {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  var map = {a: 'A', '1': 'A', arrowleft: 'A', b: 'B', '2': 'B', arrowright: 'B', t: 'tie', '3': 'tie',
             arrowdown: 'tie'};
  var key = e.key.toLowerCase();
  if (key === 's') { e.preventDefault(); document.getElementById('stop').click(); return; }
  var value = map[key];
  if (!value) return;
  e.preventDefault();
  var form = document.getElementById('answer');
  if (form.dataset.sent) return;
  form.dataset.sent = '1';
  form.querySelector('button[value="' + value + '"]').click();
});
"""


def page(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{escape(title)}</title><style>{CSS}</style></head><body>{body}{js}</body></html>')


def start(question: str, pairs: int, resume: tuple[str, int, int] | None) -> str:
    """The landing page; ``resume`` = (participant id, answered, total) from the cookie."""
    more = ""
    if resume:
        pid, done, total = resume
        more = (f'<p><a class="button" id="continue" href="p/{escape(pid)}" autofocus>Continue where you stopped '
                f'({done} of {total} answered)</a></p><p>Or start as a new participant:</p>')
    autofocus = "" if resume else " autofocus"
    return page("Image study", f"""
<h1>{escape(question)}</h1>
<p>You will see {pairs} pairs of images, one prompt each. Choose <b>A</b> (left), <b>B</b> (right) or
<b>Tie</b> when neither matches better. Keys: <kbd>A</kbd> <kbd>B</kbd> <kbd>T</kbd>; <kbd>S</kbd> stops,
and you can come back later: your answers are saved as you go.</p>
{more}
<form method="post" action="start"><button type="submit" id="start"{autofocus}>Start</button></form>""")


def pair(pid: str, shown, question: str) -> str:
    pos, total = shown.position, shown.total
    img = f"{escape(pid)}/img/{pos}"  # relative to /p/
    return page(f"Pair {pos + 1} of {total}", f"""
<h1>{escape(question)}</h1>
<div class="progress" id="progress">Pair {pos + 1} of {total}</div>
<div class="prompt" id="prompt">{escape(shown.item.prompt)}</div>
<div class="pair">
  <figure><img id="img-A" src="{img}/A" alt="Image A"><figcaption>A</figcaption></figure>
  <figure><img id="img-B" src="{img}/B" alt="Image B"><figcaption>B</figcaption></figure>
</div>
<form method="post" action="{escape(pid)}/answer" id="answer">
  <input type="hidden" name="position" value="{pos}">
  <div class="choices">
    <button type="submit" name="choice" value="A">A is better</button>
    <button type="submit" name="choice" value="tie">Tie</button>
    <button type="submit" name="choice" value="B">B is better</button>
  </div>
</form>
<div class="foot"><span class="keys">Keys: <kbd>A</kbd> left, <kbd>B</kbd> right, <kbd>T</kbd> tie,
<kbd>S</kbd> stop. </span><a id="stop" href="{escape(pid)}/stop">Stop for now</a></div>""", KEYS_JS)


def stopped(pid: str, done: int, total: int, url: str) -> str:
    return page("Paused", f"""
<h1>Your answers are saved</h1>
<p id="saved">{done} of {total} answered. To go on later, open this page again on this device, or this
address: <a id="resume" href="../{escape(pid)}">{escape(url)}</a></p>""")


def finished(total: int) -> str:
    return page("Thank you", f'<h1 id="done">Thank you!</h1><p>You answered all {total} pairs.</p>')


def message(title: str, text: str) -> str:
    return page(title, f"<h1>{escape(title)}</h1><p>{escape(text)}</p>")


def _fmt(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _share_table(rows: list[tuple[str, dict]], outcomes: list[str]) -> str:
    head = "".join(f"<th>{escape(o)}</th>" for o in outcomes)
    body = []
    for key, s in rows:
        cells = "".join(f"<td>{_fmt(s[o]['share'])} <small>[{_fmt(s[o]['ci'][0])}, {_fmt(s[o]['ci'][1])}]</small></td>"
                        for o in outcomes)
        body.append(f"<tr><td>{escape(key)}</td><td>{s['n']}</td>{cells}</tr>")
    return f'<div class="scroll"><table><tr><th></th><th>n</th>{head}</tr>{"".join(body)}</table></div>'


def results(result: dict) -> str:
    outcomes = result["encoders"] + ["tie"]
    ir = result["inter_rater"]
    kappa = "–" if ir["fleiss_kappa"] is None else f"{ir['fleiss_kappa']:.3f}"
    return page("Study results", f"""
<h1>Study results</h1>
<p>{result['participants']} participants ({result['completed']} finished), {result['answers']} answers,
{result['pairs']} pairs each. Shares with {100 * result['confidence']:.0f} % Wilson intervals.
Export: <a href="results.json">JSON</a>, <a href="results.csv">answers CSV</a>,
<a href="shares.csv">shares CSV</a>.</p>
<h2>Overall</h2>{_share_table([("all", result["overall"])], outcomes)}
<h2>Per pair of encoders</h2>{_share_table(list(result["per_pair"].items()), outcomes)}
<h2>Per prompt</h2>{_share_table([(p["prompt"], p) for p in result["per_prompt"]], outcomes)}
<h2>Agreement between participants</h2>
<p>Over {ir['pairs_rated_twice']} pairs answered by two or more participants: pairwise agreement
{_fmt(ir['pairwise_agreement'])}, Fleiss' kappa {kappa}.</p>""")
