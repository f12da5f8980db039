"""flaxalign's LoRA / rsLoRA / DoRA against Hugging Face PEFT on the same tiny Llama weights and the same adapter
values: the merged matrices of `merge_and_unload()` equal `lora.merge`, and the unmerged PEFT forward equals
the forward through `apply_lora`."""

import dataclasses

import jax
import numpy as np
import pytest

from flaxalign import models
from flaxalign.interop import hf
from flaxalign.peft import lora
from tests import helpers

pytestmark = pytest.mark.parity

peft = torch = transformers = None  # imported by the fixture below, not at collection (no skip when deselected)


@pytest.fixture(scope="module", autouse=True)
def _import_reference_libraries():
    global peft, torch, transformers
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")


CONFIG = dataclasses.replace(helpers.tiny_model_config(), tie_embeddings=False)  # an lm_head to adapt as well
MERGE_TOLERANCE = 1e-5  # float32 on both sides; weights are O(0.1)
LOGITS_TOLERANCE = 1e-4  # as tests/models/test_hf_parity.py

# our param name -> HF module name; `{i}` for the per-layer ones
MODULES = {"q": "model.layers.{i}.self_attn.q_proj", "k": "model.layers.{i}.self_attn.k_proj",
           "v": "model.layers.{i}.self_attn.v_proj", "o": "model.layers.{i}.self_attn.o_proj",
           "gate": "model.layers.{i}.mlp.gate_proj", "up": "model.layers.{i}.mlp.up_proj",
           "down": "model.layers.{i}.mlp.down_proj", "lm_head": "lm_head"}
# per-path rank and alpha, both sides, so that the patterns are checked too
RANK_PATTERN, ALPHA_PATTERN = {"v": 2}, {"o": 5.0}


def _hf_model(params):
    c = CONFIG
    hf_config = transformers.LlamaConfig(
        hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, vocab_size=c.vocab_size,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.rms_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_config).float().eval()
    state = {k: torch.from_numpy(v) for k, v in hf.params_to_hf_state_dict(CONFIG, params).items()}
    model.load_state_dict(state, strict=True)
    return model


def _random_adapter(params, variant):
    """Our adapter for every linear weight and the LM head, every leaf random (B ≠ 0, m ≠ ‖W‖)."""
    config = lora.LoraConfig(rank=4, alpha=16.0, variant=variant, targets=list(MODULES), rank_pattern=RANK_PATTERN,
                             alpha_pattern=ALPHA_PATTERN)
    _, _, logical = models.abstract_model(CONFIG)
    lora_params, _ = lora.init_lora(params, logical, config, jax.random.key(0))
    rng = np.random.default_rng(1)

    def randomise(path, x):
        if jax.tree_util.keystr(path).endswith("['magnitude']"):
            return np.asarray(x) * (1.0 + 0.2 * rng.normal(size=x.shape)).astype(np.float32)
        return (0.1 * rng.normal(size=x.shape)).astype(np.float32)

    return config, jax.tree_util.tree_map_with_path(randomise, lora_params)


def _peft_model(params, lora_params, variant):
    """PEFT on the same base weights with lora_A/lora_B/magnitude set to our values, mapped to HF layouts:
    lora_A.weight [r, I] = a.reshape(I, r)ᵀ and lora_B.weight [O, r] = b.reshape(r, O)ᵀ, with I and O flattened as
    HF flattens them (q_proj's O = heads·head_dim head-major, o_proj's I likewise)."""
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=16.0, use_rslora=variant == "rslora", use_dora=variant == "dora",
        target_modules=[MODULES[name].rsplit(".", 1)[-1] for name in MODULES], lora_dropout=0.0,
        rank_pattern={f"{k}_proj": r for k, r in RANK_PATTERN.items()},
        alpha_pattern={f"{k}_proj": a for k, a in ALPHA_PATTERN.items()})
    model = peft.get_peft_model(_hf_model(params), peft_config).eval()
    modules = dict(model.base_model.model.named_modules())
    flat = {path: adapter for path, adapter in _adapters(lora_params)}
    with torch.no_grad():
        for path, adapter in flat.items():
            name = path.split("/")[-1]
            for i in range(CONFIG.n_layers) if path.startswith("layers/") else [None]:
                module = modules[MODULES[name].format(i=i)]
                layer = {k: np.asarray(x) if i is None else np.asarray(x)[i] for k, x in adapter.items()}
                a, b = layer["a"], layer["b"]
                rank = a.shape[-1]
                module.lora_A["default"].weight.copy_(torch.from_numpy(a.reshape(-1, rank).T.copy()))
                module.lora_B["default"].weight.copy_(torch.from_numpy(b.reshape(rank, -1).T.copy()))
                if variant == "dora":
                    module.lora_magnitude_vector["default"].weight.copy_(
                        torch.from_numpy(layer["magnitude"].reshape(-1).copy()))
    return model


def _adapters(lora_params, prefix=""):
    for key, node in lora_params.items():
        path = f"{prefix}/{key}" if prefix else key
        if "a" in node and not isinstance(node["a"], dict):
            yield path, node
        else:
            yield from _adapters(node, path)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_merge_and_forward_match_peft(variant):
    params = helpers.random_params(CONFIG)
    config, lora_params = _random_adapter(params, variant)
    model = _peft_model(params, lora_params, variant)
    # PEFT's own ranks and scales are the ones we assume
    v_proj, o_proj = model.base_model.model.model.layers[0].self_attn.v_proj, \
        model.base_model.model.model.layers[0].self_attn.o_proj
    s = (lambda alpha, r: alpha / r ** 0.5) if variant == "rslora" else (lambda alpha, r: alpha / r)
    assert v_proj.r["default"] == 2 and v_proj.scaling["default"] == pytest.approx(s(16.0, 2))
    assert o_proj.scaling["default"] == pytest.approx(s(5.0, 4))

    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 16))
    with torch.no_grad():
        peft_logits = model(torch.from_numpy(tokens)).logits.numpy()
    graphdef, _, _ = models.abstract_model(CONFIG)
    ours_logits = np.asarray(models.merge(graphdef, lora.apply_lora(params, lora_params, config)).logits(tokens))
    logits_diff = float(np.max(np.abs(ours_logits - peft_logits)))

    merged_state = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    theirs = hf.params_from_hf_state_dict(CONFIG, merged_state)
    ours = lora.merge(params, lora_params, config)
    ours_flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.flatten_with_path(ours)[0]}
    theirs_flat = {jax.tree_util.keystr(p): x for p, x in jax.tree.flatten_with_path(theirs)[0]}
    base_flat = {jax.tree_util.keystr(p): x for p, x in jax.tree.flatten_with_path(params)[0]}
    assert ours_flat.keys() == theirs_flat.keys()
    diffs = {k: float(np.max(np.abs(ours_flat[k] - theirs_flat[k]))) for k in ours_flat}
    changed = [k for k in ours_flat if not np.array_equal(ours_flat[k], base_flat[k])]
    print(f"{variant}: max |merged ours − PEFT| = {max(diffs.values()):.2e}, logits {logits_diff:.2e}")
    assert len(changed) == 7 + 1  # the seven per-layer linears and the LM head
    assert max(diffs.values()) <= MERGE_TOLERANCE, diffs
    assert logits_diff <= LOGITS_TOLERANCE
