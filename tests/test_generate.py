"""Sampling with a KV cache: equal to recomputing the prefix, padding-invariant, greedy limits, log-probs of the
sampled tokens, one compile per shape."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from flaxalign import errors, models
from flaxalign import sampler as sampler_module
from flaxalign.data.batching import left_pad_prompts
from flaxalign.sampler import (
    KVCacheSampler,
    Sampling,
    decode_segments,
    draw_token,
    filter_logits,
    first_max_index,
    generate,
    generate_recompute,
)
from tests import helpers

CONFIG = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2, vocab_size=64)
GRAPHDEF = models.abstract_model(CONFIG)[0]
PARAMS = helpers.random_params(CONFIG, seed=1)
PROMPTS = [[1, 5, 9, 13], [1, 7], [1, 20, 21, 22, 23, 24, 25], [1, 3, 3]]
EOS, PAD = 2, 0


def _run(fn, prompts=PROMPTS, seed=0, **kwargs):
    batch = left_pad_prompts(prompts, pad_id=PAD)
    kwargs = {"max_new_tokens": 12, "eos_id": EOS, "pad_id": PAD, **kwargs}
    out = jax.jit(lambda params, batch, rng: fn(models.merge(GRAPHDEF, params), batch, rng, **kwargs))(
        PARAMS, batch, jax.random.PRNGKey(seed))
    return jax.device_get(out)


@pytest.mark.parametrize("unstacked", [False, True])  # the accelerators' stacked layers; the CPU's slices
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 0.7, "top_k": 5},
                                      {"temperature": 1.0, "top_p": 0.8}])
def test_kv_cache_equals_recomputing_the_prefix(sampling, unstacked):
    cached = _run(functools.partial(generate, unstacked_layers=unstacked), **sampling)
    recomputed = _run(generate_recompute, **sampling)
    np.testing.assert_array_equal(cached["tokens"], recomputed["tokens"])
    np.testing.assert_array_equal(cached["response_mask"], recomputed["response_mask"])
    np.testing.assert_allclose(cached["logps"], recomputed["logps"], atol=2e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_shared_prefill_per_group_samples_as_the_recompute_reference_does(temperature, monkeypatch):
    """GRPO's rows: each prompt 3 times in a row. Prefill runs on one row per run of 3, and the repeated cache must
    give every row its own prompt's continuation — the prompts differ in length, so a cache repeated in the wrong
    order (tiled) would show."""
    grouped = [p for p in PROMPTS for _ in range(3)]
    model = models.merge(GRAPHDEF, PARAMS)
    decode, rows = type(model).decode, []
    monkeypatch.setattr(type(model), "decode", lambda self, tokens, *a, **k: rows.append(tokens.shape[0]) or decode(
        self, tokens, *a, **k))
    jax.eval_shape(lambda batch: generate(model, batch, jax.random.PRNGKey(0), max_new_tokens=4, eos_id=EOS,
                                          pad_id=PAD, group_size=3), left_pad_prompts(grouped, pad_id=PAD))
    assert rows[0] == len(PROMPTS) and set(rows[1:]) == {len(grouped)}  # the prefill, then the decoding steps
    monkeypatch.undo()
    shared = _run(functools.partial(generate, group_size=3), prompts=grouped, temperature=temperature)
    recomputed = _run(generate_recompute, prompts=grouped, temperature=temperature)
    np.testing.assert_array_equal(shared["tokens"], recomputed["tokens"])
    np.testing.assert_array_equal(shared["response_mask"], recomputed["response_mask"])
    np.testing.assert_allclose(shared["logps"], recomputed["logps"], atol=2e-5)
    if temperature:  # the three samples of a prompt are drawn apart
        assert len({tuple(row) for row in shared["response"][:3]}) > 1
    with pytest.raises(ValueError, match="runs of group_size=5"):
        _run(functools.partial(generate, group_size=5), prompts=grouped)


def test_first_max_index_is_argmax():
    x = np.array(jax.random.normal(jax.random.PRNGKey(0), (64, 50)))
    x[1, [3, 7]] = 9.0  # a tie: the first index wins, as with argmax
    x[2, :10] = -np.inf
    np.testing.assert_array_equal(first_max_index(jnp.asarray(x)), np.argmax(x, axis=-1))
    assert int(first_max_index(jnp.asarray([[0.0, np.nan, 1.0]]))[0]) == 0


@pytest.mark.parametrize("vocab", [1, 3, 50, 512, 1000])  # blocks of 1, 2, 8, 32, 32 tokens; 1000 leaves a part block
def test_the_draw_is_the_softmax_distribution(vocab):
    """100,000 draws from each of two rows of logits (filtered tokens among them), the rows interleaved so that a
    search mixing up rows would show: a χ² test against softmax's probabilities (fixed seeds: deterministic), no
    filtered token ever drawn, and log p(token) = log_softmax."""
    x = 2 * np.array(jax.random.normal(jax.random.PRNGKey(vocab), (2, vocab)))
    if vocab >= 50:
        x[0, [0, 5, 17, vocab - 1]] = -np.inf
        x[1, 8:16] = -np.inf  # a whole block of 8 (V = 50) or the start of one
    probs = np.asarray(jax.nn.softmax(jnp.asarray(x), axis=-1), np.float64)
    draws = 100_000
    token, logp = jax.jit(lambda x, key: draw_token(jnp.tile(x, (draws, 1)), key))(jnp.asarray(x, jnp.float32),
                                                                                   jax.random.PRNGKey(7))
    token, logp = np.asarray(token).reshape(draws, 2), np.asarray(logp).reshape(draws, 2)
    for row in range(2):
        counts = np.bincount(token[:, row], minlength=vocab)
        assert counts[probs[row] == 0].sum() == 0
        expected = draws * probs[row]
        tested = expected > 5
        if tested.sum() > 1:
            chi2 = np.sum((counts[tested] - expected[tested]) ** 2 / expected[tested])
            assert scipy_stats.chi2.sf(chi2, tested.sum() - 1) > 1e-3
        np.testing.assert_allclose(logp[:, row], np.log(probs[row][token[:, row]]), atol=2e-6)


@pytest.mark.parametrize("u, expected", [(0.0, [3, 16, 0]), (1.0, [4, 49, 0])])
def test_the_draw_stops_at_tokens_of_positive_mass(monkeypatch, u, expected):
    """u at either end of [0, 1] (1 stands for float rounding at the top of a level): the searches land on the first
    or last token of positive mass — past −inf runs at a row's start, inside a block and at its end — never on a
    filtered token or the last block's padding; a row without finite logits gives token 0."""
    inf = np.inf
    x = jnp.asarray([[-inf, -inf, -inf, 0.0, 1.0] + [-inf] * 45,  # 50 tokens: 7 blocks of 8, the last one padded
                     [-inf] * 16 + [3.0] * 32 + [-inf, 0.5],
                     [np.nan] * 50])
    monkeypatch.setattr(jax.random, "uniform", lambda key, shape, dtype: jnp.full(shape, u, dtype))
    token, _ = draw_token(x, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(token, expected)


def test_a_bfloat16_cache_is_carried_in_bfloat16_and_samples_close_to_the_float32_one():
    batch = left_pad_prompts(PROMPTS, pad_id=PAD)
    engine = KVCacheSampler(functools.partial(models.merge, GRAPHDEF), eos_id=EOS, pad_id=PAD)  # as the stages do
    sampling = Sampling(12, 1.0, cache_dtype="bfloat16")
    traced = jax.make_jaxpr(lambda params: engine.traced(params, batch, jax.random.PRNGKey(0), sampling))(PARAMS)
    carried = {str(v.aval.dtype) for eqn in traced.jaxpr.eqns if eqn.primitive.name == "while"
               for v in eqn.outvars if v.aval.ndim == 5}
    assert carried == {"bfloat16"}
    half = _run(generate, temperature=0.0, cache_dtype=jnp.bfloat16)
    full = _run(generate, temperature=0.0)
    gap = np.abs(half["logps"] - full["logps"])[full["response_mask"] > 0]
    assert 0 < gap.max() < 0.05  # keys and values rounded to 8 bits of mantissa: close, not equal
    with pytest.raises(errors.ConfigError, match="cache_dtype='int8' is not one of"):
        Sampling(cache_dtype="int8")
    assert Sampling(cache_dtype="bfloat16").greedy().cache_dtype == "bfloat16"


def test_decode_segments():
    assert decode_segments(12) == [12] and decode_segments(63) == [63]
    assert decode_segments(64) == [32, 64] and decode_segments(128) == [32, 64, 96, 128]
    assert decode_segments(513) == [129, 258, 387, 513]
    # four segments of 128 after a 256-token prompt read 384, 512, 640 and 768 of the 768 slots
    assert sampler_module.decode_cache_share(256, 512) == pytest.approx(0.75)
    assert sampler_module.decode_cache_share(16, 12) == 1.0


@pytest.mark.parametrize("new_tokens", [12, 13])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_segmented_decoding_reads_the_filled_prefix_and_equals_recomputing(monkeypatch, new_tokens, temperature):
    """Four segments of 3–4 tokens (the minimum lowered from 32): each step's attention reads the cache slots up
    to its segment's end — seen in the traced program's cache reads — and the tokens are still those of
    recomputing the prefix, across the segment boundaries and the rows that end early."""
    monkeypatch.setattr(sampler_module, "DECODE_SEGMENT_MIN", 3)
    batch = left_pad_prompts(PROMPTS, pad_id=PAD)
    prompt_len = batch["input_ids"].shape[1]
    spans = {prompt_len + end for end in decode_segments(new_tokens)}
    assert len(spans) == 4
    traced = jax.make_jaxpr(lambda params: generate(models.merge(GRAPHDEF, params), batch, jax.random.PRNGKey(0),
                                                    max_new_tokens=new_tokens, eos_id=EOS, pad_id=PAD))(PARAMS)
    reads = set()

    def walk(jaxpr):
        reads.update(eqn.params["slice_sizes"][3] for eqn in jaxpr.eqns
                     if eqn.primitive.name == "dynamic_slice" and len(eqn.params["slice_sizes"]) == 5)
        for sub in jax.extend.core.subjaxprs(jaxpr):
            walk(sub)

    walk(traced.jaxpr)
    assert reads == spans | {prompt_len}  # the prefill reads the prompt's slots
    cached = _run(generate, temperature=temperature, seed=3, max_new_tokens=new_tokens)
    recomputed = _run(generate_recompute, temperature=temperature, seed=3, max_new_tokens=new_tokens)
    np.testing.assert_array_equal(cached["tokens"], recomputed["tokens"])
    np.testing.assert_allclose(cached["logps"], recomputed["logps"], atol=2e-5)


def _stacked_weight_shapes(config):
    model = models.merge(models.abstract_model(config)[0], helpers.random_params(config))
    return {tuple(w.shape) for w in jax.tree.leaves(model.decoding_layers()[1])}


@pytest.mark.parametrize("unstacked", [False, True])
def test_unstacked_layers_are_sliced_once_outside_the_decoding_loops(unstacked):
    """What `unstacked_layers` is for: no decoding step reads the layer stack (XLA CPU would copy a layer's weights
    out of it at every step); the stacked program's steps scan it."""
    stacked_shapes = _stacked_weight_shapes(CONFIG)
    batch = left_pad_prompts(PROMPTS, pad_id=PAD)
    traced = jax.make_jaxpr(lambda params: generate(models.merge(GRAPHDEF, params), batch, jax.random.PRNGKey(0),
                                                    max_new_tokens=4, eos_id=EOS, pad_id=PAD,
                                                    unstacked_layers=unstacked))(PARAMS)
    loops = [eqn for eqn in traced.jaxpr.eqns if eqn.primitive.name == "while"]
    assert loops
    stack_reads, scans = 0, 0

    def walk(jaxpr):
        nonlocal stack_reads, scans
        for eqn in jaxpr.eqns:
            scans += eqn.primitive.name == "scan"
            stack_reads += any(tuple(getattr(v.aval, "shape", ())) in stacked_shapes for v in eqn.invars)
        for sub in jax.extend.core.subjaxprs(jaxpr):
            walk(sub)

    for loop in loops:
        walk(loop.params["body_jaxpr"].jaxpr)
    assert (stack_reads == 0 and scans == 0) if unstacked else (stack_reads > 0 and scans == len(loops))


def test_by_default_only_a_wide_model_on_a_cpu_decodes_from_unstacked_layers(monkeypatch):
    chosen, decoding_layers = [], models.CausalLM.decoding_layers
    monkeypatch.setattr(models.CausalLM, "decoding_layers",
                        lambda self, unstacked=False: chosen.append(unstacked) or decoding_layers(self, unstacked))
    batch = left_pad_prompts(PROMPTS, pad_id=PAD)
    for min_width in (CONFIG.d_model + 1, CONFIG.d_model):
        monkeypatch.setattr(sampler_module, "WIDE_DECODING_MIN_WIDTH", min_width)
        jax.eval_shape(lambda params: generate(models.merge(GRAPHDEF, params), batch, jax.random.PRNGKey(0),
                                               max_new_tokens=2, eos_id=EOS, pad_id=PAD), PARAMS)
    assert chosen == [False, True]


def test_some_rows_stop_at_eos_and_are_padded_after_it():
    out = _run(generate, temperature=1.0, seed=3, max_new_tokens=40)
    assert out["ended"].any(), "pick a seed where a row emits EOS"
    for row, mask, ended in zip(out["response"], out["response_mask"], out["ended"]):
        n = int(mask.sum())
        if ended:
            assert row[n - 1] == EOS and EOS not in row[: n - 1] and (row[n:] == PAD).all()
        else:
            assert n == 40 and EOS not in row


class _CountingDecodes:
    """A model whose decode calls (the prefill, then one per generated token) are counted as they run."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def _count(self):
        self.calls += 1

    def output_head(self):
        return self.model.output_head()

    def init_cache(self, *args):
        return self.model.init_cache(*args)

    @property
    def config(self):
        return self.model.config

    def decoding_layers(self, *args):
        return self.model.decoding_layers(*args)

    def decode(self, *args, **kwargs):
        jax.debug.callback(self._count, ordered=True)
        return self.model.decode(*args, **kwargs)


@pytest.mark.parametrize("segment_min", [32, 3])  # one decoding segment; four, which must not start once all ended
def test_decoding_stops_once_every_row_has_ended(monkeypatch, segment_min):
    """Both rows' greedy first token is made the EOS: the loop ends after one token, with the outputs of 12."""
    monkeypatch.setattr(sampler_module, "DECODE_SEGMENT_MIN", segment_min)
    assert len(decode_segments(12)) == (1 if segment_min == 32 else 4)
    prompts = [PROMPTS[0]] * 2
    first = int(_run(generate, prompts=prompts, temperature=0.0)["response"][0, 0])
    counted = {}

    def run(params, batch):
        counted["model"] = _CountingDecodes(models.merge(GRAPHDEF, params))
        return generate(counted["model"], batch, jax.random.PRNGKey(0), max_new_tokens=12, eos_id=first, pad_id=PAD,
                        temperature=0.0)

    out = jax.device_get(jax.jit(run)(PARAMS, left_pad_prompts(prompts, pad_id=PAD)))
    jax.effects_barrier()
    assert counted["model"].calls == 2  # the prefill and the first token's step, not 12
    np.testing.assert_array_equal(out["response"][:, 0], [first, first])
    assert (out["response"][:, 1:] == PAD).all() and out["ended"].all()
    np.testing.assert_array_equal(out["response_mask"], np.eye(1, 12, dtype=int).repeat(2, axis=0))
    recomputed = _run(generate_recompute, prompts=prompts, temperature=0.0, eos_id=first)
    np.testing.assert_array_equal(out["tokens"], recomputed["tokens"])


def test_left_padding_does_not_change_the_real_tokens():
    alone = [_run(generate, prompts=[p], temperature=0.0)["response"][0] for p in PROMPTS]
    batched = _run(generate, temperature=0.0)["response"]
    for single, row in zip(alone, batched):
        np.testing.assert_array_equal(single, row)
    model = models.merge(GRAPHDEF, PARAMS)
    padded = left_pad_prompts(PROMPTS, pad_id=PAD, length=10)
    hidden, _ = model.decode(padded["input_ids"], padded["positions"], model.init_cache(4, 10), 0,
                             padded["attention_mask"])
    for i, prompt in enumerate(PROMPTS):
        reference = model(jnp.asarray([prompt]))[0]
        np.testing.assert_allclose(np.asarray(hidden[i, -len(prompt):]), np.asarray(reference), atol=1e-5)


def test_greedy_limits():
    greedy = _run(generate, temperature=0.0)["tokens"]
    np.testing.assert_array_equal(_run(generate, temperature=1e-6)["tokens"], greedy)
    np.testing.assert_array_equal(_run(generate, temperature=1.0, top_k=1)["tokens"], greedy)


def test_logps_are_those_of_the_sampled_tokens_under_the_tempered_model():
    out = _run(generate, temperature=0.7, seed=5)
    tokens, mask = out["tokens"], out["mask"]
    logits = np.asarray(models.merge(GRAPHDEF, PARAMS).logits(
        tokens[:, :-1], np.maximum(np.cumsum(mask, 1) - 1, 0)[:, :-1], mask[:, :-1]), np.float64) / 0.7
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0][:, -12:]
    np.testing.assert_allclose(out["logps"], picked * out["response_mask"], atol=2e-5)


def test_logps_are_those_of_the_filtered_distribution_under_top_k():
    """With top-k the token is drawn from the renormalised top k: its log-prob is taken there (≥ the unfiltered one;
    exactly 0 for k = 1), so the sampler/learner importance weight sees the filtering."""
    out = _run(generate, temperature=0.7, top_k=5, seed=5)
    tokens, mask = out["tokens"], out["mask"]
    logits = np.asarray(models.merge(GRAPHDEF, PARAMS).logits(
        tokens[:, :-1], np.maximum(np.cumsum(mask, 1) - 1, 0)[:, :-1], mask[:, :-1]), np.float64) / 0.7
    top = np.sort(logits, axis=-1)[..., -5:]
    log_z = top.max(-1) + np.log(np.exp(top - top.max(-1, keepdims=True)).sum(-1))
    picked = (np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0] - log_z)[:, -12:]
    np.testing.assert_allclose(out["logps"], picked * out["response_mask"], atol=2e-5)
    unfiltered = _run(generate, temperature=0.7, seed=5)["logps"]
    assert np.max(np.abs(out["logps"] - unfiltered)) > 0.1
    np.testing.assert_array_equal(_run(generate, temperature=0.7, top_k=1, seed=5)["logps"], 0.0)


def test_compiles_once_per_shape():
    traces = []

    def traced(params, batch, rng):
        traces.append(1)
        return generate(models.merge(GRAPHDEF, params), batch, rng, max_new_tokens=6, eos_id=EOS, pad_id=PAD)

    fn = jax.jit(traced)
    for seed, prompts in enumerate([PROMPTS, [[1, 4, 4, 4], [1, 9], [1, 8, 8, 8, 8, 8, 8], [1, 2]]]):
        fn(PARAMS, left_pad_prompts(prompts, pad_id=PAD), jax.random.PRNGKey(seed))
    assert len(traces) == 1


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    def kept(x):
        return np.isfinite(np.asarray(x))[0].tolist()

    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.6)) == [True, True, False, False, False]  # 0.5 < 0.6 ≤ 0.7
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False, False]
    assert kept(filter_logits(logits, top_p=0.01)) == [True, False, False, False, False]  # never empty


@pytest.mark.slow
def test_generate_cli_talks_to_a_checkpoint(sft_demo_run):
    from tests import cli_helpers as cli

    prompts = ["What does `len(obj)` do?", "What is 7 * 8?"]
    args = [f"--checkpoint={sft_demo_run}", "--temperature=0", "--max_new_tokens=16"] + [
        f"--prompt={p}" for p in prompts]
    rc, out, err = cli.run(args, cpu_devices=1, command="generate")
    assert rc == 0, err[-2000:]
    blocks = [b for b in out.split(">>> ") if b.strip()]
    assert [b.splitlines()[0] for b in blocks] == prompts
    assert all(b.splitlines()[1].strip() for b in blocks)  # a non-empty response each
    assert cli.run(args, cpu_devices=1, command="generate")[1] == out  # greedy: the same text again
    rc, _, err = cli.run(["--checkpoint=/no/such/run", "--prompt=hi"], cpu_devices=1, command="generate")
    assert rc == 2
    assert err.strip().splitlines()[-1] == "flaxalign: error: checkpoint path '/no/such/run' does not exist."
    rc, _, err = cli.run([f"--checkpoint={sft_demo_run}", "--prompt=hi", "--chat_template=vicuna"], cpu_devices=1,
                         command="generate")
    assert rc == 2 and "--chat_template='vicuna' is not one of" in err.strip().splitlines()[-1]


def test_wide_models_decode_with_eigen_products_on_a_cpu(monkeypatch):
    """`decoding_compiler_options`: Eigen's products (no YNNPACK fusion) for models at least
    `WIDE_DECODING_MIN_WIDTH` wide on a CPU, XLA's defaults otherwise; the engine compiles with them."""
    wide = helpers.tiny_model_config(d_model=sampler_module.WIDE_DECODING_MIN_WIDTH)
    assert sampler_module.wide_on_cpu(wide) and not sampler_module.wide_on_cpu(CONFIG)
    with monkeypatch.context() as patched:
        patched.setattr(sampler_module, "_jaxlib_release", lambda: (0, 10))
        assert sampler_module.decoding_compiler_options(wide) == sampler_module.EIGEN_PRODUCTS
        assert sampler_module.decoding_compiler_options(CONFIG) is None  # 64 wide
        patched.setattr(jax, "default_backend", lambda: "tpu")
        assert sampler_module.decoding_compiler_options(wide) is None
    with monkeypatch.context() as patched:
        patched.setattr(sampler_module, "_jaxlib_release", lambda: (0, 9))  # a jaxlib that would refuse the option
        assert sampler_module.decoding_compiler_options(wide) is None

    batch = left_pad_prompts(PROMPTS, pad_id=PAD)

    def compiled_text():
        engine = KVCacheSampler(functools.partial(models.merge, GRAPHDEF), eos_id=EOS, pad_id=PAD,
                                unstacked_layers=False)  # only the option differs between the two programs
        engine.sample(PARAMS, batch, jax.random.PRNGKey(0), Sampling(3, 1.0))
        (program,) = engine._programs.values()
        return program.lower(PARAMS, batch, jax.random.PRNGKey(0)).compile().as_text()

    default = compiled_text()  # the 64-wide CONFIG: jaxlib's defaults
    if sampler_module._jaxlib_release() not in sampler_module.YNN_OPTION_JAXLIB or "ynn_fusion" not in default:
        pytest.skip("this jaxlib does not fuse CPU products into YNNPACK by default")
    monkeypatch.setattr(sampler_module, "WIDE_DECODING_MIN_WIDTH", CONFIG.d_model)
    assert "ynn_fusion" not in compiled_text()


def test_only_a_model_up_to_the_size_cap_decodes_from_a_second_copy(monkeypatch):
    wide = helpers.tiny_model_config(d_model=sampler_module.WIDE_DECODING_MIN_WIDTH)
    assert sampler_module.unstacked_by_default(wide)
    layer_bytes = 4 * wide.num_params(include_embedding=False)
    monkeypatch.setattr(sampler_module, "UNSTACKED_DECODING_MAX_BYTES", layer_bytes - 1)
    assert sampler_module.wide_on_cpu(wide) and not sampler_module.unstacked_by_default(wide)
