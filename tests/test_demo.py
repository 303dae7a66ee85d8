"""The main job (`fastenc demo`) offline: random-init student, loud banner, export + verify, latency table."""

from fastenc.cli import main


def test_demo_offline_random_init(capsys, tmp_path):
    assert main(["demo", "--size", "small", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "NO CHECKPOINT GIVEN: running a RANDOM-INIT 'small' student" in out
    assert "RANDOM-INIT weights" in out
    assert "token ids [3, 512] -> embeddings [3, 512, 4096]" in out
    assert "onnx/encoder.fp32.onnx" in out and "pass" in out and "fail" not in out  # the verify table
    rows = [r for r in (line.split() for line in out.splitlines()) if len(r) == 6 and r[3] in ("77", "512")]
    # latency table: the default CPU backend (cpu where bf16 is native, else torch) and ONNX Runtime, 2 lengths each
    assert len(rows) == 4 and rows[0][0] in ("cpu", "torch") and rows[2][0] == "onnxruntime"
    assert (tmp_path / "export" / "onnx" / "encoder.fp32.onnx").is_file()
    assert out.rstrip().endswith("demo finished")


def test_demo_bad_checkpoint_is_one_line(capsys, tmp_path):
    assert main(["demo", "--checkpoint", str(tmp_path / "missing"), "--no-export"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastenc: error: ") and err.count("\n") == 1
