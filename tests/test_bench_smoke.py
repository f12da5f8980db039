"""The bench/ scripts run end to end on the tiny preset (smoke runs of a step or two) and what they report adds up:
byte accounting, closed-form first losses, ratios computed from the timings they print."""

import importlib.util
import json
import math
import pathlib

import pytest


def _load_bench():
    # bench/ is a folder of scripts, not a package: load the module from its path
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "peft_memory.py"
    spec = importlib.util.spec_from_file_location("peft_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a bench script's smoke run, not a proof of the library: CI's slow group
def test_peft_memory_tiny(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "peft.json"
    result = bench.main(["--presets=tiny", "--batch=2", "--seq=16", "--loss_chunk=16", "--steps=1",
                         f"--json={out}"])
    assert json.loads(out.read_text())["ratios"].keys() == result["ratios"].keys() == {
        "tiny/lora", "tiny/adapters", "tiny/qlora_int8", "tiny/qlora_nf4"}
    rows = {r["method"]: r for r in result["rows"]}
    full, lora, adapters = rows["full"], rows["lora"], rows["adapters"]
    # Full fine-tuning trains every weight; the PEFT methods freeze exactly the base model, QLoRA in fewer bytes.
    assert full["frozen_bytes"] == 0 and lora["frozen_bytes"] == adapters["frozen_bytes"] == full["trainable_bytes"]
    assert rows["qlora_nf4"]["frozen_bytes"] < rows["qlora_int8"]["frozen_bytes"] < lora["frozen_bytes"]
    assert rows["qlora_nf4"]["trainable_params"] == lora["trainable_params"]
    for r in rows.values():
        # AdamW: two float32 moments per trainable param, plus a few scalar counts.
        assert 2 * r["trainable_bytes"] <= r["optimizer_bytes"] <= 2 * r["trainable_bytes"] + 64
        assert r["step_seconds"] > 0 and all(math.isfinite(x) for x in r["losses"])
        assert r["peak_estimate_bytes"] >= r["argument_size_in_bytes"] > 0
    assert 0 < adapters["trainable_params"] < lora["trainable_params"] < full["trainable_params"]
    assert result["ratios"]["tiny/lora"]["train_state_ratio"] < 1
    assert "(optimizer + trainable) / full" in capsys.readouterr().out


def _load_script(name):
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DPO_TINY = ["--preset=tiny", "--pairs=2", "--seq=32", "--steps=1", "--rounds=1", "--peak_size=1024"]


def _assert_side(side):
    assert side["seconds"] > 0 and side["tokens_per_sec"] > 0 and side["mfu"] > 0
    assert side["seconds"] == min(side["seconds_rounds"])


def _check_dpo_result(result, out, *, end_to_end):
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["tokens_per_step"] == 2 * 2 * 32 and result["trl"] is False and result["end_to_end"] is end_to_end
    assert result["matmul_peak_flops"] == max(result["matmul_peaks"]) > 0
    assert result["configs"].keys() == {"full", "lora"}
    assert result["configs"]["full"]["reference"] == "copy" and result["configs"]["lora"]["reference"] == "base"
    for r in result["configs"].values():
        assert r["flops_per_step"] > 0 and "speed_ratio_vs_trl" not in r
        assert r["in_step"].keys() == {"flaxalign"}  # no TRL side, no ratio
        _assert_side(r["in_step"]["flaxalign"])
        # The first step's policy equals its reference (a copy; LoRA's B = 0), so the sigmoid DPO loss is
        # -log σ(0) = ln 2; float32 rounding only (measured |Δ| < 1e-6).
        assert abs(r["first_loss"] - math.log(2)) < 1e-5 and math.isfinite(r["last_loss"])
        assert ("end_to_end" in r) is end_to_end
        if end_to_end:
            assert r["end_to_end"].keys() == {"flaxalign"}
            _assert_side(r["end_to_end"]["flaxalign"])
            assert abs(r["loop_first_loss"] - math.log(2)) < 1e-5 and math.isfinite(r["loop_last_loss"])


@pytest.mark.slow  # a bench script's smoke run, not a proof of the library: CI's slow group
def test_dpo_step_tiny(tmp_path, capsys):
    """bench/dpo_step.py times the in-step compiled DPO step of both configurations on the tiny preset without
    importing torch, and both start from policy = reference."""
    import sys

    torch_loaded_before = "torch" in sys.modules
    bench = _load_script("dpo_step")
    out = tmp_path / "dpo.json"
    _check_dpo_result(bench.main([*DPO_TINY, "--no_trl", "--no_end_to_end", f"--json={out}"]), out,
                      end_to_end=False)
    assert "in-step     flaxalign" in capsys.readouterr().out
    if not torch_loaded_before:
        assert "torch" not in sys.modules


@pytest.mark.slow
def test_dpo_step_tiny_end_to_end(tmp_path, capsys):
    """The end-to-end side of bench/dpo_step.py drives the real training loop (`loop.train`, log_every=1) on the
    tiny preset: every timed step logged a step_time, and the loop's first loss is ln 2 too."""
    bench = _load_script("dpo_step")
    out = tmp_path / "dpo.json"
    _check_dpo_result(bench.main([*DPO_TINY, "--no_trl", f"--json={out}"]), out, end_to_end=True)
    assert "end-to-end  flaxalign" in capsys.readouterr().out


def _lora_params(preset, rank):
    head_dim = preset["d_model"] // preset["n_heads"]
    d, q, kv, ff = preset["d_model"], preset["n_heads"] * head_dim, preset["n_kv_heads"] * head_dim, preset["d_ff"]
    per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + ff) + (ff + d)  # q, k, v, o, gate, up, down
    return rank * per_layer * preset["n_layers"]


@pytest.mark.parity
def test_dpo_step_tiny_with_trl(tmp_path, capsys):
    """The TRL side of bench/dpo_step.py runs on the tiny preset: TRL's batches have the flaxalign shape (the
    script checks), TRL's first logged loss is ln 2 like flaxalign's, and both ratios are TRL time / flaxalign
    time of the same comparison. The flaxalign loop is skipped here (the default smoke test runs it)."""
    bench = _load_script("dpo_step")
    result = bench.main([*DPO_TINY, "--no_end_to_end"])
    assert result["trl"] is True and result["end_to_end"] is False
    for r in result["configs"].values():
        for comparison in ("in_step", "end_to_end"):
            assert r[comparison].keys() >= {"trl"}
            _assert_side(r[comparison]["trl"])
        assert r["end_to_end"].keys() == {"trl"}  # no flaxalign loop, so no end-to-end ratio
        assert r["speed_ratio_vs_trl"] == r["in_step"]["ratio"] == (
            r["in_step"]["trl"]["seconds"] / r["in_step"]["flaxalign"]["seconds"])
        assert "speed_ratio_vs_trl_end_to_end" not in r
        # TRL's step 1: the reference is a deep copy (full) or the adapter-off base with LoRA B = 0 (measured
        # |Δ| < 1e-6; TRL logs the float32 loss as a Python float).
        assert abs(r["trl_first_loss"] - math.log(2)) < 1e-5
    # PEFT's all-linear LoRA trains r·(d_in + d_out) per projection of every layer (not the LM head): a hand count
    assert result["configs"]["lora"]["trl_trainable_params"] == _lora_params(bench.models.preset("tiny"), rank=8)
    assert "flaxalign / TRL" in capsys.readouterr().out


def test_data_loader_tiny(capsys):
    """bench/data_loader.py measures the model's train step in the same process (tiny preset) and divides every
    pipeline's tokens/s by that measured number."""
    bench = _load_script("data_loader")
    result = bench.main(["--model_preset=tiny", "--examples=200", "--pairs=100", "--min_len=8", "--max_len=64",
                         "--seq_len=32", "--pair_len=32", "--batch=2", "--repeats=1", "--model_steps=1",
                         "--parquet_rows=5000"])
    assert result["model_tokens_per_sec"] > 0 and "measured in this run" in result["model"]
    assert result["parquet"]["rows"] == 5000 and result["parquet"]["rows_per_sec"] > 0
    assert [row["pipeline"] for row in result["pipelines"]] == [
        "SFT", "SFT, numpy inputs", "preference", "preference per batch", "CLM pack_documents"]
    for row in result["pipelines"]:
        assert row["tokens"] > 0
        assert math.isclose(row["times_model"], row["tokens_per_sec"] / result["model_tokens_per_sec"])
    assert "model: " in capsys.readouterr().out


@pytest.mark.slow  # a bench script's smoke run, not a proof of the library: CI's slow group
def test_generate_bench_tiny(tmp_path, capsys):
    """bench/generate.py times the KV-cache and recompute samplers on the tiny preset without importing torch."""
    import sys

    torch_loaded_before = "torch" in sys.modules
    bench = _load_script("generate")
    out = tmp_path / "generate.json"
    result = bench.main(["--preset=tiny", "--batch=2", "--prompt_len=8", "--new_tokens=8", "--rounds=1",
                         "--min_seconds=0", "--no_torch", f"--json={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["tokens_per_call"] == 2 * 8 and result["torch"] is False
    assert result["greedy_kv_equals_recompute"] is True
    assert result["configs"].keys() == {"kv", "recompute"} and result["ratios"].keys() == {"kv_vs_recompute"}
    for r in result["configs"].values():
        assert r["tokens_per_sec"] > 0 and r["seconds_per_call"] > 0 and r["compile_seconds"] > 0
    assert result["ratios"]["kv_vs_recompute"] > 0
    assert "greedy KV == recompute: yes" in capsys.readouterr().out
    if not torch_loaded_before:
        assert "torch" not in sys.modules
