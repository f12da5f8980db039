"""Batched sampling from a causal LM: responses of a policy to left-padded prompts.

`generate` keeps a KV cache: one prefill pass over the prompts, then one token per step inside `jax.lax.fori_loop`,
with fixed shapes so it compiles once for a (batch, prompt length, max_new_tokens) shape. `generate_recompute` runs
the whole prefix again for every new token (no cache): the slow, obviously-correct reference the tests and
`bench/generate.py` compare against.

Response convention (used by every RL stage): `response_mask` is 1 on the sampled tokens up to and including the
first EOS ("EOS + 1") and 0 after it, where the tokens are `pad_id`.
"""

import dataclasses

import jax
import jax.numpy as jnp

from flaxalign import errors


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


def _pick(logits_BxV, key, temperature, top_k, top_p):
    """(token, log p(token)) with p = softmax(logits / temperature) (temperature 0: greedy, log-probs of the
    unscaled logits). Log-probs are of the distribution before top-k/top-p filtering."""
    if temperature > 0:
        scaled = logits_BxV / temperature
        token = jax.random.categorical(key, filter_logits(scaled, top_k=top_k, top_p=top_p), axis=-1)
    else:
        scaled = logits_BxV
        token = jnp.argmax(logits_BxV, axis=-1)
    logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    return token, logp


def generate(model, prompts: dict, rng, *, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> dict:
    """Samples up to `max_new_tokens` tokens after each prompt with a KV cache.

    `model`: a `CausalLM` built inside the traced function (`models.merge(graphdef, params)`, or a trainable model's
    `model(trainable, frozen)`: LoRA runs in activation space, a quantized base dequantizes per layer).
    `prompts`: `input_ids`, `attention_mask`, `positions`, int32 `[B, L]`, left-padded (`left_pad_prompts`).
    Returns `tokens` `[B, L + N]` (prompt, response, pad after the end), `mask` `[B, L + N]` (1 on real tokens),
    `response` `[B, N]`, `response_mask` `[B, N]` (EOS + 1 convention), `logps` `[B, N]` (log-probability of
    each sampled token under softmax(logits / temperature), 0 where masked) and `ended` `[B]` (the row emitted EOS).
    Sampling settings are static: each combination compiles its own program.
    """
    batch, prompt_len = prompts["input_ids"].shape
    total = prompt_len + max_new_tokens
    head = model.output_head()
    key_mask = jnp.pad(prompts["attention_mask"], ((0, 0), (0, max_new_tokens)))
    hidden, cache = model.decode(prompts["input_ids"], prompts["positions"], model.init_cache(batch, total), 0,
                                 key_mask)
    logits = head.logits(hidden[:, -1])
    next_position = prompts["positions"][:, -1] + 1

    def step(i, carry):
        logits, cache, key_mask, done, rng, response, logps = carry
        rng, key = jax.random.split(rng)
        token, logp = _pick(logits, key, temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token).astype(jnp.int32)
        response = response.at[:, i].set(token)
        logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
        slot = prompt_len + i
        key_mask = key_mask.at[:, slot].set(1)
        hidden, cache = model.decode(token[:, None], (next_position + i)[:, None], cache, slot, key_mask)
        logits = head.logits(hidden[:, -1])
        return logits, cache, key_mask, done | (token == eos_id), rng, response, logps

    init = (logits, cache, key_mask, jnp.zeros((batch,), bool), rng,
            jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.float32))
    _, _, _, done, _, response, logps = jax.lax.fori_loop(0, max_new_tokens, step, init)
    return _outputs(prompts, response, logps, done, eos_id)


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


def respond(workdir: str, prompts: list[str], *, chat_template: str = "auto", system: str = "",
            max_new_tokens: int = 128, temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0,
            seed: int = 0) -> list[str]:
    """The responses of the policy a run trained (its latest checkpoint in `workdir`; or `hf:DIR` / `gguf:FILE`
    pretrained weights) to text prompts, decoded: `model_completer(...)(prompts)` in one batch.
    `chat_template` as for `model_completer`."""
    complete = model_completer(workdir, chat_template=chat_template, system=system, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               batch_size=max(len(prompts), 1))
    return complete(prompts)


def decode_responses(tokenizer, response, response_mask) -> list[str]:
    """The text of each sampled response `[B, N]`, up to (not including) its EOS."""
    return [tokenizer.decode([int(t) for t, keep in zip(row, row_mask) if keep and t != tokenizer.eos_id])
            for row, row_mask in zip(response, response_mask)]


@dataclasses.dataclass
class ModelCompleter:
    """`complete(prompts) -> responses` of one model whose weights are loaded once (see `model_completer`).

    `truncated` counts the prompts cut on the left to fit `max_seq_len − max_new_tokens`; `calls` the calls."""

    tokenizer: object
    model_config: object
    params: object
    mesh: object
    sample: object  # jitted (params, batch, rng) -> generate outputs
    chat_template: str
    max_new_tokens: int
    batch_size: int
    seed: int
    system: str = ""  # a system message before each prompt's user turn (chat templates only)
    calls: int = 0
    truncated: int = 0
    _batches: int = 0

    @property
    def max_prompt_len(self) -> int:
        return self.model_config.max_seq_len - self.max_new_tokens

    def encode(self, prompt: str) -> list[int]:
        """The prompt's ids: the chat template's (system turn +) user turn + generation prompt, or the raw text
        after BOS."""
        from flaxalign.data.chat import leading_ids, render_chat

        tokenizer = self.tokenizer
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        if not self.chat_template:
            return bos + tokenizer.encode(prompt)
        lead = leading_ids(tokenizer, self.chat_template)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": prompt})
        return lead + render_chat(messages, tokenizer, self.chat_template, add_generation_prompt=True).ids

    def __call__(self, prompts: list[str]) -> list[str]:
        import jax

        from flaxalign.data.batching import left_pad_prompts
        from flaxalign.data.prompt_data import truncate_prompt_left

        self.calls += 1
        encoded = [self.encode(p) for p in prompts]
        ids = [truncate_prompt_left(row, self.max_prompt_len, self.tokenizer.bos_id) for row in encoded]
        self.truncated += sum(len(a) < len(b) for a, b in zip(ids, encoded))
        width = min(self.batch_size, len(ids))
        responses = []
        for start in range(0, len(ids), width):
            chunk = ids[start:start + width]
            rows = chunk + [chunk[0]] * (width - len(chunk))  # a full batch: one compile per prompt-length bucket
            batch = left_pad_prompts(rows, pad_id=self.tokenizer.pad_id,
                                     length=prompt_bucket(max(map(len, rows)), self.max_prompt_len))
            key = jax.random.fold_in(jax.random.PRNGKey(self.seed), self._batches)
            self._batches += 1
            with jax.set_mesh(self.mesh):
                out = jax.device_get(self.sample(self.params, batch, key))
            responses += decode_responses(self.tokenizer, out["response"][:len(chunk)],
                                          out["response_mask"][:len(chunk)])
        return responses


def prompt_bucket(length: int, cap: int) -> int:
    """The padded prompt length for a batch whose longest prompt has `length` tokens: the next power of two (at
    least 16), at most `cap`, so the sampler compiles for a few shapes only."""
    return min(cap, max(16, 1 << (max(length, 1) - 1).bit_length()))


TEMPLATE_CHOICES = ("auto", "none")  # besides the templates' names; "" = "none"


def check_template_choice(chat_template: str, name: str = "chat_template") -> None:
    """Refuses a `chat_template` (the setting `name`) that is neither a template's name, "auto" nor "none"."""
    from flaxalign.data.chat import TEMPLATES

    if chat_template and chat_template not in (*TEMPLATES, *TEMPLATE_CHOICES):
        raise errors.ConfigError(f"{name}={chat_template!r} is not one of {[*TEMPLATE_CHOICES, *TEMPLATES]}.")


def model_completer(checkpoint: str, *, chat_template: str = "auto", system: str = "", max_new_tokens: int = 128,
                    temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    batch_size: int = 8) -> ModelCompleter:
    """A text model from the policy of a run directory (latest checkpoint), `checkpoint:DIR`, `hf:DIR` or
    `gguf:FILE`, on one device: weights and tokenizer loaded once, the KV-cache sampler jitted once per
    (batch, padded prompt length). Each prompt becomes a user message of `chat_template` with the generation
    prompt (after a `system` message when given): "auto" is the template the run trained with (its metadata's;
    none for a run that never saw message lists, or pretrained weights), "none" or "" the prompt text as is
    (after BOS)."""
    import jax

    from flaxalign import models, sharding, weights
    from flaxalign.data.tokenizer import load_tokenizer

    check_template_choice(chat_template)
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1 or batch_size < 1:
        raise errors.ConfigError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1 and "
                                 "batch_size >= 1.")
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    source = weights.source_of(checkpoint)
    meta = weights.metadata(source)
    if chat_template == "auto":
        chat_template = meta.get("chat_template", "")
    chat_template = "" if chat_template == "none" else chat_template
    if system and not chat_template:
        raise errors.ConfigError(f"a system message needs a chat template to place it, and {checkpoint} records none "
                                 "(set one, e.g. --chat_template=chatml).")
    tokenizer_path = meta.get("tokenizer")
    if not tokenizer_path:
        raise errors.ConfigError(f"{checkpoint} has no tokenizer to turn prompts into tokens.")
    tokenizer = load_tokenizer(tokenizer_path)
    with jax.set_mesh(mesh):
        model_config, params = weights.run_weights(source, mesh)
    if model_config.max_seq_len - max_new_tokens < 2:
        raise errors.ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                                 f"max_seq_len={model_config.max_seq_len}.")
    graphdef = models.abstract_model(model_config)[0]
    settings = dict(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                    temperature=temperature, top_k=top_k, top_p=top_p)
    sample = jax.jit(lambda params, batch, rng: generate(models.merge(graphdef, params), batch, rng, **settings))
    return ModelCompleter(tokenizer=tokenizer, model_config=model_config, params=params, mesh=mesh, sample=sample,
                          chat_template=chat_template, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          seed=seed, system=system)
