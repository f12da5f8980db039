"""bench/peft_memory.py runs end to end on the tiny preset and its byte accounting adds up."""

import importlib.util
import json
import math
import pathlib


def _load_bench():
    # bench/ is a folder of scripts, not a package: load the module from its path
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "peft_memory.py"
    spec = importlib.util.spec_from_file_location("peft_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peft_memory_tiny(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "peft.json"
    result = bench.main(["--presets=tiny", "--batch=2", "--seq=16", "--loss_chunk=16", "--steps=1",
                         f"--json={out}"])
    assert json.loads(out.read_text())["ratios"].keys() == result["ratios"].keys() == {"tiny/lora", "tiny/adapters"}
    rows = {r["method"]: r for r in result["rows"]}
    full, lora, adapters = rows["full"], rows["lora"], rows["adapters"]
    # Full fine-tuning trains every weight; the PEFT methods freeze exactly the base model.
    assert full["frozen_bytes"] == 0 and lora["frozen_bytes"] == adapters["frozen_bytes"] == full["trainable_bytes"]
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


def test_dpo_step_tiny(tmp_path, capsys):
    """bench/dpo_step.py times both DPO configurations on the tiny preset without importing torch."""
    import sys

    torch_loaded_before = "torch" in sys.modules
    bench = _load_script("dpo_step")
    out = tmp_path / "dpo.json"
    result = bench.main(["--preset=tiny", "--pairs=2", "--seq=32", "--steps=1", "--rounds=1", "--no_trl",
                         "--peak_size=1024", f"--json={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["tokens_per_step"] == 2 * 2 * 32 and result["trl"] is False
    assert result["matmul_peak_flops"] == max(result["matmul_peaks"]) > 0
    assert result["configs"].keys() == {"full", "lora"}
    assert result["configs"]["full"]["reference"] == "copy" and result["configs"]["lora"]["reference"] == "base"
    for r in result["configs"].values():
        assert r["tokens_per_sec"] > 0 and r["step_seconds"] > 0 and r["flops_per_step"] > 0 and 0 < r["mfu"]
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
        assert "speed_ratio_vs_trl" not in r
    assert "flaxalign step (best)" in capsys.readouterr().out
    if not torch_loaded_before:
        assert "torch" not in sys.modules


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
