"""`flaxalign plan`: topology parsing, the chip table, the data-free tasks and the report are plain unit tests; the
ahead-of-time compiles for TPU topologies need libtpu and are marked `tpu` (./launch/test.sh --tpu)."""

import importlib.util
import math
import os
import types

import jax
import ml_collections
import numpy as np
import pytest

from flaxalign import errors, models, plan, sharding
from flaxalign.stages.description import RolloutSpec
from tests import cli_helpers as cli

GIB = 2 ** 30
tpu = pytest.mark.tpu

# llama3_8b's shape as --config.model.* flags on a preset built for tiny (configs/dpo.py has no llama3_8b preset)
LLAMA3_8B_FLAGS = [f"--config.model.{k}={v}" for k, v in (
    ("vocab_size", 128256), ("d_model", 4096), ("n_layers", 32), ("n_heads", 32), ("n_kv_heads", 8),
    ("d_ff", 14336), ("max_seq_len", 8192), ("tie_embeddings", False))]


def stage_config(stage: str, preset: str = "tiny", **overrides) -> ml_collections.ConfigDict:
    """configs/<stage>.py:<preset> with dotted overrides, e.g. **{"lora.rank": 8}."""
    spec = importlib.util.spec_from_file_location(f"configs_{stage}", os.path.join(cli.REPO, "configs",
                                                                                  f"{stage}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


def llama3_8b_dpo(**overrides) -> ml_collections.ConfigDict:
    config = stage_config("dpo", **overrides)
    config.model = ml_collections.ConfigDict(dict(models.preset("llama3_8b"), dtype="auto"))
    return config


# ------------------------------------------------------------------------------------------------ default suite


@pytest.mark.parametrize("text, kind, shape, libtpu_name, accelerator", [
    ("v5e:2x4", "v5e", (2, 4), "v5e:2x4", "v5litepod-8"),
    ("v5p:4x4x4", "v5p", (4, 4, 4), "v5:4x4x4", "v5p-128"),
    ("v4:2x2x1", "v4", (2, 2, 1), "v4:2x2x1", "v4-8"),
    (" V6E:4x4 ", "v6e", (4, 4), "v6e:4x4", "v6e-16"),
])
def test_parse_topology(text, kind, shape, libtpu_name, accelerator):
    topology = plan.parse_topology(text)
    assert (topology.chip.kind, topology.shape, topology.libtpu_name) == (kind, shape, libtpu_name)
    assert topology.chips == math.prod(shape)
    assert topology.chip.accelerator(topology.chips) == accelerator
    assert topology.name == f"{kind}:{'x'.join(map(str, shape))}"


def test_chips_per_host_bounds():
    assert plan.parse_topology("v5e:2x4").chips_per_host_bounds == (2, 2, 1)
    assert plan.parse_topology("v5e:1x1").chips_per_host_bounds == (1, 1, 1)
    assert plan.parse_topology("v5p:4x4x8").chips_per_host_bounds == (2, 2, 1)


@pytest.mark.parametrize("text, says", [
    ("v3:2x2", "is not a TPU topology"), ("v5e-8", "is not a TPU topology"), ("", "is not a TPU topology"),
    ("v5e:2x4x1", "a v5e slice has 2 positive dimensions"), ("v5p:4x4", "a v5p slice has 3 positive dimensions"),
    ("v4:0x2x2", "positive dimensions"),
])
def test_parse_topology_rejects(text, says):
    with pytest.raises(errors.ConfigError, match=says):
        plan.parse_topology(text)


def test_chip_table_is_the_datasheet():
    """Per-chip HBM and dense bf16 peak from cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}; the usable HBM (the
    compiler's limit) is within 4% of it."""
    expected = {"v4": (32, 275e12), "v5e": (16, 197e12), "v5p": (95, 459e12), "v6e": (32, 918e12)}
    for kind, (hbm_gib, peak) in expected.items():
        chip = plan.CHIPS[kind]
        assert (chip.hbm_bytes, chip.peak_flops) == (hbm_gib * GIB, peak)
        assert abs(chip.usable_bytes / chip.hbm_bytes - 1) < 0.04
    assert plan.CHIPS["v5p"].chip_config == plan.CHIPS["v4"].chip_config == "megacore"


def test_compile_oom_messages():
    temporaries = RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
                               "memory required for HLO temporaries (62.51G) exceeds available HBM (15.75G).")
    oom = plan.compile_oom(temporaries, argument_bytes=4 * GIB)
    assert oom["needed"] == pytest.approx(66.51 * GIB) and oom["limit"] == pytest.approx(15.75 * GIB)
    total = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
                         "hbm. Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.")
    assert plan.compile_oom(total, argument_bytes=4 * GIB)["needed"] == pytest.approx(20.5 * GIB)
    assert plan.compile_oom(RuntimeError("RESOURCE_EXHAUSTED: something else"))["needed"] is None
    assert plan.compile_oom(ValueError("shapes do not match")) is None


def test_suggestions_fit_the_config():
    full = models.ModelConfig(**models.preset("tiny"))
    tips = plan.suggestions(stage_config("dpo"), full, {"data": 8, "fsdp": 1, "tensor": 1}, 8)
    assert any("model.remat='full'" in t for t in tips) and any("mesh.fsdp=-1" in t for t in tips)
    assert any("lora.rank" in t for t in tips) and any("grad_accum" in t for t in tips)
    remat = models.ModelConfig(**models.preset("tiny"), remat="full")
    tips = plan.suggestions(stage_config("dpo", **{"lora.rank": 8}), remat, {"data": 1, "fsdp": 8, "tensor": 1}, 8)
    assert tips == ["a smaller data.batch_size or micro-batches (grad_accum > 1)",
                    "a quantized frozen base (quantization.base='nf4', QLoRA)"]
    qlora = stage_config("dpo", **{"lora.rank": 8, "quantization.base": "nf4"})
    assert plan.suggestions(qlora, remat, {"data": 1, "fsdp": 8, "tensor": 1}, 8) == tips[:1]


def report(**changes) -> dict:
    out = {"stage": "dpo", "topology": "v5e:2x4", "chip": "TPU v5 lite", "chips": 8,
           "mesh": {"data": 1, "fsdp": 8, "tensor": 1}, "model_params": 8.03e9, "trained_params": 2.1e7,
           "state": {"params": 55e6, "frozen": 4e9, "opt_state": 1.1e8, "batch": 1e4},
           "memory": {"argument": 4.2e9, "output": 4.2e9, "alias": 4.2e9, "temp": 8.8e9, "generated_code": 3.8e7,
                      "total": 1.31e10},
           "hbm_bytes": 16 * GIB, "usable_bytes": int(15.75 * GIB), "peak_flops_per_chip": 197e12, "mfu": 0.4,
           "tokens_per_step": 4096, "flops_per_step": 2.48e14, "step_time_s": 0.394, "xla_flops_per_chip": 3e12,
           "compile_s": 47.9, "fits": True, "attention": "splash"}
    out.update(changes)
    return out


def test_format_report():
    text = plan.format_report(report())
    assert "dpo train step on v5e:2x4 = 8 × TPU v5 lite, mesh data=1 fsdp=8 tensor=1" in text
    assert "model 8.03B params, 21M trained (0.262% of the model); 4,096 tokens per step; splash attention" in text
    assert "12.20 GiB of 15.75 GiB usable HBM (16.00 GiB datasheet): 77%, fits" in text
    assert "0.394 s at 40% MFU of 197 TFLOP/s" in text
    oom = plan.format_report(report(memory=None, fits=False, compile_error="RESOURCE_EXHAUSTED: …",
                                    xla_flops_per_chip=None))
    assert "the compile ran out of HBM: RESOURCE_EXHAUSTED" in oom and "XLA cost" not in oom


def test_rl_step_time_counts_the_sampled_share_and_dynamic_sampling_rounds(monkeypatch):
    """The expected step time counts one rollout on the share of steps that sample (distillation's lmbda), the
    longest one every rollout dynamic sampling may run; the update is the step's FLOPs less the expected rollout's."""
    rollout = {"rollout_flops": 4e14, "rollout_s": 2.0, "phase_total": GIB, "roles": {"policy (trained)": GIB},
               "kv_cache": GIB, "sampler_memory": {"total": GIB, "argument": GIB, "temp": GIB}, "resident": 0,
               "prefill_s": 0.5, "decode_s": 1.0, "scoring_s": 0.5, "hbm_bandwidth": 8.19e11, "rounds": 3}
    monkeypatch.setattr(plan.plan_rollout, "rollout_report", lambda *a, **k: dict(rollout))
    spec = RolloutSpec(policy=None, sampling=None, rows=8, prompt_len=16, policy_params=None, scoring_forwards=1,
                       rounds=3, share=0.25)
    result = report(stage="grpo")
    plan._plan_rollout(result, spec, None, types.SimpleNamespace(flops_per_step=1e15), None, None, None, 0.0)
    update = (1e15 - 0.25 * 4e14) / (8 * 197e12 * 0.4)
    assert result["update_s"] == pytest.approx(update)
    assert result["step_time_s"] == pytest.approx(0.25 * 2.0 + update)
    assert result["step_time_max_s"] == pytest.approx(3 * 2.0 + update)
    assert f"up to 3 rollouts per step: a step takes up to {3 * 2.0 + update:.3g} s" in plan.format_report(result)


def test_require_fit():
    plan.require_fit(report())
    with pytest.raises(errors.ConfigError, match="does not fit"):
        plan.require_fit(report(fits=False, message="the dpo train step does not fit on v5e:2x4: …"))


def test_auto_dtype_is_bfloat16_and_the_config_is_not_changed():
    config = stage_config("dpo")
    config.lock()
    assert plan._tpu_config(config).model.dtype == "bfloat16"
    assert config.model.dtype == "auto"
    assert plan._tpu_config(stage_config("dpo", **{"model.dtype": "float32"})).model.dtype == "float32"


def test_auto_attention_is_splash_on_tpu():
    """The plan compiles for a TPU from this CPU process, whose own backend would pick blockwise for "auto"."""
    assert plan._tpu_config(stage_config("sft")).model.attention == "splash"
    assert plan._tpu_config(stage_config("sft", **{"model.attention": "xla"})).model.attention == "xla"


def test_the_report_names_the_attention_the_step_traced():
    """What `attention.recording` collected while the step was traced, said against the configured setting; an
    old config's name is compared as it resolves. Recorders nest: each sees the calls made while it is open."""
    from flaxalign.models import attention

    assert plan._attention_label("splash", {"splash"}) == "splash"
    assert plan._attention_label("dot_product", {"xla"}) == "xla"
    assert plan._attention_label("splash", {"blockwise", "splash"}) == "blockwise + splash (configured splash)"
    assert plan._attention_label("splash", set()) == "splash (configured; not traced)"
    q = jax.ShapeDtypeStruct((1, 8, 2, 4), np.float32)

    def trace(impl):
        jax.eval_shape(lambda q: attention.attend(q, q, q, attention.Masking(), impl=impl), q)

    with attention.recording() as outer:
        with attention.recording() as unused:  # equal to `outer` (both empty) when it closes
            pass
        trace("blockwise")
        with attention.recording() as inner:
            trace("xla")
    assert unused == set() and inner == {"xla"} and outer == {"xla", "blockwise"}
    trace("xla")  # after both closed, nothing records
    assert outer == {"xla", "blockwise"}


@pytest.mark.parametrize("stage, lora", [("clm", 0), ("sft", 8), ("reward", 0), ("dpo", 8), ("dpo", 0),
                                         ("ppo", 0), ("ppo", 8), ("grpo", 8), ("online_dpo", 8)])
def test_abstract_tasks_need_no_data(stage, lora):
    """Every stage's task and global batch are built from the config alone (no data, tokenizer, checkpoint or
    weights), with the batch layout its step takes; arguments get the loop's shardings."""
    config = plan._tpu_config(stage_config(stage, **{"lora.rank": lora}))
    mesh = sharding.make_mesh(-1, 1, 1)
    task, model_config, batch, rollout = plan.abstract_task(config, mesh)
    b = config.data.batch_size
    if stage in ("clm", "sft"):
        assert batch["inputs"].shape == (b, config.data.seq_len)
    elif stage in ("reward", "dpo"):
        assert batch["inputs"].shape == (b, 2, config.data.seq_len)
    else:
        rows = b * {"grpo": config.get("grpo", {}).get("group_size"), "online_dpo": 2}.get(stage, 1)
        width = config.data.max_prompt_len + config.rollout.max_new_tokens
        assert batch["tokens"].shape == (rows, width) and batch["response_mask"].shape[0] == rows
        assert "scores" in batch if stage == "ppo" else "rewards" in batch
        assert (rollout.rows, rollout.prompt_len) == (rows, config.data.max_prompt_len)
        assert rollout.sampling.max_new_tokens == config.rollout.max_new_tokens
    assert (rollout is None) == (stage not in ("ppo", "grpo", "online_dpo"))
    assert model_config.dtype == "bfloat16" and task.flops_per_step > 0 and task.tokens_per_step > 0
    state, batch, _ = plan.abstract_arguments(task, batch, mesh, config.seed)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
               for x in jax.tree.leaves((state, batch)))
    trained = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    assert (trained < model_config.num_params()) == bool(lora)


def test_unknown_stage():
    config = stage_config("dpo")
    config.stage = "eval"
    with pytest.raises(errors.ConfigError, match="knows the stages"):
        plan.abstract_task(config, sharding.make_mesh(-1, 1, 1))


def test_without_libtpu(monkeypatch):
    monkeypatch.setattr(plan, "libtpu_installed", lambda: False)
    with pytest.raises(errors.ConfigError, match="needs the libtpu package"):
        plan.plan(stage_config("dpo"), "v5e:2x4")


def test_cli_needs_a_topology():
    rc, _, err = cli.run(["--config=configs/dpo.py:tiny"], command="plan", timeout=120)
    assert rc == 2 and err.strip() == ("flaxalign: error: --topology is required, e.g. --topology=v5e:2x4 (or "
                                       "v6e:4x4, v4:2x2x1, v5p:4x4x4).")
    rc, _, err = cli.run(["--config=configs/dpo.py:tiny", "--topology=v5e:2x2x2"], command="plan", timeout=120)
    assert rc == 2 and "a v5e slice has 2 positive dimensions" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------- tpu (needs libtpu)


@tpu
def test_tiny_dpo_lora_fits_v5e():
    pytest.importorskip("libtpu")
    result = plan.plan(stage_config("dpo", **{"lora.rank": 8}), "v5e:2x4")
    print(plan.format_report(result))
    memory = result["memory"]
    assert result["fits"] and result["chips"] == 8 and result["chip"] == "TPU v5 lite"
    assert result["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert 0 < memory["total"] < 64 * 2 ** 20 and memory["argument"] > 0 and memory["temp"] > 0
    assert memory["alias"] > 0  # the state is donated, as in the loop
    assert result["state"]["frozen"] > result["state"]["params"] > 0  # LoRA: the base is frozen
    assert result["xla_flops_per_chip"] > 0 and result["step_time_s"] > 0


@tpu
@pytest.mark.parametrize("stage", ["clm", "sft", "reward"])  # PPO and GRPO: test_rl_plan_reports_every_role_…
def test_every_stage_compiles_for_v4(stage):
    pytest.importorskip("libtpu")
    result = plan.plan(stage_config(stage), "v4:2x2x1")
    assert result["fits"] and result["memory"]["total"] > 0 and result["stage"] == stage


@tpu
@pytest.mark.parametrize("stage, overrides, roles", [
    ("grpo", {"lora.rank": 8, "grpo.beta": 0.04}, ["policy (trained)", "frozen base (policy, reference)"]),
    ("ppo", {}, ["policy (trained)", "value model (trained)", "reference (frozen copy)", "reward model"])])
def test_rl_plan_reports_every_role_and_the_rollout(stage, overrides, roles, monkeypatch):
    """The RL plan also compiles the sampler (prefill + decode at the rollout's rows and lengths): memory per role,
    the KV cache (2 · L · rows · K · (prompt + response) · H in bfloat16, rows split over the 8 chips), the
    rollout phase (the sampler program + the state it does not read) and step time = rollout + update. The sampler
    is planned with the stacked layers a TPU decodes with, not this CPU host's choice."""
    pytest.importorskip("libtpu")
    from flaxalign import sampler
    layouts, generate = [], sampler.generate
    monkeypatch.setattr(sampler, "generate", lambda *a, **k: layouts.append(k["unstacked_layers"]) or generate(*a, **k))
    config = stage_config(stage, **overrides)
    result = plan.plan(config, "v5e:2x4")
    assert layouts and all(layout is False for layout in layouts)  # None would be this host's (CPU) default
    text = plan.format_report(result)
    print(text)
    rollout, c = result["rollout"], models.ModelConfig.from_dict(config.model.to_dict())
    assert result["fits"] and list(rollout["roles"]) == roles + ["optimizer state"]
    rows = config.data.batch_size * (config.grpo.group_size if stage == "grpo" else 1)
    width = config.data.max_prompt_len + config.rollout.max_new_tokens
    assert rollout["kv_cache"] == 2 * c.n_layers * rows * c.n_kv_heads * width * c.head_dim * 2 // 8
    assert rollout["sampler_memory"]["temp"] >= rollout["kv_cache"] > 0
    assert rollout["phase_total"] == rollout["sampler_memory"]["total"] + rollout["resident"]
    assert rollout["resident"] >= rollout["roles"]["optimizer state"]
    assert result["step_time_s"] == pytest.approx(rollout["rollout_s"] + result["update_s"]) and result["update_s"] > 0
    for line in ("per role, per chip", "rollout phase", "rollout time", "fits"):
        assert line in text


@tpu
def test_a_rollout_that_does_not_fit_is_refused_with_what_to_change():
    """PPO on one v5e chip whose update fits (micro-batches of 256 rows) but whose sampler decodes all 131,072 rows
    at once: the sampler's compile runs out of HBM, and the plan says so in one sentence with the rollout's knobs.
    (65,536 rows needed 23.4 GiB before decoding attended to the filled cache only, and 14.4 GiB — a fit — after.)"""
    pytest.importorskip("libtpu")
    config = stage_config("ppo", **{"data.batch_size": 131072, "ppo.num_minibatches": 32, "grad_accum": 16,
                                    "rollout.max_new_tokens": 200, "data.max_prompt_len": 56})
    result = plan.plan(config, "v5e:1x1")
    assert result["memory"]["total"] < result["usable_bytes"]  # the train step alone fits
    assert not result["fits"] and "compile_error" in result["rollout"]
    assert "the sampler's compile ran out of HBM" in plan.format_report(result)
    with pytest.raises(errors.ConfigError) as refused:
        plan.require_fit(result)
    message = str(refused.value)
    assert message.startswith("the ppo rollout does not fit on v5e:1x1: each TPU v5 lite chip needs at least ")
    assert "\n" not in message
    for tip in ("data.batch_size", "rollout.max_new_tokens", "mesh.fsdp=-1", "lora.rank=16"):
        assert tip in message


@tpu
def test_llama3_8b_dpo_lora_fits_v5p_4x4x4():
    """The acceptance plan: LoRA DPO of Llama-3-8B, FSDP over a v5p-128 slice (64 chips), 64 pairs of 1024 tokens.
    The full 32-layer model (the layer scan compiles its body once: ~2 min and < 2 GiB of host RAM here)."""
    pytest.importorskip("libtpu")
    config = llama3_8b_dpo(**{"lora.rank": 8, "data.seq_len": 1024, "data.batch_size": 64, "mesh.data": 1,
                              "mesh.fsdp": -1})
    result = plan.plan(config, "v5p:4x4x4")
    print(plan.format_report(result))
    assert result["fits"] and result["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
    assert result["model_params"] == pytest.approx(8.03e9, rel=1e-3)
    assert 1 * GIB < result["memory"]["total"] < result["usable_bytes"]
    # the frozen base in the compute dtype (model.frozen_dtype=auto: bfloat16 on a TPU), split over 64 chips
    assert result["state"]["frozen"] == pytest.approx(result["model_params"] * 2 / 64, rel=0.02)


@tpu
def test_llama3_8b_lora_dpo_preset_takes_at_most_70_percent_of_v5e_hbm():
    """Issue 15's acceptance plan: configs/dpo.py:llama3_8b (LoRA r=16, 64 pairs of 1024 tokens as 4 micro-batches,
    FSDP over 8 chips): ≤ 70 % of HBM; and issue 23's: the frozen base stored in bfloat16 (model.frozen_dtype=auto
    on a TPU) is ≤ 1.9 GiB per chip, half of float32's 3.74 GiB."""
    pytest.importorskip("libtpu")
    result = plan.plan(stage_config("dpo", preset="llama3_8b"), "v5e:2x4")
    print(plan.format_report(result))
    assert result["fits"] and result["memory"]["total"] <= 0.70 * result["usable_bytes"]
    assert result["state"]["frozen"] <= 1.9 * GIB
    stored_f32 = plan.plan(stage_config("dpo", preset="llama3_8b", **{"model.frozen_dtype": "float32"}), "v5e:2x4")
    print(plan.format_report(stored_f32))
    assert stored_f32["state"]["frozen"] == pytest.approx(2 * result["state"]["frozen"], rel=0.01)


@tpu
def test_llama3_8b_qlora_sft_fits_one_v5e_chip():
    """configs/sft.py:llama3_8b_qlora: NF4 base (double-quantized scales) + LoRA r=16, 8 sequences of 2048 tokens as
    8 micro-batches, on one 16 GiB chip: the frozen base is 7.3 GiB (4.1 bits per layer weight; the embedding and LM
    head stay float32), 12.1 GiB in all."""
    pytest.importorskip("libtpu")
    result = plan.plan(stage_config("sft", preset="llama3_8b_qlora"), "v5e:1x1")
    print(plan.format_report(result))
    assert result["fits"] and result["chips"] == 1 and result["model_params"] == pytest.approx(8.03e9, rel=1e-3)
    assert result["state"]["frozen"] < 7.5 * GIB and result["step_time_s"] > 0


def _long_context_plan(config, topology: str) -> dict:
    """The plan with splash attention, printed beside the same step's memory with dense (xla) attention."""
    result = plan.plan(config, topology)
    print(plan.format_report(result))
    config.model.attention = "xla"
    dense = plan.plan(config, topology)
    print(plan.format_report(dense))
    assert result["attention"] == "splash" and dense["attention"] == "xla"
    if dense["memory"] is not None:  # dense attention at this length: the [T, T] scores in HBM, when it fits at all
        assert dense["memory"]["temp"] > result["memory"]["temp"]
    return result


@tpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_splash_attention_compiles_to_the_pallas_kernel_for_v5e(head_dim):
    """The training gradient of splash attention (packed segments, GQA) compiled for a v5e chip: the Mosaic kernel
    runs forward, dkv and dq (three custom calls), with no blockwise loop left."""
    pytest.importorskip("libtpu")
    import jax.numpy as jnp

    from flaxalign.models import attention, splash
    device = plan.topology_devices(plan.parse_topology("v5e:1x1"))[0]
    q = jax.ShapeDtypeStruct((2, 256, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 256, 2, head_dim), jnp.bfloat16)
    segments = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def loss(q, k, v, segments):
        masking = attention.Masking(q_segments=segments, k_segments=segments)
        return jnp.sum(splash.attend(q, k, v, masking).astype(jnp.float32) ** 2)

    placed = jax.sharding.SingleDeviceSharding(device)
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(placed,) * 4).lower(
        q, kv, kv, segments).compile().as_text()
    assert text.count("tpu_custom_call") == 3 and " while(" not in text


@tpu
def test_llama3_8b_lora_sft_at_8192_tokens_fits_v5e_with_splash_attention():
    """Issue 16's acceptance plan: configs/sft.py:llama3_8b_long, LoRA r=16 on sequences of 8192 tokens, FSDP over
    v5e:2x4."""
    pytest.importorskip("libtpu")
    result = _long_context_plan(stage_config("sft", preset="llama3_8b_long"), "v5e:2x4")
    assert result["fits"] and result["chips"] == 8


@tpu
def test_llama3_8b_lora_dpo_at_4096_tokens_fits_v5e_with_splash_attention():
    pytest.importorskip("libtpu")
    result = _long_context_plan(stage_config("dpo", preset="llama3_8b_long"), "v5e:2x4")
    assert result["fits"] and result["chips"] == 8


@tpu
def test_too_big_config_exits_2_with_the_suggestions():
    """Full fine-tuning DPO of Llama-3-8B with a frozen reference copy, replicated on 8 v5e chips: ~120 GiB of
    state per chip before any activation."""
    pytest.importorskip("libtpu")
    rc, out, err = cli.run(["--config=configs/dpo.py:tiny", *LLAMA3_8B_FLAGS, "--config.reference=copy",
                            "--config.data.seq_len=1024", "--config.data.batch_size=64", "--topology=v5e:2x4"],
                           command="plan", timeout=600)
    assert rc == 2, err[-2000:]
    assert "frozen 29.92 GiB" in out and "the compile ran out of HBM" in out
    message = err.strip()
    assert message.count("\n") == 0 and message.startswith(
        "flaxalign: error: the dpo train step does not fit on v5e:2x4: each TPU v5 lite chip needs at least ")
    assert "but has 15.75 GiB of usable HBM" in message
    for tip in ("model.remat='full'", "mesh.fsdp=-1", "data.batch_size", "grad_accum", "lora.rank=16"):
        assert tip in message


@tpu
def test_cpu_commands_do_not_probe_for_tpus_when_libtpu_is_installed(tmp_path):
    """With the `[tpu]` extra installed on a machine without TPU chips and no JAX_PLATFORMS set, a training run
    selects the CPU before JAX starts: libtpu's probing errors (TPU_WORKER_HOSTNAMES, host bounds) never print."""
    pytest.importorskip("libtpu")
    rc, out, err = cli.run(["--config=configs/clm.py:tiny", f"--workdir={tmp_path}", "--config.steps=1",
                            "--config.eval_every=0", "--config.checkpoint_every=0"], cpu_devices=1,
                           JAX_PLATFORMS="")
    assert rc == 0, err[-2000:]
    assert "finished at step 1" in out + err
    for noise in ("TPU_WORKER_HOSTNAMES", "libtpu", "Failed to find host bounds"):
        assert noise not in err, noise
