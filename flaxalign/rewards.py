"""Reward functions for GRPO, RLOO and PPO: plain Python callables over decoded text.

A reward function is `fn(prompts, completions, **columns) -> sequence of floats`, one float per completion.
`prompts` and `completions` are lists of strings of the same length B (a prompt repeats once per completion
sampled for it); `columns` are the prompt records' other fields as lists aligned with the completions (e.g.
`answer=[...]`), and a function must accept `**kwargs` for the columns it does not use.  NaN means "not
applicable" (e.g. a record without an answer); `score_completions` passes it through and the caller decides.

Built-ins (`BUILTIN_REWARDS`), for verifiable integer answers like `builtin:arithmetic_prompts`:

* `exact_answer`: 1.0 when the completion's answer (`extract_answer`) equals the record's answer, else 0.0;
* `answer_format`: 1.0 when the completion is exactly "The answer is N." (N an integer), else 0.0;
* `answer_closeness`: 1 / (1 + |predicted − answer|), shaped partial credit; 0.0 without a number.

`resolve_reward_functions` turns config specs (a built-in name or "package.module:function") into callables.
"""

import importlib
import math
import re
from collections.abc import Callable

import numpy as np

from flaxalign import errors


class RewardFunctionError(errors.FlaxalignError):
    """A reward function raised an exception or returned something other than one float per completion."""


# A number not glued to a word or a decimal point before it ("x2" and the "5" of "3.5" are not numbers).
_NUMBER = re.compile(r"(?<![\w.])([-+]?)(\d+)(\.\d+)?")
# "answer is" (any case, optionally "answer is:") right before a number.
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*$", re.IGNORECASE)
# The phrase after the last "answer is", up to a final period, for answers that are not integers.
_ANSWER_PHRASE = re.compile(r"answer\s+is\s*:?\s*(.*?)\s*\.?\s*$", re.IGNORECASE | re.DOTALL)
# How far before a number "answer is" is looked for (a bound keeps long completions linear).
_ANSWER_IS_WINDOW = 200
_INTEGER = re.compile(r"\s*([-+]?)(\d+)\s*")
_FORMAT = re.compile(r"The answer is -?\d+\.")
# int() refuses longer digit strings (Python's integer-string limit); such numbers are never close to an answer.
_MAX_DIGITS = 4000


def _normalise_integer(sign: str, digits: str) -> str:
    """The canonical text of an integer: no "+", no leading zeros, no "-0" (string work, so any length)."""
    digits = digits.lstrip("0") or "0"
    return "-" + digits if sign == "-" and digits != "0" else digits


def extract_answer(completion: str) -> str | None:
    """The integer a completion gives as its answer, normalised ("007" → "7", "-0" → "0"), or None.

    That is the last integer right after "answer is" (any case, e.g. "The answer is -12." → "-12"), else the last
    integer in the text.  Decimals such as "3.5" are not integers and are skipped.
    """
    last = after_answer_is = None
    for match in _NUMBER.finditer(completion):
        if match.group(3):
            continue
        last = _normalise_integer(match.group(1), match.group(2))
        if _ANSWER_IS.search(completion, max(0, match.start() - _ANSWER_IS_WINDOW), match.start()):
            after_answer_is = last
    return after_answer_is if after_answer_is is not None else last


def _parse_integer(text) -> str | None:
    """The normalised integer when `text` is an integer string (surrounding spaces allowed), else None."""
    match = _INTEGER.fullmatch(text) if isinstance(text, str) else None
    return _normalise_integer(match.group(1), match.group(2)) if match else None


def _answer_column(name, completions, answer):
    """Checks the `answer` column of a built-in that needs it and returns it as a list."""
    if answer is None:
        raise ValueError(f"{name} needs an 'answer' column")
    answer = list(answer)
    if len(answer) != len(completions):
        raise ValueError(f"{name} got {len(answer)} answers for {len(completions)} completions")
    return answer


def exact_answer(prompts, completions, answer=None, **_) -> list[float]:
    """1.0 where the completion's answer equals the reference answer, 0.0 elsewhere, NaN where it is None.

    An integer answer is compared with `extract_answer(completion)` after the same normalisation.  Any other
    answer is compared, stripped, with the stripped completion and with the phrase after its last "answer is"
    (without a final period), so "The answer is Paris." matches "Paris".  Raises ValueError without an
    `answer` column.
    """
    del prompts
    answers = _answer_column("exact_answer", completions, answer)
    rewards = []
    for completion, reference in zip(completions, answers):
        if reference is None:
            rewards.append(math.nan)
            continue
        integer = _parse_integer(reference)
        if integer is not None:
            rewards.append(float(extract_answer(completion) == integer))
            continue
        reference = str(reference).strip()
        phrase = _ANSWER_PHRASE.findall(completion)
        candidates = {completion.strip()} | ({phrase[-1].strip()} if phrase else set())
        rewards.append(float(reference in candidates))
    return rewards


def answer_format(prompts, completions, **_) -> list[float]:
    """1.0 where the stripped completion is exactly "The answer is N." (N an integer, optionally negative)."""
    del prompts
    return [float(_FORMAT.fullmatch(completion.strip()) is not None) for completion in completions]


def answer_closeness(prompts, completions, answer=None, **_) -> list[float]:
    """1 / (1 + |predicted − answer|) with predicted = `extract_answer(completion)`; 0.0 where the completion has
    no integer; NaN where the answer is None or not an integer.  Raises ValueError without an `answer` column."""
    del prompts
    answers = _answer_column("answer_closeness", completions, answer)
    rewards = []
    for completion, reference in zip(completions, answers):
        target = _parse_integer(reference)
        if target is None:
            rewards.append(math.nan)
            continue
        predicted = extract_answer(completion)
        if predicted is None:
            rewards.append(0.0)
        elif predicted == target:
            rewards.append(1.0)
        elif max(len(predicted), len(target)) > _MAX_DIGITS:
            rewards.append(0.0)  # a distance of at least 10**(_MAX_DIGITS - 1): 0 in float64
        else:
            rewards.append(1.0 / (1 + abs(int(predicted) - int(target))))
    return rewards


BUILTIN_REWARDS = {
    "exact_answer": exact_answer,
    "answer_format": answer_format,
    "answer_closeness": answer_closeness,
}


def resolve_reward_functions(specs) -> list[tuple[str, Callable]]:
    """[(name, function)] for reward function specs, in order.

    Each spec is a name in `BUILTIN_REWARDS` or "package.module:function" (the function may be a dotted
    attribute path, "module:Class.method"); the name is the spec itself.  A single string is read as a
    comma-separated list.  Raises ConfigError when there are no specs, a spec is listed twice, or a spec is
    unknown, cannot be imported or is not callable.
    """
    if isinstance(specs, str):
        specs = [spec.strip() for spec in specs.split(",") if spec.strip()]
    specs = list(specs or ())
    if not specs:
        raise errors.ConfigError(
            f"no reward functions are given; name at least one built-in ({_builtins()}) or 'package.module:function'."
        )
    resolved = []
    for spec in specs:
        if any(name == spec for name, _ in resolved):
            raise errors.ConfigError(f"reward function '{spec}' is listed twice; list each function once.")
        resolved.append((spec, _resolve(spec)))
    return resolved


def _builtins():
    return ", ".join(BUILTIN_REWARDS)


def _resolve(spec):
    """The callable of one spec, or ConfigError naming it."""
    if not isinstance(spec, str):
        raise errors.ConfigError(
            f"reward function spec {spec!r} is a {type(spec).__name__}, not a string; give a built-in "
            f"({_builtins()}) or 'package.module:function'."
        )
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, colon, attribute = spec.partition(":")
    if not (colon and module_name.strip() and attribute.strip()):
        raise errors.ConfigError(
            f"unknown reward function '{spec}'; give a built-in ({_builtins()}) or 'package.module:function'."
        )
    try:
        target = importlib.import_module(module_name.strip())
    except Exception as error:  # importing user code can raise anything
        raise errors.ConfigError(
            f"reward function '{spec}': cannot import module '{module_name.strip()}' ({type(error).__name__}: "
            f"{error}); built-ins are {_builtins()}."
        ) from error
    for part in attribute.strip().split("."):
        if not hasattr(target, part):
            raise errors.ConfigError(
                f"reward function '{spec}': '{module_name.strip()}' has no attribute '{attribute.strip()}'; "
                f"built-ins are {_builtins()}."
            )
        target = getattr(target, part)
    if not callable(target):
        raise errors.ConfigError(
            f"reward function '{spec}' is a {type(target).__name__}, not a callable; built-ins are {_builtins()}."
        )
    return target


def score_completions(functions, weights, prompts, completions,
                      columns: dict[str, list]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(total, {name: rewards}): every function's rewards for the B completions and their weighted sum.

    `functions` is `resolve_reward_functions`' list; `weights` None (all 1.0) or one number per function
    (ConfigError otherwise).  Each function is called as `fn(prompts, completions, **columns)`; `columns` maps
    field names to lists of B values.  total = Σ_i w_i · r_i in float64 [B], where functions weighted 0 are left
    out (so a NaN of a function that is only logged does not reach the total); other NaNs are passed through.
    Raises RewardFunctionError (chained to the cause) when a function raises, or returns something that is
    not B floats.
    """
    functions = list(functions)
    prompts, completions = list(prompts), list(completions)
    size = len(completions)
    if len(prompts) != size:
        raise ValueError(f"score_completions got {len(prompts)} prompts for {size} completions.")
    columns = {key: list(values) for key, values in (columns or {}).items()}
    for key, values in columns.items():
        if len(values) != size:
            raise ValueError(f"column '{key}' has {len(values)} values for {size} completions.")
    weights = _weights(weights, functions)
    total = np.zeros(size, np.float64)
    per_function = {}
    for (name, function), weight in zip(functions, weights):
        try:
            result = function(list(prompts), list(completions), **{key: list(v) for key, v in columns.items()})
        except Exception as error:  # any failure of user code, named
            raise RewardFunctionError(f"reward function '{name}' raised {type(error).__name__}: {error}") from error
        rewards = _as_rewards(name, result, size)
        per_function[name] = rewards
        if weight != 0.0:
            total += weight * rewards
    return total, per_function


def _weights(weights, functions):
    """The weights as floats, one per function."""
    if weights is None:
        return [1.0] * len(functions)
    weights = list(weights)
    if len(weights) != len(functions):
        raise errors.ConfigError(
            f"{len(weights)} reward weights are given for {len(functions)} reward functions; give one weight "
            "per function or none."
        )
    try:
        values = [float(weight) for weight in weights]
    except (TypeError, ValueError) as error:
        raise errors.ConfigError(f"reward weights must be numbers, got {weights!r} ({error}).") from None
    if not all(math.isfinite(value) for value in values):
        raise errors.ConfigError(f"reward weights must be finite numbers, got {weights!r}.")
    return values


def _as_rewards(name, result, size):
    """`result` as float64 [size], or RewardFunctionError naming the function and what is wrong."""
    if result is None or isinstance(result, (str, bytes, dict, set, frozenset)) or not _iterable(result):
        raise RewardFunctionError(
            f"reward function '{name}' returned {type(result).__name__}, not a sequence of {size} floats."
        )
    values = result if isinstance(result, np.ndarray) else list(result)
    if not isinstance(values, np.ndarray) and any(isinstance(value, (str, bytes)) for value in values):
        raise RewardFunctionError(f"reward function '{name}' returned strings, not floats.")
    try:
        rewards = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise RewardFunctionError(
            f"reward function '{name}' returned values that are not floats ({error})."
        ) from error
    if rewards.shape != (size,):
        raise RewardFunctionError(
            f"reward function '{name}' returned {_shape_text(rewards)} for {size} completions; return one float "
            "per completion."
        )
    return rewards


def _iterable(value):
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _shape_text(rewards):
    if rewards.ndim == 1:
        return f"{rewards.shape[0]} values"
    return f"an array of shape {rewards.shape}"
