"""train.config and train.data: config parsing, prompt files, counts, mixing, curricula, errors."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from fastenc.errors import ConfigError
from fastenc.tokenizer import Tokenizer
from helpers import make_t5_tokenizer_json
from train.config import DataConfig, TrainConfig, apply_override, load_config, read_config_file
from train.data import DataError, PromptStream, load_component, load_components, read_prompts, report


def data_cfg(components: dict, stages: list | None = None, batch_size: int = 4) -> DataConfig:
    raw = {"components": components, "batch_size": batch_size}
    if stages is not None:
        raw["stages"] = stages
    return TrainConfig.from_dict({"data": raw}).data


def lines(path: Path, items) -> str:
    path.write_text("\n".join(items) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(make_t5_tokenizer_json(tmp_path_factory.mktemp("tok")).parent)


# ---------------------------------------------------------------------------- config


def test_config_file_formats_and_overrides(tmp_path):
    (tmp_path / "a.toml").write_text('[optim]\nlr = 3e-5\n[dit]\nkind = "pixart"\n[data.components.x]\npaths = ["p.txt"]\n')
    (tmp_path / "a.json").write_text(json.dumps({"optim": {"lr": 3e-5}, "dit": {"kind": "pixart"}}))
    (tmp_path / "a.yaml").write_text("optim:\n  lr: 3.0e-5\ndit:\n  kind: pixart\n")
    for name in ("a.toml", "a.json", "a.yaml"):
        data = read_config_file(tmp_path / name)
        assert data["optim"]["lr"] == 3e-5 and data["dit"]["kind"] == "pixart"
    cfg = load_config(tmp_path / "a.toml", ["student.init=/m", "dit.path=/d", "optim.ema_decay=0.999",
                                            "data.components.x.weight=2", "dit.guidance=[5.0, 7.5]"])
    assert cfg.optim.ema_decay == 0.999 and cfg.data.components["x"].weight == 2.0
    assert cfg.guidance == [5.0, 7.5] and cfg.target == "pixart-alpha" and cfg.max_length() == 120
    assert cfg.masked and cfg.pooled == "none"
    flux = TrainConfig.from_dict({"student": {"init": "/m"}, "dit": {"path": "/d"}}).validate()
    assert flux.guidance == [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0] and flux.pooled == "clip" and flux.max_length() == 512
    assert TrainConfig.from_dict({"dit": {"kind": "pixart"}}).guidance == [5.0 + 0.5 * i for i in range(11)]


@pytest.mark.parametrize("raw, needle", [
    ({"optim": {"learning_rate": 1}}, "unknown key 'optim.learning_rate'"),
    ({"optim": {"lr": "fast"}}, "optim.lr = 'fast' is not a number"),
    ({"data": {"components": {"x": {"paths": "a.txt"}}}}, "data.components.x.paths must be a list"),
    ({"run": {"max_steps": 1.5}}, "run.max_steps = 1.5 is not"),
])
def test_config_errors_name_the_key(raw, needle):
    with pytest.raises(ConfigError, match=None) as exc:
        TrainConfig.from_dict(raw, source="cfg.toml")
    assert needle in str(exc.value) and "cfg.toml" in str(exc.value)


@pytest.mark.parametrize("raw, needle", [
    ({"dit": {"kind": "sd3"}}, "dit.kind='sd3'"),
    ({"run": {"loss": "kl"}}, "run.loss='kl'"),
    ({"dit": {"kind": "pixart", "pooled": "clip"}}, "no pooled text input"),
    ({"dit": {"pooled": "none"}}, "Flux needs a pooled CLIP input"),
    ({"data": {"components": {"a": {"paths": ["x"]}}, "stages": [{"components": ["b"]}]}}, "unknown component 'b'"),
    ({"optim": {"ema_decay": 1.5}}, "optim.ema_decay"),
])
def test_config_validation(raw, needle):
    raw = {"student": {"init": "/m"}, **raw}
    raw.setdefault("dit", {})["path"] = "/d"
    with pytest.raises(ConfigError) as exc:
        TrainConfig.from_dict(raw).validate()
    assert needle in str(exc.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml: config file not found"):
        read_config_file(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        read_config_file(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "optim.lr")


# ---------------------------------------------------------------------------- files and counts


def test_formats_and_counts(tmp_path, tokenizer, caplog):
    long = " ".join(["a castle on a hill surrounded by mountains and a river"] * 4)
    txt = lines(tmp_path / "sem_train.txt", ["a red car", "", "a red car", "   ", "a blue bird", long])
    (tmp_path / "laion.jsonl").write_text('{"TEXT": "a cat"}\n\n"a dog"\n{"TEXT": null}\n{"TEXT": "a cat"}\n')
    (tmp_path / "text.json").write_text(json.dumps({"0": {"caption": "a sign reading 'hi'"}, "1": "a poster"}))
    cfg = data_cfg({"sem": {"paths": [txt]}, "quality": {"paths": [str(tmp_path / "laion.jsonl")], "field": "TEXT"},
                    "text": {"paths": [str(tmp_path / "text.json")], "repeats": 3}})
    with caplog.at_level(logging.INFO, logger="fastenc.train"):
        comps = load_components(cfg, tokenizer=tokenizer, max_length=16)
        summary = report(comps)
    sem = comps["sem"].report
    assert (sem.read, sem.kept, sem.empty, sem.duplicates, sem.over_length) == (6, 3, 2, 1, 1)
    assert comps["sem"].prompts == ["a red car", "a blue bird", long]  # over-length kept (truncated later)
    q = comps["quality"].report
    assert (q.read, q.kept, q.empty, q.duplicates) == (5, 2, 2, 1) and comps["quality"].prompts == ["a cat", "a dog"]
    assert comps["text"].prompts == ["a sign reading 'hi'", "a poster"] and comps["text"].report.repeats == 3
    assert summary["components"]["sem"]["over_length"] == 1
    text = caplog.text
    assert "sem: 3 prompts kept of 6 read" in text and "2 empty, 1 duplicate(s) left out, 1 over-length" in text
    dropped = load_component("sem", cfg.components["sem"], tokenizer=tokenizer, max_length=16, over_length="drop")
    assert long not in dropped.prompts and dropped.report.over_length_dropped == 1
    kept_dups = load_component("sem", cfg.components["sem"], dedupe=False)
    assert kept_dups.prompts.count("a red car") == 2


def test_directory_and_glob_paths(tmp_path):
    d = tmp_path / "compbench"
    d.mkdir()
    lines(d / "color_train.txt", ["a red car"])
    lines(d / "shape_train.txt", ["a round table"])
    lines(d / "color_val.txt", ["a green car"])
    globbed = load_component("c", data_cfg({"c": {"paths": [str(d / "*_train.txt")]}}).components["c"])
    assert globbed.prompts == ["a red car", "a round table"]
    whole = load_component("c", data_cfg({"c": {"paths": [str(d)]}}).components["c"])
    assert len(whole.prompts) == 3


@pytest.mark.parametrize("name, content, needle", [
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "x",\n', "bad.jsonl:2: not valid JSON"),
    ("bad.json", '[{"prompt": "a"},\n  {"prompt": 3}]', "bad.json: item 1: 'prompt' is int"),
    ("keys.json", '[{"prompt": "a"}, {"title": "b"}]', "keys.json: item 1: object has none of the keys"),
    ("scalar.json", "42", "scalar.json: expected a JSON list"),
    ("broken.json", '[{"prompt": "a"}', "broken.json:1: not valid JSON"),
    ("nums.jsonl", '"a"\n7\n', "nums.jsonl:2: item is int"),
    ("prompts.csv", "a,b\n", "unknown prompt file type '.csv'"),
])
def test_malformed_files(tmp_path, name, content, needle):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as exc:
        load_component("x", data_cfg({"x": {"paths": [str(tmp_path / name)]}}).components["x"])
    assert needle in str(exc.value)
    assert isinstance(exc.value, ConfigError)


def test_missing_empty_and_undecodable(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: file not found \(data\.components\.x\.paths\[0\]\)"):
        load_component("x", data_cfg({"x": {"paths": [str(tmp_path / "nope.txt")]}}).components["x"])
    with pytest.raises(DataError, match="pattern matched no files"):
        load_component("x", data_cfg({"x": {"paths": [str(tmp_path / "*_train.txt")]}}).components["x"])
    (tmp_path / "latin1.txt").write_bytes(b"ok line\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin1\.txt:2: not valid UTF-8"):
        read_prompts(tmp_path / "latin1.txt")
    lines(tmp_path / "blank.txt", ["", "  "])
    with pytest.raises(DataError, match=r"data\.components\.x: no usable prompts .*2 empty"):
        load_component("x", data_cfg({"x": {"paths": [str(tmp_path / "blank.txt")]}}).components["x"])


# ---------------------------------------------------------------------------- mixing and curricula


def _components(tmp_path, sizes: dict[str, int], **extra) -> tuple[DataConfig, dict]:
    spec = {}
    for name, n in sizes.items():
        spec[name] = {"paths": [lines(tmp_path / f"{name}.txt", [f"{name} prompt {i}" for i in range(n)])],
                      **extra.get(name, {})}
    cfg = data_cfg(spec, extra.get("stages"), batch_size=extra.get("batch_size", 4))
    return cfg, load_components(cfg)


def test_weights_mix_components(tmp_path):
    cfg, comps = _components(tmp_path, {"a": 30, "b": 10}, a={"weight": 3.0}, b={"weight": 1.0})
    stream = PromptStream(cfg, comps, seed=0)
    counts = Counter(src for _ in range(300) for src in stream.next_batch().sources)
    assert abs(counts["a"] / 1200 - 0.75) < 0.04


def test_default_weights_follow_size_times_repeats(tmp_path):
    cfg, comps = _components(tmp_path, {"a": 10, "b": 10}, b={"repeats": 3})
    stream = PromptStream(cfg, comps, seed=0)
    assert stream.stages[0].weights == [0.25, 0.75]
    assert stream.stages[0].batches == 10  # one pass: (10 + 30) prompts / 4 per batch
    counts = Counter(src for _ in range(300) for src in stream.next_batch().sources)
    assert abs(counts["b"] / 1200 - 0.75) < 0.04


def test_epochs_cover_each_prompt_repeats_times(tmp_path):
    cfg, comps = _components(tmp_path, {"a": 6}, a={"repeats": 2}, batch_size=3)
    stream = PromptStream(cfg, comps, seed=5)
    drawn = [p for _ in range(4) for p in stream.next_batch().prompts]
    assert Counter(drawn) == {f"a prompt {i}": 2 for i in range(6)}
    assert stream.position["a"] == [1, 0]


def test_staged_curriculum(tmp_path):
    stages = [{"name": "compbench", "components": ["sem"], "batches": 2},
              {"name": "text", "components": ["text"], "batches": 1, "resolution": 1024},
              {"name": "all", "weights": {"sem": 1, "text": 1, "quality": 2}}]
    cfg, comps = _components(tmp_path, {"quality": 8, "sem": 8, "text": 8}, stages=stages)
    stream = PromptStream(cfg, comps, seed=0)
    batches = [stream.next_batch() for _ in range(40)]
    assert [b.stage for b in batches[:4]] == ["compbench", "compbench", "text", "all"]
    assert set(batches[0].sources + batches[1].sources) == {"sem"}
    assert set(batches[2].sources) == {"text"} and batches[2].resolution == 1024 and batches[3].resolution is None
    late = Counter(s for b in batches[3:] for s in b.sources)
    assert set(late) == {"quality", "sem", "text"} and late["quality"] > late["sem"]
    assert stream.stages[2].weights == [0.5, 0.25, 0.25]  # quality, sem, text (component order)


def test_stream_state_resumes_and_shards_across_processes(tmp_path):
    cfg, comps = _components(tmp_path, {"a": 7, "b": 5}, batch_size=2)
    ref = PromptStream(cfg, comps, seed=3)
    for _ in range(5):
        ref.next_batch()
    saved = json.loads(json.dumps(ref.state_dict()))  # JSON-able
    expected = [ref.next_batch().prompts for _ in range(6)]
    again = PromptStream(cfg, comps, seed=3)
    again.load_state_dict(saved)
    assert [again.next_batch().prompts for _ in range(6)] == expected
    # two processes with batch 2 each see the halves of one process's batch of 4
    wide = DataConfig(components=cfg.components, batch_size=4)
    single = PromptStream(wide, comps, seed=3)
    ranks = [PromptStream(cfg, comps, seed=3, num_processes=2, process_index=r) for r in range(2)]
    for _ in range(5):
        whole = single.next_batch().prompts
        assert ranks[0].next_batch().prompts + ranks[1].next_batch().prompts == whole


@pytest.mark.parametrize("name", ["flux-base.toml", "pixart-base.toml", "embedding-baseline.toml"])
def test_shipped_example_configs_validate(name):
    cfg = load_config(Path(__file__).parents[1] / "train" / "configs" / name)
    assert cfg.optim.lr == 1e-4 and cfg.dit.num_inference_steps == 20
    if name == "flux-base.toml":
        assert [s.name for s in cfg.data.stages] == ["semantics", "text-1024px", "all"]
        assert cfg.data.stages[1].resolution == 1024 and cfg.max_length() == 512 and cfg.pooled == "clip"
    if name == "pixart-base.toml":
        assert cfg.masked and cfg.max_length() == 120 and cfg.guidance[0] == 5.0 and cfg.guidance[-1] == 10.0
