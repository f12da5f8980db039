"""PEFT adapter directories against Hugging Face PEFT on tiny random float32 Llamas (GQA): an adapter saved by PEFT
loads with `load_peft_adapter` and gives PEFT's logits through `lora.apply_lora`, and an adapter written by
`save_peft_adapter` loads with `PeftModel.from_pretrained` and gives ours (right-padded rows included)."""

import jax
import numpy as np
import pytest

from flaxalign import interop, models
from flaxalign.interop import peft as peft_dirs
from flaxalign.peft import lora
from tests import helpers

pytestmark = pytest.mark.parity

TOLERANCE = 1e-4  # float32 on both sides, as tests/models/test_hf_files_parity.py
BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=128, initializer_range=0.15, rms_norm_eps=1e-5,
            tie_word_embeddings=False)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# case: (PEFT LoraConfig kwargs, the flaxalign LoraConfig that means the same)
CASES = {
    "lora": (dict(target_modules="all-linear"), lora.LoraConfig(rank=4, alpha=16.0)),
    "rslora": (dict(target_modules="all-linear", use_rslora=True), lora.LoraConfig(rank=4, alpha=16.0,
                                                                                    variant="rslora")),
    "dora": (dict(target_modules="all-linear", use_dora=True), lora.LoraConfig(rank=4, alpha=16.0, variant="dora")),
    "rslora_patterns_lm_head": (
        dict(target_modules=ALL + ["lm_head"], use_rslora=True, rank_pattern={"v_proj": 2, "lm_head": 6},
             alpha_pattern={"o_proj": 5.0, "lm_head": 3.0}),
        lora.LoraConfig(rank=4, alpha=16.0, variant="rslora", targets=("q", "k", "v", "o", "gate", "up", "down",
                                                                       "lm_head"),
                        rank_pattern={"v": 2, "lm_head": 6}, alpha_pattern={"o": 5.0, "lm_head": 3.0})),
}


@pytest.fixture(scope="module")
def libs():
    return pytest.importorskip("torch"), pytest.importorskip("transformers"), pytest.importorskip("peft")


def _batch(vocab_size):
    return helpers.right_padded_batch(vocab_size)


def _compare(torch, peft_model, config, params, lora_config, lora_params):
    """max |Δ| over the real tokens of PEFT's logits and ours."""
    tokens, mask = _batch(config.vocab_size)
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits.numpy()
    ours = np.asarray(interop.apply_lm(config, lora.apply_lora(params, lora_params, lora_config), tokens, mask))
    real = mask.astype(bool)
    assert np.abs(theirs[real]).max() > 0.5  # not two near-zero tensors
    base = np.asarray(interop.apply_lm(config, params, tokens, mask))
    assert np.abs(ours[real] - base[real]).max() > 1000 * TOLERANCE  # the adapter changes the logits a lot
    return float(np.max(np.abs(ours[real] - theirs[real])))


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_with_equal_logits(libs, case, tmp_path):
    torch, transformers, peft = libs
    peft_kwargs, expected_config = CASES[case]
    torch.manual_seed(sum(map(ord, case)))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE, attn_implementation="eager")).float().eval()
    model.save_pretrained(str(tmp_path / "base"))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,
                                                            init_lora_weights=False, **peft_kwargs)).eval()
    with torch.no_grad():  # every adapter value random and non-zero, magnitudes off ‖W‖
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.2 * torch.randn_like(param))
            elif "lora_" in name:
                param.copy_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    loaded = interop.load_pretrained(str(tmp_path / "base"), dtype="float32")
    lora_config, lora_params = peft_dirs.load_peft_adapter(str(tmp_path / "adapter"), loaded.config)
    assert lora_config == expected_config
    _, _, logical = models.abstract_model(loaded.config)
    fresh, _ = lora.init_lora(loaded.params, logical, lora_config, jax.random.key(0))
    assert jax.tree.structure(lora_params) == jax.tree.structure(fresh)
    assert all(x.shape == y.shape for x, y in zip(jax.tree.leaves(lora_params), jax.tree.leaves(fresh)))
    diff = _compare(torch, peft_model, loaded.config, loaded.params, lora_config, lora_params)
    print(f"PEFT → flaxalign {case}: max |Δ logits| = {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("case", sorted(CASES))
def test_flaxalign_adapter_loads_in_peft_with_equal_logits(libs, case, tmp_path):
    torch, transformers, peft = libs
    from tests import helpers

    _, lora_config = CASES[case]
    config = interop.model_config_from_hf({**BASE, "model_type": "llama"})
    params = helpers.random_params(config)
    interop.save_hf(config, params, str(tmp_path / "base"))
    _, _, logical = models.abstract_model(config)
    lora_params, _ = lora.init_lora(params, logical, lora_config, jax.random.key(0))
    rng = np.random.default_rng(1)

    def randomise(path, x):  # B ≠ 0 and magnitudes off ‖W‖
        if jax.tree_util.keystr(path).endswith("['magnitude']"):
            return (np.asarray(x) * (1.0 + 0.2 * rng.normal(size=x.shape))).astype(np.float32)
        return (0.1 * rng.normal(size=x.shape)).astype(np.float32)

    lora_params = jax.tree_util.tree_map_with_path(randomise, lora_params)
    peft_dirs.save_peft_adapter(str(tmp_path / "adapter"), config, lora_config, lora_params)

    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager",
                                                             dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    v_proj = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    assert v_proj.r["default"] == lora.rank_for("layers/attn/v", lora_config)
    diff = _compare(torch, peft_model, config, params, lora_config, lora_params)
    print(f"flaxalign → PEFT {case}: max |Δ logits| = {diff:.2e}")
    assert diff <= TOLERANCE
