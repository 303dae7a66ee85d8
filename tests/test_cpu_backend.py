"""The cpu backend (bf16 + planned int8 W8A8): accuracy beyond its calibration data, fused-op parity,
plan caching.

These check numbers, not speed, so they run on any x86 CPU: without AVX512-BF16 torch emulates the
bf16 kernels (slower, same results), which the tiny shapes here keep cheap.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bench import common
from fastenc.backends import cpu as fcpu
from fastenc.errors import ConfigError
from fastenc.ops import TORCH_OPS

from reference import TINY

#: Deep enough (6 layers) for quantisation error to build up, small enough for the suite.
OUTLIER_CFG = TINY.replace(d_model=128, d_ff=352, num_layers=6, num_heads=4, d_kv=32, vocab_size=1024,
                           num_buckets=32, max_distance=128, projection_dim=512, name="outlier")
OUTLIER_CHANNELS = (3, 77, 101)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "fastenc-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread avoids waiting on a descheduled OpenMP peer
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def outlier_model(scale: float = 20.0, damp: float = 2.0, cfg=OUTLIER_CFG) -> torch.nn.Module:
    """T5-initialised weights with a few residual channels ``scale`` times larger, as in trained T5 v1.1:
    the embeddings and every FFN output projection write those channels large, and the RMSNorm
    weights damp them by ``damp`` only, so the normalised activations entering every GEMM keep a few
    channels ~``scale / damp`` times the rest (per-token int8 then loses the small channels)."""
    model = common.build_model(cfg, seed=7)
    ch = list(OUTLIER_CHANNELS)
    model.embed.weight[:, ch] *= scale
    for block in model.blocks:
        block.ffn.wo.weight[ch, :] *= scale
        block.attn_norm.weight[ch] /= damp
        block.ffn_norm.weight[ch] /= damp
    model.final_norm.weight[ch] /= damp
    return model


def cos_to(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(out.float(), ref.float(), dim=-1)  # [B, L]


def test_outlier_weights_really_have_outlier_activations():
    model = outlier_model()
    ids = common.sample_ids(OUTLIER_CFG, 1, 32, seed=1)
    with torch.inference_mode():
        x = model.embed(ids)  # [1, L, D]
        normed = TORCH_OPS.rms_norm(x, model.blocks[0].attn_norm.weight, 1e-6)
    share = normed[..., list(OUTLIER_CHANNELS)].pow(2).sum(-1) / normed.pow(2).sum(-1)  # [1, L]
    assert float(share.median()) > 0.5  # 3 of 128 channels hold most of a typical token's energy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("attention", ["matmul", "sdpa"])
def test_plan_keeps_accuracy_on_outlier_weights_beyond_calibration(attention, dtype):
    """Both precisions the op table computes in: the int8 set holds on inputs the search never saw. Where
    bf16 is emulated (no AVX512-BF16 or AMX; the plan is fp32 there) bf16 alone can sit at the floor, so
    that the search may keep no int8 GEMM; everywhere else some GEMMs must stay int8, unless bf16 alone leaves
    the calibration batch's worst token in the lower half of the floor's margin (as the matmul attention does
    with Zen 4's AVX512-BF16 GEMMs: 0.99940 against 0.9994), where one int8 GEMM more crosses it."""
    from fastenc.backends import cpu_fast_path

    model = outlier_model()
    fast = fcpu.prepare(copy.deepcopy(model), source="test:outlier", attention=attention, dtype=dtype)
    assert fast.int8_plan.calib_len == fcpu.CALIB_LEN
    # ids, lengths and a padding mask the plan never saw (calibration: one row of 128 ids, seed 0)
    cases = [(common.sample_ids(OUTLIER_CFG, 1, 40, seed=11), None),
             (common.sample_ids(OUTLIER_CFG, 2, 200, seed=12), None)]
    ids = common.sample_ids(OUTLIER_CFG, 2, 77, seed=13)
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0
    cases.append((ids, mask))
    for ids, mask in cases:
        with torch.inference_mode():
            ref, out = model(ids, mask), fast(ids, mask)
        cos = cos_to(out, ref)
        if mask is not None:
            cos = cos[mask.bool()]  # padding positions are not embeddings anyone uses
        assert float(cos.mean()) >= 0.9995, (tuple(ids.shape), float(cos.mean()), fast.int8_plan)
        assert float(cos.min()) >= 0.998, (tuple(ids.shape), float(cos.min()), fast.int8_plan)
    if dtype == torch.float32 or cpu_fast_path()[0]:
        plan = fast.int8_plan
        assert fast.ops.num_int8 > 0 or plan.worst < (1 + fcpu.DEFAULT_MIN_WORST) / 2, plan  # still some int8
    assert fast.int8_plan.cos >= fcpu.DEFAULT_MIN_COS and fast.int8_plan.worst >= fcpu.DEFAULT_MIN_WORST


def test_outliers_are_what_the_plan_protects_against():
    """Quantising every GEMM of the outlier model breaks its worst tokens, so the plan's choices matter."""
    model = outlier_model()
    ids = common.sample_ids(OUTLIER_CFG, 2, 200, seed=21)
    everything = fcpu.prepare(copy.deepcopy(model), int8="all", attention="matmul")
    planned = fcpu.prepare(copy.deepcopy(model), attention="matmul")
    with torch.inference_mode():
        ref, everything, planned = model(ids), everything(ids), planned(ids)
    worst_all, worst_planned = float(cos_to(everything, ref).min()), float(cos_to(planned, ref).min())
    assert worst_all < 0.999 and worst_all < worst_planned


# ----------------------------------------------------------------------------- fused attention


@pytest.mark.parametrize("B,H,L,dk", [(1, 3, 17, 8), (2, 4, 64, 32), (1, 2, 129, 64)])
def test_sdpa_attention_matches_reference(B, H, L, dk):
    gen = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(B, H, L, dk, generator=gen) * 0.5 for _ in range(3))  # [B, H, L, dk]
    mask = torch.ones(B, L)
    mask[-1, L // 2:] = 0
    bias32 = TORCH_OPS.position_bias(torch.randn(32, H, generator=gen), L, mask, 32, 128, torch.float32)
    ref = TORCH_OPS.attention(q, k, v, bias32)  # fp32 reference
    bias16 = TORCH_OPS.position_bias(torch.randn(32, H, generator=gen), L, mask, 32, 128, torch.bfloat16)
    bf = [t.bfloat16() for t in (q, k, v)]
    sdpa = fcpu.CpuOps("sdpa").attention(*bf, bias16)
    matmul = fcpu.CpuOps("matmul").attention(*bf, bias16)
    assert sdpa.dtype == torch.bfloat16 and sdpa.shape == (B, H, L, dk)
    ref16 = TORCH_OPS.attention(*(t.float() for t in bf), bias16.float())
    torch.testing.assert_close(sdpa.float(), ref16, atol=2e-2, rtol=2e-2)
    # the fused kernel is at least as close to fp32 as the bf16 matmul path
    err = lambda out: float((out.float() - ref16).norm() / ref16.norm())  # noqa: E731
    assert err(sdpa) <= err(matmul) * 1.5 + 1e-3
    torch.testing.assert_close(TORCH_OPS.attention(q, k, v, bias32), ref)


def test_sdpa_takes_the_fused_cpu_kernel():
    q, k, v = (torch.randn(1, 2, 48, 16).bfloat16() for _ in range(3))
    bias = TORCH_OPS.position_bias(torch.randn(32, 2), 48, None, 32, 128, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fcpu.CpuOps("sdpa").attention(q, k, v, bias)
    names = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names, sorted(names)
    assert "aten::bmm" not in names and "aten::_softmax" not in names


def test_matmul_attention_equals_reference_in_bf16():
    q, k, v = (torch.randn(2, 3, 17, 8).bfloat16() for _ in range(3))  # [B, H, L, dk]
    bias = TORCH_OPS.position_bias(torch.randn(8, 3), 17, torch.ones(2, 17), 8, 20, torch.bfloat16)
    assert torch.equal(fcpu.CpuOps("matmul").attention(q, k, v, bias), TORCH_OPS.attention(q, k, v, bias))


def test_choose_attention_returns_a_kind_and_bad_kinds_fail():
    assert fcpu.choose_attention(TINY, 32, reps=1) in fcpu.ATTENTION_KINDS
    with pytest.raises(ConfigError, match="attention must be one of"):
        fcpu.CpuOps("flash")
    with pytest.raises(ConfigError, match="attention must be auto"):
        fcpu.prepare(common.build_model(TINY), attention="flash")


# ----------------------------------------------------------------------------- plan cache


def test_plan_and_attention_choice_are_cached_and_reused(tmp_path, monkeypatch):
    model = common.build_model(TINY)
    a = fcpu.prepare(copy.deepcopy(model), source="test:tiny")
    files = list((tmp_path / "fastenc-cache" / "cpu-plans").glob("*.json"))
    assert len(files) == 1
    assert a.int8_plan.attention in fcpu.ATTENTION_KINDS and a.ops.attention_kind == a.int8_plan.attention
    text = files[0].read_text()
    other = "sdpa" if a.int8_plan.attention == "matmul" else "matmul"
    files[0].write_text(text.replace(str(a.int8_plan.cos), "0.123").replace(f'"{a.int8_plan.attention}"',
                                                                             f'"{other}"'))

    def no_search(*args, **kwargs):
        raise AssertionError("a cached plan must not be searched or timed again")

    monkeypatch.setattr(fcpu, "plan_int8", no_search)
    monkeypatch.setattr(fcpu, "choose_attention", no_search)
    b = fcpu.prepare(copy.deepcopy(model), source="test:tiny")  # the file's values, no planning cost
    assert b.int8_plan.weights == a.int8_plan.weights and b.int8_plan.cos == 0.123
    assert b.ops.attention_kind == other
    monkeypatch.undo()
    monkeypatch.setenv("FASTENC_CACHE_DIR", str(tmp_path / "fastenc-cache"))
    for broken in ("not json", fcpu.Int8Plan(("blocks.9.attn.qkv.weight",)).to_json(),
                   text.replace(f'"{a.int8_plan.attention}"', '"flash"')):
        files[0].write_text(broken)  # unreadable, naming weights the model lacks, unknown kernel: planned again
        c = fcpu.prepare(copy.deepcopy(model), source="test:tiny")
        assert c.int8_plan.weights == a.int8_plan.weights and c.int8_plan.attention in fcpu.ATTENTION_KINDS


# ----------------------------------------------------------------------------- smoothing (SmoothQuant)


def test_smoothing_moves_activation_outliers_into_the_weights():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 96, generator=gen)  # [M, K]
    x[:, [5, 40]] *= 30.0  # two outlier channels
    w = torch.randn(48, 96, generator=gen) * 96**-0.5  # [N, K]
    ref = F.linear(x, w)
    plain = fcpu.int8_linear(x, fcpu.quantize_weight(w))
    smoothed_w = fcpu.quantize_weight(w, x.abs().amax(dim=0))
    assert smoothed_w.inv_smooth is not None and smoothed_w.inv_smooth.shape == (96,)
    smoothed = fcpu.int8_linear(x, smoothed_w)
    err = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
    assert err(smoothed) < 0.5 * err(plain)
    # no outlier channels: no smoothing, the plain int8 weight bit for bit
    calm = fcpu.quantize_weight(w, torch.ones(96))
    assert calm.inv_smooth is None and torch.equal(calm.qweight_t, fcpu.quantize_weight(w).qweight_t)


def test_plan_smooths_only_where_activations_have_outliers():
    # fp32 compute, where every CPU class keeps int8 GEMMs on this model (emulated bf16 alone can sit at the floor)
    outl = fcpu.prepare(outlier_model(), attention="matmul", dtype=torch.float32)
    plain = fcpu.prepare(common.build_model(OUTLIER_CFG, seed=7), attention="matmul", dtype=torch.float32)
    assert sum(e.inv_smooth is not None for e in outl.ops._int8.values()) > 0
    assert all(e.inv_smooth is None for e in plain.ops._int8.values())


def test_prompt_ids_are_a_prompt_then_eos_then_padding_with_common_pieces_recurring():
    ids = fcpu.prompt_ids(OUTLIER_CFG, 16, 512, seed=3)  # [16, 512]
    assert ids.shape == (16, 512) and ids.dtype == torch.long
    lengths = []
    for row in ids:
        n = int((row == fcpu.EOS_ID).nonzero()[0])  # the prompt's length: EOS right after it
        assert fcpu.PROMPT_TOKENS[0] <= n <= fcpu.PROMPT_TOKENS[1]
        assert bool((row[:n] > 2).all()) and bool((row[n + 1:] == fcpu.PAD_ID).all())  # no pad, EOS or <unk> inside
        lengths.append(n)
    assert len(set(lengths)) > 4  # each row its own length
    content = ids[(ids > 2)]
    assert int(torch.bincount(content).argmax()) == 3  # the vocabulary's first piece is the most frequent
    assert torch.equal(ids, fcpu.prompt_ids(OUTLIER_CFG, 16, 512, seed=3))
    assert not torch.equal(ids, fcpu.prompt_ids(OUTLIER_CFG, 16, 512, seed=4))
    # rows shorter than a prompt: the prompt fills what EOS leaves
    assert fcpu.prompt_ids(OUTLIER_CFG, 1, 1).tolist() == [[fcpu.EOS_ID]]
    short = fcpu.prompt_ids(OUTLIER_CFG, 2, 6, seed=1)
    assert (short[:, -1] == fcpu.EOS_ID).all() and (short[:, :-1] > 2).all()


def test_the_int8_set_is_confirmed_on_a_second_batch_and_steps_back_until_it_holds(caplog):
    """plan_int8's confirming batch: one that agrees with the search changes nothing; on a fresh batch the
    set kept is a subset of the one found (layers dropped from the lowest up, never added); one no int8
    set can pass (its reference is off by more than the floor allows) leaves no int8 GEMM, said once."""
    model = outlier_model()
    fcpu.prepare(model, int8="none", attention="matmul", dtype=torch.float32)
    ids = fcpu.calibration_ids(model.config)
    ids2 = fcpu.calibration_ids(model.config, seed=fcpu.CONFIRM_SEED)
    with torch.inference_mode():
        model.ops.clear()
        ref, ref2 = model(ids), model(ids2)  # [rows, L, P] the fp32 op table is the reference here
    found = fcpu.plan_int8(model, ref, ids)
    assert found.weights
    assert fcpu.plan_int8(model, ref, ids, confirm=(ref, ids)).weights == found.weights
    kept = fcpu.plan_int8(model, ref, ids, confirm=(ref2, ids2))
    assert set(kept.weights) <= set(found.weights)
    assert kept.worst >= fcpu.DEFAULT_MIN_WORST or not kept.weights
    off = ref2 + 0.05 * ref2.abs().mean() * torch.randn(ref2.shape, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("INFO", logger="fastenc"):
        none = fcpu.plan_int8(model, ref, ids, confirm=(off, ids2))
    assert none.weights == () and "missed the floor on the confirming batch; 0 kept" in caplog.text


def test_group_quantisation_gives_each_group_of_channels_its_own_scale():
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    x[1, 5] = 80.0  # an outlier channel in the first group of row 1
    q, scale = fcpu.quantize_rows(x, group=128)
    assert q.dtype == torch.int8 and q.shape == (3, 256) and scale.shape == (3, 2)
    torch.testing.assert_close(scale, x.view(3, 2, 128).abs().amax(-1) / 127)
    back = q.float().view(3, 2, 128) * scale.unsqueeze(-1)
    assert bool(((back.view(3, 256) - x).abs() <= scale.repeat_interleave(128, dim=1) / 2 + 1e-6).all())
    _, per_token = fcpu.quantize_rows(x)
    assert float(per_token[1, 0]) > 10 * float(scale[1, 1])  # the other group keeps its fine scale


def test_the_grouped_op_table_computes_what_openvino_computes_with_the_same_int8_weights():
    """The op table's emulation of OpenVINO's dynamic quantisation (a scale per token and 128 channels), which
    plans OpenVINO's int8 set, is nearer to OpenVINO's output than the per-token op table is (widths of two
    groups and more, outlier channels in the first)."""
    from fastenc.backends import cpu_openvino

    cfg = OUTLIER_CFG.replace(d_model=256, d_ff=512, num_layers=2)
    model = outlier_model(cfg=cfg)
    names = fcpu.linear_weight_names(model)
    engine = cpu_openvino.OpenVinoEngine(model, precision="f32", int8_weights=names)
    ids = common.sample_ids(cfg, 2, 64, seed=31)
    with torch.inference_mode():
        want = engine(ids).float()
    gaps = {}
    for group in (128, 0):
        m = fcpu.prepare(copy.deepcopy(model), int8=names, attention="sdpa", dtype=torch.float32)
        m.ops.act_group = group
        with torch.inference_mode():
            gaps[group] = float((m(ids).float() - want).abs().max())
    # without VNNI OpenVINO multiplies fp32 activations by the dequantised weights: both emulations only add noise
    assert gaps[128] < (0.5 if cpu_openvino.dynamic_int8() else 1.0) * gaps[0], gaps


def test_prepare_plans_the_grouped_set_beside_the_per_token_one_and_caches_both(monkeypatch):
    """``act_group``: the int8 set for activations per group of channels, planned against the same fp32
    references and cached with the per-token one; a cached plan without it is searched again when asked (fp32
    op table: int8 GEMMs fit the floor there on every CPU class)."""
    model = outlier_model()

    def prep(source=None, **kwargs):
        return fcpu.prepare(copy.deepcopy(model), source=source, attention="sdpa", dtype=torch.float32, **kwargs)

    plan = prep("test:grouped", act_group=128).int8_plan
    assert plan.group == 128 and plan.grouped and set(plan.grouped) <= set(fcpu.linear_weight_names(model))
    assert fcpu.Int8Plan.from_json(plan.to_json()) == plan
    searches = []
    real = fcpu.plan_int8
    monkeypatch.setattr(fcpu, "plan_int8", lambda *a, **k: searches.append(1) or real(*a, **k))
    again, plain = prep("test:grouped", act_group=128), prep("test:grouped")
    assert not searches and again.int8_plan == plan and plain.int8_plan.weights == plan.weights
    prep("test:per-token")  # cached without a grouped set
    assert len(searches) == 1
    prep("test:per-token", act_group=128)
    assert len(searches) == 3  # searched again: the per-token set and the grouped one
    grouped = prep(int8=list(plan.grouped))
    grouped.ops.act_group = 128  # the set keeps the floor where activations are quantised per group
    ids = common.sample_ids(OUTLIER_CFG, 2, 90, seed=17)
    with torch.inference_mode():
        cos = cos_to(grouped(ids), model(ids))
    assert float(cos.mean()) >= 0.9995 and float(cos.min()) >= 0.998
