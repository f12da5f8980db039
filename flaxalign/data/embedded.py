"""Built-in records for the demo and the tests: no download, generated at run time.

* `sft_pairs`: SFT prompt/completion pairs from the standard library's own
  documentation.  For each public function, class and public method that the
  modules of `corpus.STDLIB_MODULES` define, the prompt asks what it does
  ("What does `json.dumps(obj, *, skipkeys, ...)` do?") and the completion is
  the first sentence of its docstring.  Only parameter names appear in the
  signature: default values can be object addresses or paths that differ
  between runs and machines.
* `arithmetic_tasks`: verifiable prompts "What is 37 + 58?" with the exact
  answer "95", for PPO/GRPO rewards.
* `arithmetic_sft` (`builtin:arithmetic_sft`): the same questions as SFT
  pairs with the completion "The answer is 95." — the warm start of the RL
  stages' verifiable task (use another seed than the RL prompts').
* `arithmetic_preferences`: the same questions with chosen = "The answer is
  95." and rejected = a wrong answer, for reward models and DPO.
* `arithmetic_kto`: the same pairs unpaired for KTO (`unpair_preferences`):
  the chosen answer labelled true, then the rejected one labelled false.

Everything depends only on the arguments and the Python build.  `read_records`
reads them through `builtin:` specs (`BUILTIN_KINDS`); the arithmetic specs
and `builtin:sft` take optional parameters, e.g.
`builtin:arithmetic_prompts?n=512&seed=1` or `builtin:sft?n=1000`; `chat=1` on
the prompt, sft and preference specs writes the question as a user message
and the answers as assistant messages, for chat-tuned models.
"""

import functools
import gzip
import inspect
import json
import random
import re
import urllib.parse
import warnings
import zlib

from flaxalign.data.atomic import write_atomically
from flaxalign.data.corpus import (
    PATCHED_ELSEWHERE,
    STDLIB_MODULES,
    _defined_in,
    _import_quietly,
    stdlib_corpus,
)
from flaxalign.errors import DataError

BUILTIN_PREFIX = "builtin:"
BUILTIN_KINDS = {
    "builtin:stdlib": "text",
    "builtin:sft": "sft",
    "builtin:arithmetic_prompts": "prompt",
    "builtin:arithmetic_sft": "sft",
    "builtin:arithmetic_preferences": "preference",
    "builtin:arithmetic_kto": "kto",
}
DEFAULT_ARITHMETIC_N = 4096
DEFAULT_ARITHMETIC_SEED = 0

# Completions outside these bounds are fragments ("Foo.") or whole paragraphs.
MIN_SENTENCE_CHARS = 20
MAX_SENTENCE_CHARS = 300
# Longer parameter lists end in "..." so that prompts stay short.
MAX_SIGNATURE_CHARS = 60

# A first docstring paragraph like "S.find(sub[, start[, end]]) -> int" is a
# signature written by hand in C modules, not prose.
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
# The end of the first sentence: ". " before a capital letter, or the end.
_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)[.!?](?=\s+[A-Z`'\"(]|$)")


def write_jsonl(records, path: str) -> None:
    """Writes records as JSON lines (UTF-8, gzip if `path` ends in .gz), atomically."""
    data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    if path.endswith(".gz"):
        # mtime=0 keeps the file identical for identical records.
        data = gzip.compress(data, mtime=0)
    write_atomically(path, lambda handle: handle.write(data))


def sft_pairs(max_examples: int | None = None) -> list[dict]:
    """Returns stdlib "What does `f(...)` do?" -> first-sentence pairs, in fixed order.

    `max_examples` (None = all) keeps the first that many.
    """
    pairs = [dict(pair) for pair in _all_sft_pairs()]
    return pairs if max_examples is None else pairs[:max_examples]


@functools.cache
def _all_sft_pairs():
    """All pairs as a tuple of (key, value) tuples, computed once per process."""
    pairs = []
    seen = set()
    for module_name in STDLIB_MODULES:
        module = _import_quietly(module_name)
        if module is None:
            continue
        with warnings.catch_warnings():
            # Reading some attributes (typing.io) warns about deprecation.
            warnings.simplefilter("ignore")
            for prompt, doc in _documented_names(module):
                completion = first_sentence(doc)
                if completion and prompt not in seen:
                    seen.add(prompt)
                    pairs.append((("prompt", prompt), ("completion", completion)))
    return tuple(pairs)


def _documented_names(module):
    """Yields (prompt, docstring) for the public functions, classes and methods of a module."""
    for name, value in sorted(vars(module).items()):
        if (name.startswith("_") or getattr(value, "__module__", None) != module.__name__
                or f"{module.__name__}.{name}" in PATCHED_ELSEWHERE):
            continue  # Private, re-exported and documented where it is defined, or replaced by other packages.
        dotted = f"{module.__name__}.{name}"
        if inspect.isclass(value):
            yield f"What is the class `{dotted}`?", _own_doc(value)
            for member_name, member in sorted(vars(value).items()):
                function = _unwrap(member)
                # _defined_in skips methods other packages patch onto stdlib
                # classes (transformers on logging.Logger).
                if (not member_name.startswith("_") and inspect.isroutine(function)
                        and _defined_in(member, module.__name__)):
                    yield _function_prompt(f"{dotted}.{member_name}", function), _own_doc(function)
        elif inspect.isroutine(value):
            yield _function_prompt(dotted, value), _own_doc(value)


def _unwrap(member):
    """The function inside a classmethod/staticmethod."""
    return member.__func__ if isinstance(member, (classmethod, staticmethod)) else member


def _own_doc(obj):
    """obj.__doc__ if it is a string (slots can make it a descriptor), else ""."""
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else ""


def _function_prompt(dotted, function):
    return f"What does `{dotted}({_parameter_names(function)})` do?"


def _parameter_names(function):
    """The parameters of a function by name only ("a, /, b, *, c, **kw")."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return "..."  # C functions without a text signature.
    parts = [str(parameter.replace(default=parameter.empty, annotation=parameter.empty))
             for parameter in signature.parameters.values()]
    if parts and parts[0] in ("self", "cls"):
        parts = parts[1:]
    text = ", ".join(_with_markers(parts, signature))
    if len(text) > MAX_SIGNATURE_CHARS:
        text = text[: text.rfind(", ", 0, MAX_SIGNATURE_CHARS)] + ", ..."
    return text


def _with_markers(parts, signature):
    """`str(signature)`'s "/" and "*" markers, rebuilt for the name-only parts."""
    params = list(signature.parameters.values())
    params = params[len(params) - len(parts):]
    out = []
    for index, (part, param) in enumerate(zip(parts, params)):
        if param.kind == param.KEYWORD_ONLY and (index == 0 or params[index - 1].kind
                                                  not in (param.KEYWORD_ONLY, param.VAR_POSITIONAL)):
            out.append("*")
        out.append(part)
        following = params[index + 1].kind if index + 1 < len(params) else None
        if param.kind == param.POSITIONAL_ONLY and following != param.POSITIONAL_ONLY:
            out.append("/")
    return out


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first prose paragraph, or "" if unusable.

    Lines are joined with single spaces; a sentence shorter than
    MIN_SENTENCE_CHARS, longer than MAX_SENTENCE_CHARS or without a final
    period is unusable, and so is one that starts with "Deprecated".
    """
    paragraphs = [p for p in inspect.cleandoc(doc).split("\n\n") if p.strip()]
    while paragraphs and _SIGNATURE_LINE.match(paragraphs[0].strip().split("\n")[0]):
        paragraphs = paragraphs[1:]
    if not paragraphs:
        return ""
    text = " ".join(paragraphs[0].split())
    match = _SENTENCE_END.search(text)
    sentence = text[: match.end()] if match else ""
    if not sentence.endswith(".") or not MIN_SENTENCE_CHARS <= len(sentence) <= MAX_SENTENCE_CHARS:
        return ""
    if sentence.startswith("Deprecated"):
        return ""  # Says nothing about what the name does.
    return sentence


def arithmetic_tasks(n: int, seed: int = DEFAULT_ARITHMETIC_SEED, max_operand: int = 99,
                     split: str = "") -> list[dict]:
    """Returns n prompt records {"prompt": "What is 37 + 58?", "answer": "95"}.

    Operations are a + b and a - b with 0 <= b <= a <= 99 (answers are never
    negative) and a * b with 2 <= a, b <= 12, each a third of the time; `max_operand` < 99 gives an easier task
    (e.g. 9: single digits and factors up to 9). `split`: "" = any problem, "train" = never a problem of "test", a
    fixed tenth of the questions (chosen by a hash of the question), so that accuracy on "test" is held out.
    """
    rng = random.Random(seed)
    return [{"prompt": _question(a, op, b), "answer": str(value)}
            for a, op, b, value in _problems(rng, n, max_operand, split)]


def arithmetic_preferences(n: int, seed: int = DEFAULT_ARITHMETIC_SEED, max_operand: int = 99,
                           far: bool = False, split: str = "") -> list[dict]:
    """Returns n preference records about the questions of `arithmetic_tasks(n, seed, max_operand, split)`.

    chosen is "The answer is {correct}."; rejected is, half the time, the same
    sentence with an answer off by 1 to 3, else a hedging sentence with an
    answer off by 4 to 10. `far`: a third of the rejected answers are instead
    the chosen sentence with any other answer the task can have (0 to the
    largest sum or product), the mistakes of a model that has not learnt the
    arithmetic yet, so that a reward model learns to check the number.
    """
    rng = random.Random(seed)
    # A second generator, so that the questions equal arithmetic_tasks'.
    wrong_rng = random.Random(f"wrong answers {seed}")
    records = []
    largest = max(2 * max_operand, min(12, max_operand) ** 2)
    for a, op, b, value in _problems(rng, n, max_operand, split):
        if far and wrong_rng.random() < 1 / 3:
            rejected = f"The answer is {wrong_rng.choice([v for v in range(largest + 1) if v != value])}."
        else:
            rejected = _wrong_answer(wrong_rng, a, op, b, value)
        records.append({"prompt": _question(a, op, b), "chosen": f"The answer is {value}.", "rejected": rejected})
    return records


def unpair_preferences(records) -> list[dict]:
    """Returns the KTO records of string-form preference records (TRL's `unpair_preference_dataset`).

    Each {"prompt", "chosen", "rejected"} becomes {"prompt", "completion": chosen, "label": True} followed by
    {"prompt", "completion": rejected, "label": False}, so the output has twice as many records, interleaved.
    """
    unpaired = []
    for index, record in enumerate(records):
        parts = [record.get(name) for name in ("prompt", "chosen", "rejected")]
        if not all(isinstance(part, str) for part in parts):
            raise DataError(
                f"preference record {index} is not a string prompt/chosen/rejected record, so it cannot be "
                "unpaired into kto records."
            )
        prompt, chosen, rejected = parts
        unpaired.append({"prompt": prompt, "completion": chosen, "label": True})
        unpaired.append({"prompt": prompt, "completion": rejected, "label": False})
    return unpaired


def _problems(rng, n, max_operand, split):
    """n random problems of `_problem`, those of the other split redrawn (see `arithmetic_tasks`)."""
    if split and not _split_sizes(max_operand)[split]:
        raise DataError(f"operands up to max={max_operand} give no question of split={split}; use a larger max.")
    problems = []
    while len(problems) < n:
        problem = _problem(rng, max_operand)
        if not split or (split == "test") == _is_test_question(*problem[:3]):
            problems.append(problem)
    return problems


def _is_test_question(a, op, b):
    """Whether a problem is a "test" one: by a hash of its question with the operands of + and * in order, so that
    "What is 58 + 37?" is held out with "What is 37 + 58?"."""
    if op in "+*":
        a, b = sorted((a, b))
    return zlib.crc32(_question(a, op, b).encode()) % 10 == 0


@functools.cache
def _split_sizes(max_operand):
    """{"train": n, "test": n}: how many of the questions `_problem` can draw fall in each split."""
    top = max(2, min(12, max_operand))
    problems = [(a, "+", b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    problems += [(a, "-", b) for a in range(max_operand + 1) for b in range(a + 1)]
    problems += [(a, "*", b) for a in range(2, top + 1) for b in range(2, top + 1)]
    test = sum(_is_test_question(*problem) for problem in problems)
    return {"train": len(problems) - test, "test": test}


def _problem(rng, max_operand=99):
    """One random (a, op, b, a op b); + and - operands up to `max_operand`, * factors 2..min(12, max_operand)."""
    op = rng.choice("+-*")
    if op == "*":
        top = max(2, min(12, max_operand))
        a, b = rng.randint(2, top), rng.randint(2, top)
        return a, op, b, a * b
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return a, op, b, a - b
    return a, op, b, a + b


def _question(a, op, b):
    return f"What is {a} {op} {b}?"


def _wrong_answer(rng, a, op, b, value):
    """A wrong answer: a near miss in the chosen format, or a hedge further off."""
    if rng.random() < 0.5:
        return f"The answer is {value + rng.choice((-3, -2, -1, 1, 2, 3))}."
    wrong = value + rng.choice((-1, 1)) * rng.randint(4, 10)
    return f"Hmm, {a} {op} {b} is tricky. I think it is about {wrong}, but I am not sure."


def builtin_records(spec: str, kind: str) -> list[dict]:
    """Returns the records of a `builtin:NAME[?n=N&seed=S]` spec read as `kind`."""
    base, _, query = spec.partition("?")
    if base not in BUILTIN_KINDS:
        raise DataError(f"unknown built-in data {base!r}; built-ins are {', '.join(BUILTIN_KINDS)}.")
    if BUILTIN_KINDS[base] != kind:
        raise DataError(f"{base} holds {BUILTIN_KINDS[base]} records, not {kind} records.")
    params = _builtin_params(spec, query, allowed=_BUILTIN_PARAMS[base])
    if base == "builtin:stdlib":
        return [{"text": document} for document in stdlib_corpus()]
    if base == "builtin:sft":
        return sft_pairs(params.get("n"))
    n = params.get("n", DEFAULT_ARITHMETIC_N)
    seed = params.get("seed", DEFAULT_ARITHMETIC_SEED)
    max_operand = params.get("max", 99)
    split = params.get("split", "")
    if base == "builtin:arithmetic_prompts":
        tasks = arithmetic_tasks(n, seed, max_operand, split)
        return [t | {"prompt": _user(t["prompt"])} for t in tasks] if params.get("chat") else tasks
    if base == "builtin:arithmetic_sft":
        pairs = [(t["prompt"], f"The answer is {t['answer']}.") for t in arithmetic_tasks(n, seed, max_operand, split)]
        if params.get("chat"):
            return [{"messages": _user(prompt) + _assistant(completion)} for prompt, completion in pairs]
        return [{"prompt": prompt, "completion": completion} for prompt, completion in pairs]
    pairs = arithmetic_preferences(n, seed, max_operand, far=bool(params.get("far", 0)), split=split)
    if base == "builtin:arithmetic_kto":
        return unpair_preferences(pairs)
    if params.get("chat"):
        return [{"prompt": _user(r["prompt"]), "chosen": _assistant(r["chosen"]),
                 "rejected": _assistant(r["rejected"])} for r in pairs]
    return pairs


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


_BUILTIN_PARAMS = {
    "builtin:stdlib": (),
    "builtin:sft": ("n",),
    "builtin:arithmetic_prompts": ("n", "seed", "max", "chat", "split"),
    "builtin:arithmetic_sft": ("n", "seed", "max", "chat", "split"),
    "builtin:arithmetic_preferences": ("n", "seed", "max", "far", "chat", "split"),
    "builtin:arithmetic_kto": ("n", "seed", "max", "far", "split"),
}


def _builtin_params(spec, query, allowed):
    """Parses "n=512&seed=1" into ints (`split` stays a name), rejecting names not in `allowed`."""
    params = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name not in allowed:
            accepted = ", ".join(allowed) if allowed else "none"
            raise DataError(f"{spec}: unknown parameter {name!r} (accepted: {accepted}).")
        if name == "split":
            if value not in ("train", "test"):
                raise DataError(f"{spec}: parameter 'split' must be train or test, got {value!r}.")
            params[name] = value
            continue
        if not re.fullmatch(r"\d+", value) or (name in ("n", "max") and int(value) == 0):
            sign = "positive" if name in ("n", "max") else "non-negative"
            raise DataError(f"{spec}: parameter {name!r} must be a {sign} integer, got {value!r}.")
        params[name] = int(value)
    return params
