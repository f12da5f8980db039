"""The sampler seam: the one way the RL stages, DPO's sampled KL, reward normalisation, evaluation and
`flaxalign generate` get responses from a model.

    rollout = sampler.sample(weights, prompts, rng, sampling, group_size=1)

- `weights`: the pytree the engine reads the model from. `KVCacheSampler(build)` calls `build(weights)` inside its
  traced program to make the module: a trainable model's LoRA runs in activation space, a quantized base is
  dequantized per layer, nothing is merged (a wide model on a CPU decodes from a copy of its layer weights sliced
  once per call: `generate`'s `unstacked_layers`).
- `prompts`: int32 `input_ids`, `attention_mask`, `positions` `[B, L]`, left-padded (`left_pad_prompts`).
- `rng`: a PRNG key; `sampling`: `Sampling` (static: each setting compiles its own program; temperature 0 = greedy).
- `group_size`: the rows come in runs of that many identical prompts (GRPO/RLOO's G samples per prompt, online
  DPO's 2; B divides by it). An engine may compute each run's prompt once (the KV-cache engine prefills B / G rows
  and repeats the cache); each row is still drawn on its own, from the same distribution.
- The rollout, a dict (`rollout_shapes` states it as code): `tokens` and `mask` `[B, L + N]` (prompt, response, pad
  after the end; mask 1 on real tokens), `response` `[B, N]`, `response_mask` `[B, N]` (1 up to and including the
  first EOS, "EOS + 1"), `logps` `[B, N]` float32 (the engine's log-probability of each drawn token under
  the distribution it was drawn from, softmax(logits / T) after top-k/top-p filtering, 0 where masked) and `ended`
  `[B]` (the row emitted EOS). Arrays are sharded by rows, as the prompts are.

What learns from a rollout never uses the engine's `logps` for its ratio: the RL stages recompute the old policy's
log-probs with their own jitted function (`onpolicy.response_logps`); GRPO logs the gap between the two and may
weight the loss by their ratio (`grpo.sampler_correction`). An engine with another numeric path — a bf16
cache, paged attention, an external server — therefore changes which tokens are drawn, never the consistency of the
loss. Another engine implements `sample` with this contract, `group_size` keyword included (it may ignore it),
with numpy or jax arrays, and is given to the RL stages' rollout objects (`engine=` of `ppo.Rollouts`,
`group_rollout.GroupRollouts`, `group_rollout.GroupEval`; the config has no selector yet).

`generate` is the KV-cache engine's algorithm: one prefill pass over the prompts, then one token per step inside
`jax.lax.while_loop`s (which stop once every row has ended), with fixed shapes so it compiles once for a (batch,
prompt length, max_new_tokens) shape. Long generations decode in up to four segments whose steps attend to the
cache's filled prefix rounded up to the segment's end (`decode_segments`), not to every slot. `generate_recompute`
runs the whole prefix again for every new token (no cache): the slow, obviously-correct reference the tests and
`bench/generate.py` compare against.
"""

import dataclasses
import functools
import importlib.metadata
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from flaxalign import errors, sharding


def filter_logits(logits_BxV, *, top_k: int = 0, top_p: float = 1.0):
    """Sets the logits outside the top-k and outside the top-p nucleus (the smallest set of most likely tokens whose
    probability reaches p; the most likely token is always kept) to −inf. top_k = 0 and top_p = 1 disable them."""
    if top_k:
        kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
        kept = mass_before < top_p
        threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < threshold, -jnp.inf, logits_BxV)
    return logits_BxV


def first_max_index(x_BxV):
    """`jnp.argmax(x, axis=-1)` — the first index of each row's maximum (a row with a NaN gives 0) — as a max, a
    compare and a min (greedy decoding's pick). XLA CPU runs argmax's (value, index) reduce 2–4× slower than these
    three passes."""
    v = x_BxV.shape[-1]
    hit = x_BxV == jnp.max(x_BxV, axis=-1, keepdims=True)
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1) % v


def draw_token(scaled_BxV, key):
    """(token, log p(token)): one draw per row from p = softmax(scaled), by inverting the CDF with two uniform numbers
    per row (`torch.multinomial`'s method) instead of jax.random.categorical's V Gumbel numbers. The V threefry draws
    per row cost more than the rest of a small model's decoding step on a CPU (BUILD_NOTES, stop 37, has the
    numbers).

    The search is two-level, so that no cumulative sum runs over the whole vocabulary: the first number picks a block
    of ≈ √V tokens by the blocks' cumulative mass, the second a token by the cumulative mass inside that block —
    P(block) · P(token | block) = p(token). A float32 uniform then resolves each level to 2⁻²⁴ of its mass, not the
    whole vocabulary's. A token of probability 0 (filtered, −inf) is never drawn: each search stops at the first
    cumulative sum above u, which belongs to a token of positive mass, and where rounding puts u at the top of a
    level, at the last token of positive mass. A row without any (NaN, all −inf) gives token 0."""
    scaled_BxV = scaled_BxV.astype(jnp.float32)
    rows, vocab = scaled_BxV.shape
    width = 1 << ((vocab - 1).bit_length() + 1) // 2  # ≈ √V, a power of two
    blocks = -(-vocab // width)
    top = jnp.max(scaled_BxV, axis=-1, keepdims=True)
    weight = jnp.exp(scaled_BxV - top)  # unnormalised p, 0 where filtered
    blocked = jnp.pad(weight, ((0, 0), (0, blocks * width - vocab))).reshape(rows, blocks, width)
    u = jax.random.uniform(key, (2, rows), jnp.float32)
    mass = jnp.sum(blocked, axis=2)
    block = _search(mass, u[0])
    inner = jnp.take_along_axis(blocked, block[:, None, None], axis=1)[:, 0]
    token = (block * width + _search(inner, u[1])).astype(jnp.int32)
    total = jnp.sum(mass, axis=1)
    logp = jnp.take_along_axis(scaled_BxV - top, token[:, None], axis=-1)[:, 0] - jnp.log(total)
    return token, logp


def _search(weight_BxN, u_B):
    """The index whose cumulative-weight interval holds u × the row's total weight (u in [0, 1)), kept at or before
    the row's last positive weight (and at 0 in a row without one)."""
    upto = jnp.cumsum(weight_BxN, axis=1)
    index = jnp.sum(upto <= (u_B * upto[:, -1])[:, None], axis=1)
    last = jnp.max(jnp.where(weight_BxN > 0, jnp.arange(weight_BxN.shape[1]), 0), axis=1)
    return jnp.minimum(index, last)


def _pick(logits_BxV, key, temperature, top_k, top_p):
    """(token, log p(token)) with p the distribution the token is drawn from: softmax(logits / temperature) after
    top-k/top-p filtering (temperature 0: greedy, log-probs of the unscaled logits), so that importance weights
    against the learner's unfiltered log-probs see the filtering."""
    if temperature > 0:
        return draw_token(filter_logits(logits_BxV / temperature, top_k=top_k, top_p=top_p), key)
    token = first_max_index(logits_BxV)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), token[:, None], axis=-1)[:, 0]
    return token, logp


def generate(model, prompts: dict, rng, *, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cache_dtype=None,
             group_size: int = 1, unstacked_layers: bool | None = None) -> dict:
    """Samples up to `max_new_tokens` tokens after each prompt with a KV cache.

    `model`: a `CausalLM` built inside the traced function (`models.merge(graphdef, params)`, or a trainable model's
    `model(trainable, frozen)`: LoRA runs in activation space, a quantized base dequantizes per layer).
    `prompts`: `input_ids`, `attention_mask`, `positions`, int32 `[B, L]`, left-padded (`left_pad_prompts`).
    Returns `tokens` `[B, L + N]` (prompt, response, pad after the end), `mask` `[B, L + N]` (1 on real tokens),
    `response` `[B, N]`, `response_mask` `[B, N]` (EOS + 1 convention), `logps` `[B, N]` (log-probability of
    each sampled token under softmax(logits / temperature), 0 where masked) and `ended` `[B]` (the row emitted EOS).
    `cache_dtype`: the KV cache's dtype (None: the compute dtype). `bfloat16` under float32 compute halves the
    cache's memory, and the tokens then differ from the recompute reference's; on a CPU it decodes slower, since
    XLA CPU converts bfloat16 in software.
    `group_size`: the caller's promise that rows come in runs of that many identical prompts. Prefill then runs on
    the first row of each run, and its cache slots and next-token logits are repeated to the run's rows: with GRPO's
    16 samples per prompt, prefill costs 1/16 of the rows. The distribution is the same; XLA may round a matmul
    over fewer rows differently (log-probs moved by ≈ 3e-6 on `tiny`), so a draw at a near-tie can differ.
    `unstacked_layers`: slice the layer weights out of their stack once, before the decoding loop, at the cost of a
    second copy of them (`CausalLM.decoding_layers`; None: `unstacked_by_default`, a wide model on a CPU, where XLA
    would copy each layer out of the stack at every step).
    Sampling settings are static: each combination compiles its own program.
    """
    batch, prompt_len = prompts["input_ids"].shape
    if group_size < 1 or batch % group_size:
        raise ValueError(f"{batch} prompt rows do not come in runs of group_size={group_size}")
    total = prompt_len + max_new_tokens
    head = model.output_head()
    key_mask = jnp.pad(prompts["attention_mask"], ((0, 0), (0, max_new_tokens)))
    firsts = {k: prompts[k][::group_size] for k in ("input_ids", "positions")}
    cache = model.init_cache(batch // group_size, total, cache_dtype)
    if unstacked_layers is None:
        unstacked_layers = unstacked_by_default(model.config)
    layers = model.decoding_layers(unstacked_layers)
    hidden, cache = model.decode(firsts["input_ids"], firsts["positions"], cache, 0, key_mask[::group_size],
                                 span=prompt_len, layers=layers)
    logits = head.logits(hidden[:, -1])
    if group_size > 1:  # the cache is [L, B, K, S, H]
        cache = {k: jnp.repeat(v, group_size, axis=1) for k, v in cache.items()}
        logits = jnp.repeat(logits, group_size, axis=0)
    next_position = prompts["positions"][:, -1] + 1

    def step(carry, span):
        i, logits, cache, key_mask, done, rng, response, logps = carry
        rng, key = jax.random.split(rng)
        token, logp = _pick(logits, key, temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token).astype(jnp.int32)
        response = response.at[:, i].set(token)
        logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
        slot = prompt_len + i
        key_mask = key_mask.at[:, slot].set(1)
        hidden, cache = model.decode(token[:, None], (next_position + i)[:, None], cache, slot, key_mask, span=span,
                                     layers=layers)
        logits = head.logits(hidden[:, -1])
        return i + 1, logits, cache, key_mask, done | (token == eos_id), rng, response, logps

    def unfinished(carry, end):  # stop early once every row has ended: what is left would be pad
        return (carry[0] < end) & ~jnp.all(carry[4])

    carry = (jnp.zeros((), jnp.int32), logits, cache, key_mask, jnp.zeros((batch,), bool), rng,
             jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.float32))
    for end in decode_segments(max_new_tokens):  # step i writes slot prompt_len + i and reads the slots up to it
        carry = jax.lax.while_loop(functools.partial(unfinished, end=end),
                                   functools.partial(step, span=prompt_len + end), carry)
    *_, done, _, response, logps = carry
    return _outputs(prompts, response, logps, done, eos_id)


DECODE_SEGMENT_MIN = 32  # new tokens per decoding segment at least
DECODE_SEGMENTS_MAX = 4


def decode_segments(max_new_tokens: int) -> list[int]:
    """The ends (in new tokens) of `generate`'s decoding segments. A step of segment j attends to the cache slots
    up to the segment's last step only — a static length, so the step reads the filled prefix rounded up to the
    segment instead of the whole cache (on average ≈ (J + 1) / 2J of the generated part for J equal segments), at
    the price of one compiled decoding step per segment: at most `DECODE_SEGMENTS_MAX`, each of at least
    `DECODE_SEGMENT_MIN` tokens (short generations run as one segment, as before)."""
    count = max(1, min(DECODE_SEGMENTS_MAX, max_new_tokens // DECODE_SEGMENT_MIN))
    size = -(-max_new_tokens // count)
    return [min(max_new_tokens, size * (j + 1)) for j in range(count)]


def decode_cache_share(prompt_len: int, max_new_tokens: int) -> float:
    """The mean fraction of the cache's prompt_len + max_new_tokens slots that a decoding step of `generate` reads
    (`decode_segments`): what `flaxalign plan` charges each token for the cache."""
    ends = decode_segments(max_new_tokens)
    read = sum((end - start) * (prompt_len + end) for start, end in zip([0] + ends, ends))
    return read / (max_new_tokens * (prompt_len + max_new_tokens))


def _outputs(prompts, response, logps, ended, eos_id):
    after_eos = jnp.cumsum(response == eos_id, axis=1) - (response == eos_id)  # EOSes strictly before each token
    response_mask = (after_eos == 0).astype(jnp.int32)
    return {"tokens": jnp.concatenate([prompts["input_ids"], response], axis=1),
            "mask": jnp.concatenate([prompts["attention_mask"], response_mask], axis=1),
            "response": response, "response_mask": response_mask, "logps": logps * response_mask,
            "ended": ended}


def generate_recompute(model, prompts: dict, rng, *, max_new_tokens: int, eos_id: int, pad_id: int,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> dict:
    """`generate` without a cache: the full `[B, L + N]` buffer runs through the model for every new token. Same
    outputs (token for token under the same rng), O(N) times the work."""
    batch, prompt_len = prompts["input_ids"].shape
    tokens = jnp.pad(prompts["input_ids"], ((0, 0), (0, max_new_tokens)), constant_values=pad_id)
    mask = jnp.pad(prompts["attention_mask"], ((0, 0), (0, max_new_tokens)))
    head = model.output_head()

    def step(i, carry):
        tokens, mask, done, rng, logps = carry
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        hidden = model(tokens, positions, mask)
        last = prompt_len + i - 1
        logits = head.logits(hidden[:, last])
        rng, key = jax.random.split(rng)
        token, logp = _pick(logits, key, temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token).astype(tokens.dtype)
        tokens = tokens.at[:, last + 1].set(token)
        mask = mask.at[:, last + 1].set(1)  # pad after EOS is masked below, not attended before
        logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
        return tokens, mask, done | (token == eos_id), rng, logps

    init = (tokens, mask, jnp.zeros((batch,), bool), rng, jnp.zeros((batch, max_new_tokens), jnp.float32))
    tokens, _, done, _, logps = jax.lax.fori_loop(0, max_new_tokens, step, init)
    return _outputs(prompts, tokens[:, prompt_len:], logps, done, eos_id)


CACHE_DTYPES = ("auto", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How responses are drawn: up to `max_new_tokens` tokens at `temperature` (0: greedy), after top-k / top-p
    filtering (0 / 1: off), with the KV cache in `cache_dtype` (auto: the model's compute dtype)."""
    max_new_tokens: int = 24
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    cache_dtype: str = "auto"

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise errors.ConfigError(f"sampling needs max_new_tokens >= 1, temperature >= 0, top_k >= 0 and "
                                     f"0 < top_p <= 1, got {self}.")
        if self.cache_dtype not in CACHE_DTYPES:
            raise errors.ConfigError(f"cache_dtype={self.cache_dtype!r} is not one of {list(CACHE_DTYPES)}.")

    @property
    def cache_jnp_dtype(self):
        """The cache dtype for `generate` (None: the compute dtype)."""
        return None if self.cache_dtype == "auto" else jnp.dtype(self.cache_dtype)

    def greedy(self) -> "Sampling":
        return Sampling(**{**dataclasses.asdict(self), "temperature": 0.0})  # the base class: RL's refuses T = 0


def prompt_bucket(length: int, cap: int) -> int:
    """The padded prompt length for a batch whose longest prompt has `length` tokens: the next power of two (at
    least 16), at most `cap`, so the sampler compiles for a few shapes only."""
    return min(cap, max(16, 1 << (max(length, 1) - 1).bit_length()))


def trim_left_padding(prompts: dict) -> dict:
    """Left-padded `prompts` (and any `[B]` arrays beside them, kept) cut on the left to `prompt_bucket` of their
    longest row. The columns dropped are padding in every row, so the responses and the learner's scores stay the
    same (up to float rounding) while prefill, cache and attention shrink with the prompts; a few widths, a few
    compiles."""
    width = prompts["input_ids"].shape[1]
    longest = int(jax.device_get(jnp.max(jnp.sum(prompts["attention_mask"], axis=1))))
    keep = prompt_bucket(longest, width)
    if keep == width:
        return prompts
    return {k: v[:, width - keep:] if v.ndim == 2 else v for k, v in prompts.items()}


class Sampler(Protocol):
    def sample(self, weights, prompts: dict, rng, sampling: Sampling, group_size: int = 1) -> dict: ...


def rollout_shapes(batch: int, prompt_len: int, sampling: Sampling) -> dict:
    """The rollout contract's arrays as `jax.ShapeDtypeStruct`s (for `flaxalign plan` and engines' tests)."""
    total, new = prompt_len + sampling.max_new_tokens, sampling.max_new_tokens
    struct = jax.ShapeDtypeStruct
    return {"tokens": struct((batch, total), jnp.int32), "mask": struct((batch, total), jnp.int32),
            "response": struct((batch, new), jnp.int32), "response_mask": struct((batch, new), jnp.int32),
            "logps": struct((batch, new), jnp.float32), "ended": struct((batch,), jnp.bool_)}


# A wide model decodes on a CPU from unstacked layers with Eigen's products: jaxlib 0.10 gives CPU matrix products to
# YNNPACK fusions, which decode `small` (d_model 512, 8 rows) 1.4× slower than Eigen's products and `tiny` (d_model
# 64, 64 rows) 1.3× faster, and a scanned layer's weights are copied out of the stack at every step, which costs
# a bandwidth-bound model most (BUILD_NOTES, "Decoding a wide model on a CPU"). The option applies to the sampler's
# own programs only; narrower models decode as before, bit for bit.
WIDE_DECODING_MIN_WIDTH = 512
UNSTACKED_DECODING_MAX_BYTES = 1 << 30  # a bigger model on a CPU decodes stacked: no second GiB-sized copy
EIGEN_PRODUCTS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no YNNPACK fusion
YNN_OPTION_JAXLIB = ((0, 10), (0, 11))  # (major, minor) releases known to define the option


def _jaxlib_release() -> tuple[int, int] | None:
    try:
        major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def wide_on_cpu(config) -> bool:
    """Whether a model with `config` decodes here as a wide model on a CPU (`WIDE_DECODING_MIN_WIDTH`)."""
    return jax.default_backend() == "cpu" and config.d_model >= WIDE_DECODING_MIN_WIDTH


def unstacked_by_default(config) -> bool:
    """`generate`'s default `unstacked_layers`: a wide model on a CPU whose float32 weights take at most
    `UNSTACKED_DECODING_MAX_BYTES` (a second copy of a multi-GB checkpoint could exhaust the host)."""
    return wide_on_cpu(config) and 4 * config.num_params(include_embedding=False) <= UNSTACKED_DECODING_MAX_BYTES


def decoding_compiler_options(config) -> dict | None:
    """XLA options for the sampler's program of a model with `config`: Eigen's products for a wide model on a CPU
    (None: XLA's defaults; also for a jaxlib not known to define the option, which XLA would refuse)."""
    if not wide_on_cpu(config) or _jaxlib_release() not in YNN_OPTION_JAXLIB:
        return None
    return dict(EIGEN_PRODUCTS)


class KVCacheSampler:
    """The default engine: `generate` (KV cache, in-place cache updates, one compile per prompt shape and sampling
    setting), jitted under the caller's mesh with `decoding_compiler_options` of the model `build` makes."""

    def __init__(self, build: Callable, *, eos_id: int, pad_id: int, unstacked_layers: bool | None = None):
        self.build, self.eos_id, self.pad_id, self.unstacked_layers = build, eos_id, pad_id, unstacked_layers
        self._programs = {}  # one jitted program per (sampling setting, group size)

    def sample(self, weights, prompts: dict, rng, sampling: Sampling, group_size: int = 1) -> dict:
        if (sampling, group_size) not in self._programs:
            self._programs[sampling, group_size] = jax.jit(
                functools.partial(self.traced, sampling=sampling, group_size=group_size),
                compiler_options=decoding_compiler_options(self._model_config(weights)))
        return self._programs[sampling, group_size](weights, prompts, rng)

    def _model_config(self, weights):
        """The config of the model `build(weights)` makes (read while tracing `build` abstractly)."""
        seen = []
        jax.eval_shape(lambda w: seen.append(self.build(w).config), weights)
        return seen[0]

    def traced(self, weights, prompts: dict, rng, sampling: Sampling, group_size: int = 1) -> dict:
        """`sample` inside a caller's own traced program (the caller's jit sets the compiler options:
        `decoding_compiler_options` applies to `sample`'s own programs only)."""
        out = generate(self.build(weights), prompts, rng, max_new_tokens=sampling.max_new_tokens,
                       eos_id=self.eos_id, pad_id=self.pad_id, temperature=sampling.temperature,
                       top_k=sampling.top_k, top_p=sampling.top_p, cache_dtype=sampling.cache_jnp_dtype,
                       group_size=group_size, unstacked_layers=self.unstacked_layers)
        return sharding.constrain_rows(out, strict=False)  # rows that do not divide the mesh stay replicated
