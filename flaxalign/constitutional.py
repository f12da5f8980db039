"""Constitutional AI data generation (RLAIF) and self-refinement at inference, over any text model.

Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback"), its supervised phase: the
model drafts a response to each prompt; then, for `rounds` rounds, it critiques its latest response against one
principle drawn from a constitution and revises the response to answer the critique. The final revision is an SFT
target, and (chosen = final revision, rejected = draft) is a preference pair for DPO or a reward model (the AI
feedback that replaces human labels). Self-refine (Madaan et al. 2023, "Self-Refine") is the same loop at inference
time without a constitution: response → feedback → refined response, N rounds, stopping early for a prompt whose
feedback starts with `STOP_MARKER`.

Everything here is a function of a *text model* `complete(prompts: list[str]) -> list[str]` (one response per
prompt, batched), so the tests drive it with a scripted stub. `flaxalign.generate.model_completer` makes one from a
run directory, `hf:DIR` or `gguf:FILE`, loading the weights once. Each phase is one call over all prompts: a
constitutional run makes 1 + 2·rounds calls (drafts, then critiques and revisions per round), self-refine at most
the same.

Requests are the `str.format` templates below (fields in `TEMPLATE_FIELDS`), sent as the user message of the model's
chat template. Model outputs go through `clean_output`: surrounding whitespace and an echoed label ("Revision:") are
dropped, so a revision that repeats the draft compares equal to it. Pairs that teach nothing (revision = draft, empty,
or a revision that only quotes its critique or principle) are skipped and counted (`preference_records`).

Constitution files are UTF-8 text, one principle per line; blank lines and lines starting with "#" are skipped. A
principle is one sentence that reads after "...falls short of this principle:" and "...follows this principle:".
`builtin:default` is `DEFAULT_PRINCIPLES` (also in data/constitution.txt, as an editable starting point).
"""

import json
import os
import re
import time

import numpy as np

from flaxalign import errors

BUILTIN_CONSTITUTION = "builtin:default"

# Written for this project; the shape (one principle per critique/revision pair) follows Bai et al. 2022, App. C.
DEFAULT_PRINCIPLES = (
    "The response answers the question that was asked, directly and without filler.",
    "The response is factually correct, does not invent facts, and says so when it is unsure.",
    "The response does not help anyone cause physical, financial or emotional harm to people or animals.",
    "The response treats every person and group with respect, without stereotypes, insults or demeaning words.",
    "The response protects privacy and does not reveal or guess personal details about private individuals.",
    "The response is honest that it comes from an AI assistant and does not claim experiences it cannot have.",
    "The response is clear, well organised and no longer than the question needs.",
    ("When a request is dangerous or unlawful, the response declines that part politely, says briefly why, and "
     "offers a safe alternative."),
)

# Critique request (Bai et al.'s "Critique Request: ..."): the model reads the exchange and names the flaws.
CRITIQUE_TEMPLATE = (
    "Here is a request from a user and the assistant's response to it.\n\n"
    "Request: {prompt}\n\n"
    "Response: {response}\n\n"
    "Critique request: Point out specific ways in which the response falls short of this principle: {principle}\n\n"
    "Critique:"
)
# Revision request (Bai et al.'s "Revision Request: ..."): the model rewrites the response to answer its critique.
REVISION_TEMPLATE = (
    "Here is a request from a user, the assistant's response to it, and a critique of that response.\n\n"
    "Request: {prompt}\n\n"
    "Response: {response}\n\n"
    "Critique: {critique}\n\n"
    "Revision request: Rewrite the response so that it follows this principle: {principle} Fix the problems the "
    "critique names, keep what was already good, and write only the new response.\n\n"
    "Revision:"
)
STOP_MARKER = "NO ISSUES"
# Self-refine feedback (Madaan et al. 2023): actionable, localised feedback, or the stop marker.
FEEDBACK_TEMPLATE = (
    "Here is a request from a user and a response to it.\n\n"
    "Request: {prompt}\n\n"
    "Response: {response}\n\n"
    "Give short, concrete feedback on this response: what is wrong, missing or unclear, and how to fix it. If it "
    f"needs no change, write only {STOP_MARKER}.\n\n"
    "Feedback:"
)
REFINE_TEMPLATE = (
    "Here is a request from a user, a response to it, and feedback on that response.\n\n"
    "Request: {prompt}\n\n"
    "Response: {response}\n\n"
    "Feedback: {feedback}\n\n"
    "Rewrite the response so that it follows the feedback. Write only the improved response.\n\n"
    "Improved response:"
)
TEMPLATE_FIELDS = {
    "critique": ("prompt", "response", "principle"),
    "revision": ("prompt", "response", "critique", "principle"),
    "feedback": ("prompt", "response"),
    "refine": ("prompt", "response", "feedback"),
}

# A label the model may echo from the end of a request before its answer.
_ECHOED_LABEL = re.compile(r"^\s*(critique|revision|revised response|feedback|improved response|response)\s*:\s*",
                           re.IGNORECASE)

MIN_ECHO_CHARS = 24  # a shorter critique ("No.") may well appear in a real revision

PREFERENCES_FILE, SFT_FILE, TRACE_FILE = "preferences.jsonl", "sft.jsonl", "trace.jsonl"


# ----------------------------------------------------------------------------
# Constitutions.


def parse_principles(text: str, source: str) -> list[str]:
    """The principles of a constitution file's text: its stripped lines, without blank and "#" comment lines.
    Raises DataError naming `source` when none is left: sampling from an empty constitution is undefined."""
    principles = [line.strip() for line in text.splitlines()]
    principles = [line for line in principles if line and not line.startswith("#")]
    if not principles:
        raise errors.DataError(f"constitution {source} has no principles; write one principle per line (lines "
                               "starting with # are comments).")
    return principles


def read_principles(spec: str) -> list[str]:
    """The principles of `builtin:default` or of a constitution file (see the module docstring)."""
    if spec == BUILTIN_CONSTITUTION:
        return list(DEFAULT_PRINCIPLES)
    if not os.path.isfile(spec):
        raise errors.DataError(f"constitution file {spec} does not exist; give a text file with one principle per "
                               f"line, or {BUILTIN_CONSTITUTION}.")
    try:
        with open(spec, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise errors.DataError(f"cannot read constitution file {spec}: {error}.") from None
    return parse_principles(text, spec)


def sample_principles(num_prompts: int, rounds: int, principles, seed: int) -> list[list[str]]:
    """The principle of each round for each prompt, `[num_prompts][rounds]`.

    Prompt i draws from its own stream `default_rng([seed, i])`, so its principles do not depend on how many prompts
    a run has, and goes through shuffled copies of the constitution, so no principle repeats within a prompt's rounds
    before every other one was used."""
    principles = list(principles)
    if not principles:
        raise errors.ConfigError("there are no principles to sample from.")
    chosen = []
    for index in range(num_prompts):
        rng = np.random.default_rng([seed, index])
        laps = -(-rounds // len(principles))
        order = np.concatenate([rng.permutation(len(principles)) for _ in range(laps)]) if laps else []
        chosen.append([principles[int(k)] for k in order[:rounds]])
    return chosen


# ----------------------------------------------------------------------------
# Requests and outputs.


def fill(template: str, kind: str, **fields) -> str:
    """`template.format(**fields)` for a request of `kind` (a key of TEMPLATE_FIELDS), or a ConfigError when the
    template names a field that `kind` does not have (a typo would otherwise fail deep inside a run)."""
    try:
        return template.format(**{name: fields[name] for name in TEMPLATE_FIELDS[kind]})
    except (KeyError, IndexError, ValueError) as error:
        raise errors.ConfigError(f"the {kind} template is not a format string over the fields "
                                 f"{', '.join(TEMPLATE_FIELDS[kind])} ({error!r}).") from None


def critique_request(prompt: str, response: str, principle: str, template: str = CRITIQUE_TEMPLATE) -> str:
    """The request that asks the model to critique `response` to `prompt` against `principle`."""
    return fill(template, "critique", prompt=prompt, response=response, principle=principle)


def revision_request(prompt: str, response: str, critique: str, principle: str,
                     template: str = REVISION_TEMPLATE) -> str:
    """The request that asks the model to rewrite `response` so that it answers `critique` and follows
    `principle`."""
    return fill(template, "revision", prompt=prompt, response=response, critique=critique, principle=principle)


def clean_output(text: str) -> str:
    """A model output without surrounding whitespace or a label echoed from the request ("Revision: ...")."""
    return _ECHOED_LABEL.sub("", text.strip(), count=1).strip()


def _complete(complete, requests: list[str]) -> list[str]:
    """`complete(requests)`, cleaned, after checking it kept its contract (one string per request)."""
    if not requests:
        return []
    outputs = list(complete(list(requests)))
    if len(outputs) != len(requests) or not all(isinstance(out, str) for out in outputs):
        raise ValueError(f"complete() must return one string per prompt: got {len(outputs)} outputs for "
                         f"{len(requests)} prompts.")
    return [clean_output(out) for out in outputs]


# ----------------------------------------------------------------------------
# The two loops.


def constitutional_pairs(prompts, complete, principles, *, rounds: int = 1, seed: int = 0,
                         critique_template: str = CRITIQUE_TEMPLATE,
                         revision_template: str = REVISION_TEMPLATE) -> list[dict]:
    """Draft, then `rounds` × (critique, revision) for every prompt (Bai et al. 2022, supervised phase).

    Returns one record per prompt, in order: `{"prompt", "draft", "principles", "critiques", "revisions"}`, the
    last three lists of length `rounds` (round r critiques the response of round r − 1, the draft for r = 0).
    Principles come from `sample_principles(len(prompts), rounds, principles, seed)`."""
    if rounds < 1:
        raise errors.ConfigError(f"rounds must be >= 1, got {rounds}.")
    prompts = list(prompts)
    schedule = sample_principles(len(prompts), rounds, principles, seed)
    responses = _complete(complete, prompts)
    records = [{"prompt": p, "draft": r, "principles": [], "critiques": [], "revisions": []}
               for p, r in zip(prompts, responses)]
    for step in range(rounds):
        chosen = [row[step] for row in schedule]
        critiques = _complete(complete, [critique_request(p, r, c, critique_template)
                                         for p, r, c in zip(prompts, responses, chosen)])
        responses = _complete(complete, [revision_request(p, r, k, c, revision_template)
                                         for p, r, k, c in zip(prompts, responses, critiques, chosen)])
        for record, principle, critique, revision in zip(records, chosen, critiques, responses):
            record["principles"].append(principle)
            record["critiques"].append(critique)
            record["revisions"].append(revision)
    return records


def self_refine(prompts, complete, rounds: int, feedback_template: str = FEEDBACK_TEMPLATE, *,
                refine_template: str = REFINE_TEMPLATE, stop_marker: str = STOP_MARKER) -> tuple[list[str], list[dict]]:
    """Self-refine (Madaan et al. 2023): response → feedback → refined response, `rounds` times.

    A prompt whose feedback starts with `stop_marker` (case-insensitive; "" = never) keeps its response and leaves
    the loop, as in the paper's stopping condition. Returns (final responses, trace), the trace one record per prompt:
    `{"prompt", "draft", "feedback": [...], "refinements": [...], "stopped": bool}` (feedback has one more entry than
    refinements when the prompt stopped). `rounds` = 0 returns the drafts."""
    if rounds < 0:
        raise errors.ConfigError(f"refine rounds must be >= 0, got {rounds}.")
    prompts = list(prompts)
    current = _complete(complete, prompts)
    trace = [{"prompt": p, "draft": r, "feedback": [], "refinements": [], "stopped": False}
             for p, r in zip(prompts, current)]
    active = list(range(len(prompts)))
    for _ in range(rounds):
        if not active:
            break
        feedback = _complete(complete, [fill(feedback_template, "feedback", prompt=prompts[i], response=current[i])
                                        for i in active])
        for i, text in zip(active, feedback):
            trace[i]["feedback"].append(text)
            trace[i]["stopped"] = bool(stop_marker) and text.upper().startswith(stop_marker.upper())
        active = [i for i in active if not trace[i]["stopped"]]
        refined = _complete(complete, [fill(refine_template, "refine", prompt=prompts[i], response=current[i],
                                            feedback=trace[i]["feedback"][-1]) for i in active])
        for i, text in zip(active, refined):
            current[i] = text
            trace[i]["refinements"].append(text)
    return current, trace


# ----------------------------------------------------------------------------
# Training records.


def _squash(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def echoes_feedback(revision: str, critique: str, principle: str) -> bool:
    """True when `revision` is its critique, or quotes its critique or principle (at least `MIN_ECHO_CHARS` of it;
    case and whitespace ignored). Small models often answer a revision request by repeating the critique or the
    principle; such a "revision" would teach the policy to recite the constitution instead of answering."""
    squashed = _squash(revision)
    if squashed == _squash(critique):
        return True
    return any(len(quote) >= MIN_ECHO_CHARS and quote in squashed for quote in (_squash(critique), _squash(principle)))


def _as_chat(prompt: str, answer: str) -> tuple[list, list]:
    return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": answer}]


def preference_records(records, *, conversational: bool = False) -> tuple[list[dict], dict]:
    """`preference` records (chosen = final revision, rejected = draft) and the counts of skipped pairs.

    Skipped: `identical` (the revision equals the draft: no preference to learn), `empty` (the draft or the final
    revision is empty, which `preference` records may not be) and `echo` (`echoes_feedback`: the final revision
    quotes its critique or principle instead of answering). `conversational` writes the prompt, chosen and
    rejected as message lists, so DPO renders them with the same chat template that generated them; otherwise they
    are strings (DPO then feeds `[bos] prompt` raw)."""
    kept, skipped = [], {"identical": 0, "empty": 0, "echo": 0}
    for record in records:
        draft, revision = record["draft"], record["revisions"][-1]
        if not draft.strip() or not revision.strip():
            skipped["empty"] += 1
        elif revision == draft:
            skipped["identical"] += 1
        elif echoes_feedback(revision, record["critiques"][-1], record["principles"][-1]):
            skipped["echo"] += 1
        elif conversational:
            prompt, chosen = _as_chat(record["prompt"], revision)
            kept.append({"prompt": prompt, "chosen": chosen, "rejected": _as_chat(record["prompt"], draft)[1]})
        else:
            kept.append({"prompt": record["prompt"], "chosen": revision, "rejected": draft})
    return kept, skipped


def sft_records(records, *, conversational: bool = False) -> tuple[list[dict], int]:
    """`sft` records (completion = final revision; `messages` form when `conversational`) and the number skipped
    because the final revision is empty or `echoes_feedback`."""
    kept = []
    for record in records:
        revision = record["revisions"][-1]
        if not revision.strip() or echoes_feedback(revision, record["critiques"][-1], record["principles"][-1]):
            continue
        if conversational:
            prompt, answer = _as_chat(record["prompt"], revision)
            kept.append({"messages": prompt + answer})
        else:
            kept.append({"prompt": record["prompt"], "completion": revision})
    return kept, len(records) - len(kept)


# ----------------------------------------------------------------------------
# A text model from weights.


# ----------------------------------------------------------------------------
# The `flaxalign constitutional` command.


def check_config(config) -> None:
    """ConfigError for a constitutional config that cannot run (before any weights are loaded)."""
    if config.get("stage") != "constitutional":
        raise errors.ConfigError("flaxalign constitutional needs a constitutional config, e.g. "
                                 "--config=configs/constitutional.py:tiny.")
    if not config.checkpoint:
        raise errors.ConfigError("set --config.checkpoint to the model that writes and revises the responses "
                                 "(a run directory, checkpoint:DIR, hf:DIR or gguf:FILE).")
    if config.rounds < 1 or config.num_prompts < 0:
        raise errors.ConfigError(f"need rounds >= 1 and num_prompts >= 0, got rounds={config.rounds} and "
                                 f"num_prompts={config.num_prompts}.")


def run(config, workdir: str) -> str:
    """Generates the data of `configs/constitutional.py` into `workdir`: preferences.jsonl (DPO/reward `preference`
    records), sft.jsonl (`sft` records), trace.jsonl (every prompt's draft, principles, critiques, revisions and the
    prompt record's answer, if any) and config.json. Returns a one-line summary."""
    from flaxalign.data.embedded import write_jsonl
    from flaxalign.data.prompt_data import prompt_texts
    from flaxalign.data.sources import read_records
    from flaxalign.generate import model_completer

    check_config(config)
    started = time.time()
    principles = read_principles(config.constitution)
    records = read_records(config.prompts, "prompt")
    records = records[:config.num_prompts] if config.num_prompts else records
    complete = model_completer(config.checkpoint, chat_template=config.chat_template,
                               max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                               top_k=config.top_k, top_p=config.top_p, seed=config.seed, batch_size=config.batch_size)
    traces = constitutional_pairs(prompt_texts(records), complete, principles, rounds=config.rounds,
                                  seed=config.seed)
    for trace, record in zip(traces, records):
        if "answer" in record:
            trace["answer"] = record["answer"]
    conversational = bool(complete.chat_template)  # as resolved: "auto" may find none, "none" is raw text
    preferences, skipped = preference_records(traces, conversational=conversational)
    sft, sft_skipped = sft_records(traces, conversational=conversational)
    os.makedirs(workdir, exist_ok=True)
    write_jsonl(preferences, os.path.join(workdir, PREFERENCES_FILE))
    write_jsonl(sft, os.path.join(workdir, SFT_FILE))
    write_jsonl(traces, os.path.join(workdir, TRACE_FILE))
    with open(os.path.join(workdir, "config.json"), "w") as handle:
        handle.write(config.to_json_best_effort(indent=2))
    summary = {"prompts": len(traces), "rounds": config.rounds, "preference_pairs": len(preferences),
               **{f"skipped_{reason}": count for reason, count in skipped.items()},
               "sft_records": len(sft), "sft_skipped": sft_skipped, "truncated_requests": complete.truncated,
               "seconds": round(time.time() - started, 1)}
    with open(os.path.join(workdir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    reasons = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in skipped.items())
    return (f"constitutional: {len(traces)} prompts × {config.rounds} round(s) → {len(preferences)} preference pairs "
            f"(skipped: {reasons}), {len(sft)} sft records, {complete.truncated} requests cut to fit max_seq_len, in "
            f"{summary['seconds']} s; outputs in {workdir} ({PREFERENCES_FILE}, {SFT_FILE}, {TRACE_FILE})")
