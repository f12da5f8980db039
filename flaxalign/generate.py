"""Talking to a model in text: `model_completer` loads a checkpoint's policy and tokenizer once and turns prompts
into responses through the sampler seam (`flaxalign.sampler`); `respond` is its one-batch form for `flaxalign
generate`; `decode_responses` turns sampled ids back into text."""

import dataclasses
import functools

import jax
import numpy as np

from flaxalign import errors
from flaxalign.sampler import KVCacheSampler, Sampling, prompt_bucket


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
    """The text of each sampled response `[B, N]`, up to (not including) its EOS, decoded in one batch (GRPO decodes
    every rollout row on the host each step)."""
    response = np.asarray(response)
    keep = (np.asarray(response_mask) > 0) & (response != tokenizer.eos_id)
    return tokenizer.decode_batch([row[row_keep].tolist() for row, row_keep in zip(response, keep)])


@dataclasses.dataclass
class ModelCompleter:
    """`complete(prompts) -> responses` of one model whose weights are loaded once (see `model_completer`).

    `truncated` counts the prompts cut on the left to fit `max_seq_len − max_new_tokens`; `calls` the calls."""

    tokenizer: object
    model_config: object
    params: object
    mesh: object
    sample: object  # (params, batch, rng) -> the rollout of its sampler
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
    engine = KVCacheSampler(functools.partial(models.merge, models.abstract_model(model_config)[0]),
                            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p)
    sample = functools.partial(engine.sample, sampling=sampling)
    return ModelCompleter(tokenizer=tokenizer, model_config=model_config, params=params, mesh=mesh, sample=sample,
                          chat_template=chat_template, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          seed=seed, system=system)
