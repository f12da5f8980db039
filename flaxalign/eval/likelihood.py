"""What the evaluation scores by the model's log-likelihood of given text, without sampling: perplexity of text
files and multiple-choice accuracy.

Both turn token sequences into right-padded (input, target) rows of a fixed width, scored `batch_size` rows at a
time by one jitted forward pass (`make_scorer`: Σ log p over each row's scored targets, the logits chunked over the
sequence), so each width compiles once.

Perplexity: each document is `[bos] + tokens + [eos]` (as CLM training packs it) and is cut into non-overlapping
windows of `window` predictions; window k holds tokens k·W … k·W + W, so every token after the bos is predicted
exactly once, from the tokens of its own window only (a token early in a window sees less context than in a sliding
evaluation, so the number is an upper bound of the strided perplexity). PPL = exp(−Σ log p / number of predicted
tokens), pooled over all documents of a spec.

Multiple choice (MMLU / TruthfulQA-MC / lm-eval-harness style): a JSONL file of `{"question": str, "choices":
[str, ...], "answer": int}` (the index of the right choice), or `builtin:arithmetic_mc[?n=N&seed=S&max=M]`
(the questions of `builtin:arithmetic_prompts` with "The answer is N." and three near misses). Each choice is
scored by log p(prefix + choice | [bos] + template), the template's `{question}` replaced by the question (default
"Question: {question}\\nAnswer:" and prefix " ", lm-eval-harness' convention). Context and choice are encoded
separately, so the choice's tokens are exactly those of `encode(prefix + choice)`. `acc` takes the choice of the
largest summed log-likelihood, `acc_norm` of the largest log-likelihood per character of `prefix + choice` (as
lm-eval-harness normalises, so long choices are not penalised for their length).
"""

import functools
import itertools
import json
import random
import urllib.parse

import jax
import numpy as np

from flaxalign import models
from flaxalign.data import embedded
from flaxalign.data.prompt_data import truncate_prompt_left
from flaxalign.data.sources import read_records
from flaxalign.errors import ConfigError, DataError
from flaxalign.losses.lm import sequence_logps

DEFAULT_MC_TEMPLATE = "Question: {question}\nAnswer:"
DEFAULT_CHOICE_PREFIX = " "
ARITHMETIC_MC = "builtin:arithmetic_mc"
ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


# ----------------------------------------------------------------------------
# Scoring rows.


def row_logps(params, rows: dict, *, graphdef, chunk_size: int):
    """(Σ_t m_t log p(y_t | x_≤t), Σ_t m_t) of each row `[B]`: the log-likelihood of a row's scored targets."""
    model = models.merge(graphdef, params)
    hidden = model(rows["inputs"], rows["positions"], rows["segment_ids"])
    return sequence_logps(hidden, model.output_head(), rows["targets"], rows["loss_mask"], chunk_size=chunk_size)


def make_scorer(graphdef, chunk_size: int = 256):
    """`row_logps` jitted for a model: `scorer(params, rows) -> (logp sums, counts)`."""
    return jax.jit(functools.partial(row_logps, graphdef=graphdef, chunk_size=chunk_size))


def scored_rows(sequences: list[list[int]], starts: list[int], width: int, *, pad_id: int) -> dict:
    """Right-padded rows `[N, width]` of token sequences (at most width + 1 tokens each): inputs = s[:-1],
    targets = s[1:], positions 0, 1, …, segment_ids 1 on real positions, and loss_mask 1 on the targets s[k] with
    k ≥ start (the scored tokens; start ≥ 1)."""
    n = len(sequences)
    rows = {key: np.zeros((n, width), np.float32 if key == "loss_mask" else np.int32) for key in ROW_KEYS}
    rows["inputs"][:] = rows["targets"][:] = pad_id
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        length = len(seq) - 1
        if not 1 <= start <= length or length > width:
            raise ValueError(f"sequence {i} of {len(seq)} tokens cannot be scored from {start} in {width} columns.")
        rows["inputs"][i, :length] = seq[:-1]
        rows["targets"][i, :length] = seq[1:]
        rows["positions"][i, :length] = np.arange(length)
        rows["segment_ids"][i, :length] = 1
        rows["loss_mask"][i, start - 1:length] = 1.0
    return rows


def score_sequences(scorer, params, sequences, starts, *, width: int, batch_size: int, pad_id: int):
    """(Σ log p of the scored tokens, their count) of every sequence, float64 `[N]` each, `batch_size` rows per
    call; the last batch is filled with empty rows so every call has the shape `[batch_size, width]`."""
    sums, counts = [], []
    for lo in range(0, len(sequences), batch_size):
        chunk = sequences[lo:lo + batch_size]
        rows = scored_rows(chunk, starts[lo:lo + batch_size], width, pad_id=pad_id)
        fill = batch_size - len(chunk)
        if fill:
            rows = {k: np.concatenate([v, np.zeros((fill, width), v.dtype)]) for k, v in rows.items()}
        logp, count = jax.device_get(scorer(params, rows))
        sums.append(np.asarray(logp, np.float64)[:len(chunk)])
        counts.append(np.asarray(count, np.float64)[:len(chunk)])
    if not sums:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(sums), np.concatenate(counts)


# ----------------------------------------------------------------------------
# Perplexity.


def document_ids(spec: str, tokenizer, max_tokens: int = 0) -> list[list[int]]:
    """`[bos] + encode(text) + [eos]` of each document of a text spec (a file, folder, glob, JSONL of `text`
    records or `builtin:stdlib`), stopping once `max_tokens` tokens are read (0 = all; the last document is cut)."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    docs, total = [], 0
    for record in read_records(spec, "text"):
        ids = bos + tokenizer.encode(record["text"]) + [tokenizer.eos_id]
        if max_tokens:
            ids = ids[:max_tokens - total]
        if len(ids) >= 2:
            docs.append(ids)
            total += len(ids)
        if max_tokens and total >= max_tokens:
            break
    if not docs:
        raise DataError(f"'{spec}' holds no text to measure perplexity on.")
    return docs


def perplexity_windows(docs: list[list[int]], window: int) -> list[list[int]]:
    """Each document cut into pieces d[k·W : k·W + W + 1], k = 0, 1, … while k·W < len(d) − 1: consecutive pieces
    share one token (the last input of one is the first of the next), so each token after d[0] is a target once."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}.")
    return [doc[k:k + window + 1] for doc in docs for k in range(0, len(doc) - 1, window)]


def perplexity(scorer, params, tokenizer, spec: str, *, window: int, batch_size: int, max_tokens: int = 0) -> dict:
    """{"perplexity": exp(nll), "nll": −Σ log p / tokens, "tokens": predicted tokens, "documents"} of a text spec
    (see the module docstring)."""
    docs = document_ids(spec, tokenizer, max_tokens)
    pieces = perplexity_windows(docs, window)
    logp, count = score_sequences(scorer, params, pieces, [1] * len(pieces), width=window, batch_size=batch_size,
                                  pad_id=tokenizer.pad_id)
    return perplexity_of(logp.sum(), count.sum(), documents=len(docs))


def perplexity_of(logp_sum: float, tokens: float, **extra) -> dict:
    """{"perplexity": exp(−logp_sum / tokens), "nll", "tokens", **extra}."""
    nll = -float(logp_sum) / max(float(tokens), 1.0)
    return {"perplexity": float(np.exp(nll)), "nll": nll, "tokens": int(tokens), **extra}


# ----------------------------------------------------------------------------
# Multiple choice.


def read_mc_file(path: str) -> list[dict]:
    """The validated `{"question", "choices", "answer"}` records of a JSONL file (blank lines skipped). Raises
    DataError naming the file and line for bad JSON, a missing or mistyped field, fewer than 2 choices or an
    answer index out of range, and when the file cannot be read or holds no question."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"multiple-choice file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read multiple-choice file {path}: {error}.") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: malformed JSON ({error.msg} at column {error.colno}).") from None
        records.append(validate_mc_record(value, where))
    if not records:
        raise DataError(f"multiple-choice file {path} has no questions.")
    return records


def validate_mc_record(record, where: str) -> dict:
    """`{"question", "choices", "answer"}` of one record, or a DataError naming `where` and the field at fault."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a multiple-choice record must be a JSON object, got {type(record).__name__}.")
    for name in ("question", "choices", "answer"):
        if record.get(name) is None:
            raise DataError(f"{where}: missing field '{name}' (multiple-choice records need question, choices, "
                            "answer).")
    question, choices, answer = record["question"], record["choices"], record["answer"]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: 'question' must be a non-empty string.")
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of non-empty strings.")
    if len(choices) < 2:
        raise DataError(f"{where}: 'choices' has {len(choices)} choice; a question needs at least 2.")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise DataError(f"{where}: 'answer' must be the index of the right choice (an integer), got {answer!r}.")
    if not 0 <= answer < len(choices):
        raise DataError(f"{where}: answer index {answer} is out of range for {len(choices)} choices "
                        f"(valid: 0 to {len(choices) - 1}).")
    return {"question": question, "choices": list(choices), "answer": answer}


def arithmetic_mc(spec: str) -> list[dict]:
    """`builtin:arithmetic_mc[?n=N&seed=S&max=M]`: the questions of `builtin:arithmetic_prompts` with the same
    parameters, each with the choices "The answer is v." for the answer and three distinct non-negative near
    misses (v ± 1 … 3), in an order drawn from `seed`."""
    query = spec.partition("?")[2]
    tasks = embedded.builtin_records(f"builtin:arithmetic_prompts{'?' + query if query else ''}", "prompt")
    rng = random.Random(int(dict(urllib.parse.parse_qsl(query)).get("seed", embedded.DEFAULT_ARITHMETIC_SEED)))
    records = []
    for task in tasks:
        value = int(task["answer"])
        wrong = rng.sample([value + d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0], 3)
        choices = [value, *wrong]
        rng.shuffle(choices)
        records.append({"question": task["prompt"], "choices": [f"The answer is {c}." for c in choices],
                        "answer": choices.index(value)})
    return records


def mc_records(spec: str) -> list[dict]:
    """The questions of an `mc_file` setting: `builtin:arithmetic_mc…` or a JSONL file."""
    if spec == ARITHMETIC_MC or spec.startswith(ARITHMETIC_MC + "?"):
        return arithmetic_mc(spec)
    return read_mc_file(spec)


def mc_sequences(records: list[dict], tokenizer, *, template: str, prefix: str, max_tokens: int):
    """(sequences, starts) of every (question, choice) pair in order: `[bos] + encode(template with the question)`
    then `encode(prefix + choice)`, scored from the choice's first token. The context is cut on the left (the bos
    stays) when a sequence would exceed `max_tokens`."""
    if "{question}" not in template:
        raise ConfigError(f"mc_template={template!r} has no {{question}} placeholder.")
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    sequences, starts = [], []
    for index, record in enumerate(records):
        context = bos + tokenizer.encode(template.replace("{question}", record["question"]))
        for choice in record["choices"]:
            continuation = tokenizer.encode(prefix + choice)
            room = max_tokens - len(continuation)
            if not continuation or room < 1:
                raise DataError(f"question {index}: the choice {choice!r} has {len(continuation)} tokens, which "
                                f"leaves no room for the question in {max_tokens} tokens.")
            kept = truncate_prompt_left(context, room, tokenizer.bos_id)
            sequences.append(kept + continuation)
            starts.append(len(kept))
    return sequences, starts


def choice_accuracy(choice_logps: list, choice_chars: list, answers: list[int]) -> dict:
    """{"acc", "acc_norm", "questions"}: acc = mean_q [argmax_i ℓ_qi = answer_q] with ℓ the summed log-likelihood
    of choice i; acc_norm the same with ℓ_qi / (characters of prefix + choice i). Ties go to the first choice."""
    hits = norm_hits = 0
    for logps, chars, answer in zip(choice_logps, choice_chars, answers):
        logps = np.asarray(logps, np.float64)
        hits += int(np.argmax(logps)) == answer
        norm_hits += int(np.argmax(logps / np.maximum(np.asarray(chars, np.float64), 1.0))) == answer
    n = len(answers)
    return {"acc": hits / n if n else 0.0, "acc_norm": norm_hits / n if n else 0.0, "questions": n}


def multiple_choice(scorer, params, tokenizer, spec: str, *, max_seq_len: int, batch_size: int,
                    template: str = DEFAULT_MC_TEMPLATE, prefix: str = DEFAULT_CHOICE_PREFIX) -> dict:
    """{"acc", "acc_norm", "questions", "choices"} of the questions of `spec` (see the module docstring)."""
    records = mc_records(spec)
    sequences, starts = mc_sequences(records, tokenizer, template=template, prefix=prefix,
                                     max_tokens=max_seq_len + 1)
    longest = max(len(s) for s in sequences) - 1
    width = min(-(-longest // 16) * 16, max_seq_len)  # rounded up: few widths to compile
    logp, _ = score_sequences(scorer, params, sequences, starts, width=width, batch_size=batch_size,
                              pad_id=tokenizer.pad_id)
    bounds = np.cumsum([0] + [len(r["choices"]) for r in records])
    result = choice_accuracy([logp[lo:hi] for lo, hi in itertools.pairwise(bounds)],
                             [[len(prefix + c) for c in r["choices"]] for r in records],
                             [r["answer"] for r in records])
    return {**result, "choices": int(bounds[-1])}
