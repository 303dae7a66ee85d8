"""Serving under load: a fastenc Triton repository served by a real tritonserver and driven by Triton's
own load generator, ``perf_analyzer``, at several concurrency levels.

    python -m bench.serving -o /tmp/serving                         # both python-backend encoders, model small
    python -m bench.serving --encoders python --size tiny --seconds 2 -o /tmp/serving
    python -m bench.serving --save                                  # bench/results/serving-<machine>.csv/.png

For each encoder (``python``: the exported ONNX model through ONNX Runtime; ``fastenc-cpu``: fastenc's
``cpu`` backend, bf16 + planned int8) the run writes a repository with ``fastenc triton-repo``, starts the
``tritonserver`` bundled in nvidia-pytriton on loopback (``export/triton/serve_pytriton.sh``, the venv of
``scripts/triton_env.sh``), and for each concurrency level runs ``perf_analyzer`` against the ensemble
(text in, ``text_embeddings`` out) for a bounded time with real prompts of varied length
(``--input-data`` JSON, one prompt per request). Per level it records throughput (prompts/s), p50/p95/p99
latency, failed requests (perf_analyzer's exit status and the server's fail counts), and the batch sizes
the encoder model executed: the difference of ``/v2/models/<encoder>/stats`` ``batch_stats`` before and
after the level. The model is random-initialised (a T5 initialisation; throughput does not depend on the
weights) with a tokenizer trained on the prompts, unless ``--checkpoint`` names a real one.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
SERVE = ROOT / "export" / "triton" / "serve_pytriton.sh"
ENCODERS = ("python", "fastenc-cpu")
ENCODER_LABELS = {"python": "ONNX Runtime fp32 (python backend)", "fastenc-cpu": "fastenc cpu (bf16 + int8)"}
READY_TIMEOUT_S = 300

#: Prompts of varied length (a few words to a long paragraph), in the style of the paper's training sets.
PROMPTS = [
    "a cat",
    "a red fox in the snow",
    "A sculptor waving a poster stating 'open late'.",
    "an astronaut riding a horse on the moon, digital art",
    "A bowl of ramen with a soft-boiled egg, steam rising, top view, studio lighting, 50mm lens.",
    "two wooden chairs and a blue table on a terrace overlooking the sea at sunset",
    "A street sign that reads 'Slow: children at play' next to a yellow school bus.",
    "a watercolor painting of a lighthouse on a cliff during a storm, crashing waves, dramatic sky, muted "
    "colors, loose brush strokes, paper texture visible",
    "The interior of an old library with tall oak shelves, a rolling ladder, green banker's lamps, dust in "
    "the light beams from arched windows, a sleeping cat on a leather armchair, a globe and a stack of "
    "atlases on the floor, warm afternoon light, photorealistic, highly detailed, wide angle.",
    "macro photo of a dew drop on a spider web",
    "A neon sign saying 'fastenc' above the door of a small noodle bar in a rainy alley at night.",
    "an isometric illustration of a tiny island with a windmill, three houses, a harbour with fishing boats, "
    "palm trees, a waterfall falling into the sea, clouds below the island, pastel colours, soft shadows",
]

CSV_COLUMNS = [
    "timestamp", "encoder", "label", "model", "target", "seq", "instances", "max_queue_delay_us",
    "preferred_batch_sizes", "max_batch_size", "threads", "concurrency", "seconds", "requests", "prompts_per_s",
    "p50_ms", "p95_ms", "p99_ms", "failed", "encoder_executions", "encoder_inferences", "mean_batch",
    "batch_sizes", "loadavg_1min", "machine", "git_commit", "command",
]


# ---------------------------------------------------------------------------- the server


def triton_venv() -> Path:
    return Path(os.environ.get("FASTENC_TRITON_VENV", ROOT / ".venv-triton"))


def perf_analyzer_path(venv: Path | None = None) -> Path:
    return (venv or triton_venv()) / "bin" / "perf_analyzer"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_get(url: str, timeout: float = 5.0) -> tuple[int | None, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return None, b""


@dataclass
class Server:
    """A running tritonserver: its process (own session: the python stubs die with it) and endpoints."""

    proc: subprocess.Popen
    http: str  # host:port
    grpc: str
    metrics: str
    log: Path

    def ready(self) -> bool:
        return http_get(f"http://{self.http}/v2/health/ready", timeout=2)[0] == 200

    def model_ready(self, model: str) -> bool:
        return http_get(f"http://{self.http}/v2/models/{model}/ready", timeout=2)[0] == 200

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self.proc.poll() is not None:
            try:  # stubs left behind by a killed server
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def start_server(repo: Path, workdir: Path, *, ports: list[int] | None = None, wait_ready: bool = True,
                 ready_timeout: float = READY_TIMEOUT_S, extra: list[str] | None = None,
                 venv: Path | None = None) -> Server:
    """Start tritonserver on 127.0.0.1 serving ``repo``; with ``wait_ready`` return once every model is
    ready (raise RuntimeError with the log tail when it exits or times out). The caller stops it."""
    venv = venv or triton_venv()
    http, grpc, metrics = ports or free_ports(3)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"server-{http}.log"
    env = {**os.environ, "FASTENC_TRITON_VENV": str(venv), "FASTENC_TRITON_WORKDIR": str(workdir)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["bash", str(SERVE), str(repo), str(http), str(grpc), str(metrics),
                                 "--", *(extra or [])],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    server = Server(proc, f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}", log_path)
    if not wait_ready:
        return server
    deadline = time.monotonic() + ready_timeout
    try:
        while not server.ready():
            if proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {proc.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tritonserver not ready after {ready_timeout:.0f} s:\n{server.log_tail()}")
            time.sleep(0.25)
    except BaseException:
        server.stop()
        raise
    return server


@contextmanager
def served(repo: Path, workdir: Path, **kwargs) -> Iterator[Server]:
    server = start_server(repo, workdir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def model_stats(server: Server, model: str) -> dict:
    """``/v2/models/<model>/stats`` of version 1: execution/inference counts, fail count, batch sizes run."""
    status, body = http_get(f"http://{server.http}/v2/models/{model}/stats")
    if status != 200:
        raise RuntimeError(f"stats of {model}: HTTP {status} {body[:200]!r}")
    stats = json.loads(body)["model_stats"][0]
    infer = stats.get("inference_stats", {})
    return {
        "executions": int(stats.get("execution_count", 0)),
        "inferences": int(stats.get("inference_count", 0)),
        "success": int(infer.get("success", {}).get("count", 0)),
        "failed": int(infer.get("fail", {}).get("count", 0)),
        "batches": {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])},
    }


def stats_delta(before: dict, after: dict) -> dict:
    batches = {b: after["batches"].get(b, 0) - before["batches"].get(b, 0) for b in after["batches"]}
    return {**{k: after[k] - before[k] for k in ("executions", "inferences", "success", "failed")},
            "batches": {b: n for b, n in sorted(batches.items()) if n > 0}}


# ---------------------------------------------------------------------------- perf_analyzer


def write_input_data(path: Path, prompts: list[str]) -> Path:
    """perf_analyzer ``--input-data`` JSON: one entry per prompt, each a [1] BYTES ``text`` tensor."""
    path.write_text(json.dumps({"data": [{"text": [p]} for p in prompts]}), encoding="utf-8")
    return path


@dataclass
class Level:
    concurrency: int
    seconds: float
    requests: int
    prompts_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    failed: int
    encoder: dict = field(default_factory=dict)  # stats_delta of the encoder model
    ensemble: dict = field(default_factory=dict)  # stats_delta of the ensemble
    command: str = ""

    @property
    def mean_batch(self) -> float:
        return self.encoder["inferences"] / self.encoder["executions"] if self.encoder.get("executions") else 0.0


def perf_analyzer_command(server: Server, model: str, concurrency: int, window_ms: int, input_data: Path,
                          out_csv: Path, *, venv: Path | None = None) -> list[str]:
    """One bounded perf_analyzer run: three measurement windows of ``window_ms`` (the stability check is
    opened wide, so a busy machine cannot make it search on), a short warm-up; request errors fail the run."""
    return [
        str(perf_analyzer_path(venv)), "-m", model, "-u", server.http, "-i", "http",
        "--concurrency-range", f"{concurrency}:{concurrency}",
        "--input-data", str(input_data),
        "--measurement-mode", "time_windows", "--measurement-interval", str(window_ms),
        "--max-trials", "3", "--stability-percentage", "1000",
        "--warmup-request-count", str(2 * concurrency),
        "--percentile", "95", "-f", str(out_csv),
    ]


def run_level(server: Server, ensemble: str, encoder: str, concurrency: int, seconds: float, input_data: Path,
              workdir: Path, *, venv: Path | None = None, timeout: float | None = None) -> Level:
    """Run perf_analyzer at one concurrency and read its CSV and the server's statistics."""
    out_csv = workdir / f"pa-{ensemble}-c{concurrency}.csv"
    window_ms = max(300, int(seconds * 1000 / 3))
    before_enc, before_ens = model_stats(server, encoder), model_stats(server, ensemble)
    start = time.monotonic()
    for _ in range(4):  # windows too short for the load (no request completed in one, or too few to agree):
        out_csv.unlink(missing_ok=True)  # retry with windows twice as long; request errors are not retried
        cmd = perf_analyzer_command(server, ensemble, concurrency, window_ms, input_data, out_csv, venv=venv)
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or (6 * window_ms / 1000 + 120))
        text = run.stdout + run.stderr
        if run.returncode == 0 or not any(m in text for m in ("No valid requests recorded", "stable measurement")):
            break
        window_ms *= 2
    elapsed = time.monotonic() - start
    enc, ens = stats_delta(before_enc, model_stats(server, encoder)), stats_delta(before_ens, model_stats(server, ensemble))
    if run.returncode != 0 or not out_csv.is_file():
        raise RuntimeError(f"perf_analyzer failed ({run.returncode}) at concurrency {concurrency}:\n"
                           f"{(run.stdout + run.stderr)[-3000:]}\n{server.log_tail(3000)}")
    with open(out_csv, newline="") as f:
        row = next(csv.DictReader(f))
    us = 1e-3
    return Level(concurrency=concurrency, seconds=round(elapsed, 2), requests=ens["inferences"],
                 prompts_per_s=float(row["Inferences/Second"]), p50_ms=float(row["p50 latency"]) * us,
                 p95_ms=float(row["p95 latency"]) * us, p99_ms=float(row["p99 latency"]) * us,
                 failed=ens["failed"] + enc["failed"], encoder=enc, ensemble=ens, command=shlex.join(cmd))


# ---------------------------------------------------------------------------- the model


def make_tokenizer(folder: Path, prompts: list[str]) -> Path:
    """A small T5-style tokenizer (<pad> 0, </s> 1, <unk> 2; </s> appended) trained on ``prompts``: the
    benchmark needs real tokenisation work and no download. Returns its tokenizer.json."""
    import string

    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import Unigram

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<pad>", "</s>", "<unk>"]
    trainer = trainers.UnigramTrainer(vocab_size=2000, special_tokens=specials, unk_token="<unk>", show_progress=False,
                                      initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation))
    tok.train_from_iterator(prompts * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def prepare_export(work: Path, *, size: str, checkpoint: str | None, target: str, max_batch: int,
                   seed: int = 0) -> tuple[Path, Path]:
    """(checkpoint folder, export folder) for the benchmark model; reused when already there."""
    import torch

    import fastenc
    from bench.common import build_model
    from fastenc.exporters import ExportRequest, export

    ckpt = Path(checkpoint) if checkpoint else work / f"ckpt-{size}-seed{seed}"
    if checkpoint is None and not (ckpt / "model.safetensors").is_file():
        fastenc.save(build_model(size, dtype=torch.float32, seed=seed), ckpt)
    if not (ckpt / "tokenizer.json").is_file():
        make_tokenizer(ckpt, PROMPTS)
    out = work / f"export-{ckpt.name}-{target}-b{max_batch}"
    export(ExportRequest(out=out, checkpoint=str(ckpt), max_batch=max_batch, target=target, verify=False))
    return ckpt, out


# ---------------------------------------------------------------------------- results


def level_row(level: Level, setup: dict) -> dict:
    """One CSV row: the run's ``setup`` (encoder, model, target, batching configuration, machine, command)
    and what perf_analyzer and the server's statistics said about ``level``."""
    return {
        **setup, "label": ENCODER_LABELS.get(setup["encoder"], setup["encoder"]), "seq": _seq(setup["target"]),
        "concurrency": level.concurrency, "seconds": level.seconds, "requests": level.requests,
        "prompts_per_s": f"{level.prompts_per_s:.2f}", "p50_ms": f"{level.p50_ms:.1f}",
        "p95_ms": f"{level.p95_ms:.1f}", "p99_ms": f"{level.p99_ms:.1f}", "failed": level.failed,
        "encoder_executions": level.encoder["executions"], "encoder_inferences": level.encoder["inferences"],
        "mean_batch": f"{level.mean_batch:.2f}",
        "batch_sizes": " ".join(f"{b}x{n}" for b, n in level.encoder["batches"].items()),
    }


def machine_name() -> str:
    from bench.common import device_name

    import torch

    return device_name(torch.device("cpu"))


def machine_slug(machine: str) -> str:
    cpus = os.cpu_count() or 0
    words = [w for w in machine.replace("(", " ").replace(")", " ").split() if w.isalnum()]
    brand = next((w.lower() for w in words if w.lower() in ("intel", "amd", "arm", "apple")), "cpu")
    return f"{brand}-{cpus}cpu"


def write_csv(path: Path, rows: list[dict]) -> Path:
    from fastenc.fileio import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastenc.fileio import atomic_write

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict]] = {}
    for r in rows:
        key = f"{r['label']}, {r['model']}, {r['instances']} inst, delay {r['max_queue_delay_us']} us"
        series.setdefault(key, []).append(r)
    for name, rs in series.items():
        c = [int(r["concurrency"]) for r in rs]
        ax_t.plot(c, [float(r["prompts_per_s"]) for r in rs], marker="o", label=name)
        line = ax_l.plot(c, [float(r["p50_ms"]) for r in rs], marker="o", label=f"{name} p50")[0]
        ax_l.plot(c, [float(r["p99_ms"]) for r in rs], marker="x", linestyle="--", color=line.get_color(),
                  label=f"{name} p99")
    for ax, ylabel in ((ax_t, "throughput (prompts/s)"), (ax_l, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests (perf_analyzer --concurrency-range)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_t.legend(fontsize=7)
    ax_l.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def table(rows: list[dict]) -> str:
    head = ["encoder", "inst", "delay us", "conc", "prompts/s", "p50 ms", "p95 ms", "p99 ms", "failed", "mean batch",
            "batch sizes (count)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) for k in (
            "label", "instances", "max_queue_delay_us", "concurrency", "prompts_per_s", "p50_ms", "p95_ms", "p99_ms",
            "failed", "mean_batch", "batch_sizes")) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _encoders(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ENCODERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--encoders: choose from {', '.join(ENCODERS)}, got {text!r}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--encoders", type=_encoders, default=list(ENCODERS),
                   help=f"comma-separated encoder backends to serve in turn (default {','.join(ENCODERS)})")
    p.add_argument("--size", default="small", help="random-init model size (tiny, small, base, ...; default small)")
    p.add_argument("--checkpoint", help="serve this checkpoint (with tokenizer.json) instead of a random-init model")
    p.add_argument("--target", default="pixart-alpha", help="target (its sequence length; default pixart-alpha, 120)")
    p.add_argument("--concurrency", type=_ints, default=[1, 2, 4, 8, 16], help="levels (default 1,2,4,8,16)")
    p.add_argument("--seconds", type=float, default=6.0,
                   help="perf_analyzer measurement time per level: three windows of a third each (default 6)")
    p.add_argument("--max-batch-size", type=int, default=16, help="Triton max_batch_size (default 16)")
    p.add_argument("--instance-counts", type=_ints, default=[1], help="encoder instance counts to try (default 1)")
    p.add_argument("--max-queue-delays-us", type=_ints, default=[100],
                   help="dynamic batching queue delays to try, microseconds (default 100, what triton-repo writes)")
    p.add_argument("--preferred-batch-sizes", type=_ints, default=[], help="dynamic batching preferred sizes")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per encoder instance (0: default)")
    p.add_argument("-o", "--out", type=Path, help="folder for serving.csv and serving.png")
    p.add_argument("--save", action="store_true",
                   help="also add the rows to bench/results/serving-<machine>.csv (earlier runs' rows are kept) and "
                        "redraw serving-<machine>.png")
    p.add_argument("--work", type=Path, help="folder for models, repositories and logs (default: a temporary one)")
    args = p.parse_args(argv)
    if not args.out and not args.save:
        p.error("name an output folder with -o/--out, or pass --save")
    if args.seconds <= 0 or not args.concurrency or min(args.concurrency) < 1:
        p.error("--seconds must be > 0 and --concurrency levels >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:  # the server or perf_analyzer failed: say so, no traceback
        sys.stderr.write(f"bench.serving: error: {exc}\n")
        return 1


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("fastenc")
    command = "python -m bench.serving " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not perf_analyzer_path().is_file():
        sys.stderr.write(f"bench.serving: no perf_analyzer in {triton_venv()}; run `bash scripts/triton_env.sh`\n")
        return 1
    from bench.common import git_commit
    from fastenc.errors import FastencError
    from fastenc.exporters.triton_repo import TritonRepoRequest, write_triton_repo

    machine, commit = machine_name(), git_commit()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fastenc-serving-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            ckpt, exported = prepare_export(work, size=args.size, checkpoint=args.checkpoint, target=args.target,
                                            max_batch=args.max_batch_size)
        except FastencError as exc:
            sys.stderr.write(f"bench.serving: error: {exc}\n")
            return 1
        input_data = write_input_data(work / "prompts.json", PROMPTS)
        model = Path(args.checkpoint).name if args.checkpoint else f"random-init {args.size}"
        for encoder in args.encoders:
            for instances in args.instance_counts:
                for delay in args.max_queue_delays_us:
                    repo = work / f"repo-{encoder}-i{instances}-d{delay}"
                    write_triton_repo(TritonRepoRequest(
                        exported, repo, encoder_backend=encoder, target=args.target, checkpoint=str(ckpt),
                        max_batch_size=args.max_batch_size, max_queue_delay_us=delay, instance_count=instances,
                        preferred_batch_sizes=tuple(args.preferred_batch_sizes), threads=args.threads, force=True))
                    log.info("serving %s: %d instance(s), queue delay %d us", encoder, instances, delay)
                    with served(repo, work / "server") as server:
                        for c in args.concurrency:
                            load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
                            level = run_level(server, "fastenc", "fastenc_encoder", c, args.seconds, input_data, work)
                            setup = {"timestamp": stamp, "encoder": encoder, "model": model, "target": args.target,
                                     "instances": instances, "max_queue_delay_us": delay,
                                     "preferred_batch_sizes": " ".join(map(str, args.preferred_batch_sizes)),
                                     "max_batch_size": args.max_batch_size, "threads": args.threads,
                                     "loadavg_1min": f"{load:.2f}", "machine": machine, "git_commit": commit,
                                     "command": command}
                            row = level_row(level, setup)
                            rows.append(row)
                            log.info("c=%d: %s prompts/s, p50 %s ms, p99 %s ms, mean batch %s, failed %d", c,
                                     row["prompts_per_s"], row["p50_ms"], row["p99_ms"], row["mean_batch"],
                                     level.failed)
    title = (f"fastenc ensemble on tritonserver 2.51 (python backend), {args.target} (L={_seq(args.target)}), "
             f"perf_analyzer on loopback\n{machine}")
    outs = []
    if args.out:
        outs.append((args.out / "serving.csv", args.out / "serving.png"))
    if args.save:
        slug = machine_slug(machine)
        outs.append((RESULTS_DIR / f"serving-{slug}.csv", RESULTS_DIR / f"serving-{slug}.png"))
    for csv_path, png_path in outs:
        keep = []
        if args.save and csv_path.parent == RESULTS_DIR and csv_path.is_file():  # the committed table grows
            with open(csv_path, newline="") as f:
                keep = [r for r in csv.DictReader(f) if r.get("timestamp") != stamp]
        write_csv(csv_path, keep + rows)
        plot(keep + rows, png_path, title)
        sys.stdout.write(f"wrote {csv_path} and {png_path}\n")
    sys.stdout.write(table(rows) + "\n")
    return 1 if any(int(r["failed"]) for r in rows) else 0


def _seq(target: str) -> int:
    from fastenc.config import max_length_for

    return max_length_for(target)


if __name__ == "__main__":
    sys.exit(main())
