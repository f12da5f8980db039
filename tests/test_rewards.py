"""Tests of flaxalign.rewards: answer extraction, the built-in rewards, resolving specs and scoring errors."""

import math

import numpy as np
import pytest

from flaxalign import rewards
from flaxalign.errors import ConfigError, FlaxalignError
from flaxalign.rewards import (
    BUILTIN_REWARDS,
    RewardFunctionError,
    answer_closeness,
    answer_format,
    exact_answer,
    extract_answer,
    resolve_reward_functions,
    score_completions,
)


def length_reward(prompts, completions, **_):
    """A user reward function resolved through "tests.test_rewards:length_reward"."""
    return [float(len(completion)) for completion in completions]


NOT_CALLABLE = 3


def _resolve_one(spec):
    return resolve_reward_functions([spec])[0]


# ----------------------------------------------------------------------------
# extract_answer and the built-ins


@pytest.mark.parametrize("completion, expected", [
    ("The answer is -12.", "-12"),
    ("THE ANSWER IS 95", "95"),
    ("answer is: 7", "7"),
    ("The answer is 007.", "7"),
    ("The answer is -0.", "0"),
    ("The answer is +5.", "5"),
    ("The answer is 4. No wait, 5.", "4"),  # "answer is" wins over the last integer
    ("First 3, then 8 and finally 21 apples.", "21"),  # else the last integer
    ("37 + 58 = 95", "95"),
    ("It is 3.5 or so", None),  # a decimal is not an integer
    ("x2 and y3", None),  # digits glued to a word are not numbers
    ("I do not know.", None),
    ("", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_exact_answer():
    completions = ["The answer is 95.", "95", "The answer is 96.", "no idea", "The answer is 0095.", "It is -3"]
    answers = ["95", "95", "95", "95", " 95 ", "-3"]
    assert exact_answer([""] * 6, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_exact_answer_non_integer_answers_compare_stripped_strings():
    completions = ["The answer is Paris.", "  Paris ", "Lyon", "The answer is paris."]
    assert exact_answer([""] * 4, completions, answer=["Paris"] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_exact_answer_without_an_answer():
    with pytest.raises(ValueError, match="exact_answer needs an 'answer' column"):
        exact_answer(["q"], ["The answer is 1."])
    scores = exact_answer(["q", "q"], ["The answer is 1.", "The answer is 1."], answer=["1", None])
    assert scores[0] == 1.0 and math.isnan(scores[1])  # a record without an answer: not applicable


def test_answer_format():
    completions = ["The answer is 95.", "  The answer is -4.\n", "The answer is 95", "the answer is 95.",
                   "The answer is 95. Sure.", "The answer is 9.5.", "The answer is x."]
    assert answer_format([""] * 7, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_answer_closeness():
    completions = ["The answer is 10.", "The answer is 12.", "7", "The answer is -10.", "nothing", "5"]
    answers = ["10", "10", "10", "10", "10", None]
    scores = answer_closeness([""] * 6, completions, answer=answers)
    assert scores[:5] == [1.0, 1 / 3, 1 / 4, 1 / 21, 0.0]
    assert math.isnan(scores[5])
    with pytest.raises(ValueError, match="answer_closeness needs an 'answer' column"):
        answer_closeness(["q"], ["1"])
    huge = "9" * 5000  # longer than Python's int() digit limit
    assert answer_closeness(["q", "q"], [huge, huge], answer=["1", huge]) == [0.0, 1.0]


def test_builtins_ignore_extra_columns():
    for function in BUILTIN_REWARDS.values():
        scores = function(["What is 1 + 1?"], ["The answer is 2."], answer=["2"], source=["x"])
        assert scores == [1.0]


# ----------------------------------------------------------------------------
# resolve_reward_functions


def test_resolve_builtins_and_module_functions():
    resolved = resolve_reward_functions(["exact_answer", "tests.test_rewards:length_reward", "answer_format"])
    assert [name for name, _ in resolved] == ["exact_answer", "tests.test_rewards:length_reward", "answer_format"]
    assert resolved[0][1] is exact_answer and resolved[2][1] is answer_format
    assert resolved[1][1](["q"], ["abc"]) == [3.0]
    assert resolve_reward_functions("answer_format, exact_answer") == [("answer_format", answer_format),
                                                                        ("exact_answer", exact_answer)]
    assert _resolve_one("math:isfinite")[1] is math.isfinite
    assert _resolve_one("flaxalign.rewards:extract_answer")[1] is extract_answer


@pytest.mark.parametrize("spec, message", [
    ("exact", "unknown reward function 'exact'.*exact_answer, answer_format, answer_closeness"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'.*built-ins are exact_answer"),
    ("math:no_such_function", "'math' has no attribute 'no_such_function'"),
    ("tests.test_rewards:NOT_CALLABLE", "'tests.test_rewards:NOT_CALLABLE' is a int, not a callable"),
    ("math:pi", "'math:pi' is a float, not a callable"),
    (":f", "unknown reward function ':f'"),
    ("math:", "unknown reward function 'math:'"),
])
def test_resolve_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_reward_functions([spec])


def test_resolve_needs_specs_once_each():
    for empty in ([], "", None):
        with pytest.raises(ConfigError, match="no reward functions"):
            resolve_reward_functions(empty)
    with pytest.raises(ConfigError, match="'exact_answer' is listed twice"):
        resolve_reward_functions(["exact_answer", "exact_answer"])


# ----------------------------------------------------------------------------
# score_completions


PROMPTS = ["What is 2 + 3?", "What is 2 + 3?", "What is 4 * 4?"]
COMPLETIONS = ["The answer is 5.", "I think 6", "The answer is 16."]
COLUMNS = {"answer": ["5", "5", "16"]}


def test_score_weights_and_per_function_rewards():
    functions = resolve_reward_functions(["exact_answer", "answer_format", "answer_closeness"])
    total, per_function = score_completions(functions, None, PROMPTS, COMPLETIONS, COLUMNS)
    np.testing.assert_array_equal(per_function["exact_answer"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(per_function["answer_format"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(per_function["answer_closeness"], [1.0, 0.5, 1.0])
    assert total.dtype == np.float64 and total.shape == (3,)
    np.testing.assert_array_equal(total, [3.0, 0.5, 3.0])
    total, _ = score_completions(functions, [1.0, 0.5, -2.0], PROMPTS, COMPLETIONS, COLUMNS)
    np.testing.assert_allclose(total, [1.0 + 0.5 - 2.0, -1.0, 1.0 + 0.5 - 2.0])


def test_score_passes_the_columns():
    seen = {}

    def spy(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, **columns)
        return np.zeros(len(completions), np.float32)

    score_completions([("spy", spy)], None, PROMPTS, COMPLETIONS, {"answer": ("5", "5", "16"), "level": [1, 2, 3]})
    assert seen == {"prompts": PROMPTS, "completions": COMPLETIONS, "answer": ["5", "5", "16"], "level": [1, 2, 3]}


def test_score_weight_count_must_match():
    functions = resolve_reward_functions(["exact_answer", "answer_format"])
    with pytest.raises(ConfigError, match="1 reward weights are given for 2 reward functions"):
        score_completions(functions, [1.0], PROMPTS, COMPLETIONS, COLUMNS)
    with pytest.raises(ConfigError, match="finite"):
        score_completions(functions, [1.0, math.inf], PROMPTS, COMPLETIONS, COLUMNS)


def test_nan_passes_through_unless_weighted_zero():
    def partial(prompts, completions, **_):
        return [1.0, math.nan, 0.5]

    functions = [("partial", partial), ("answer_format", answer_format)]
    total, per_function = score_completions(functions, None, PROMPTS, COMPLETIONS, COLUMNS)
    assert np.isnan(per_function["partial"][1]) and np.isnan(total[1])
    np.testing.assert_array_equal(total[[0, 2]], [2.0, 1.5])
    total, _ = score_completions(functions, [0.0, 1.0], PROMPTS, COMPLETIONS, COLUMNS)
    np.testing.assert_array_equal(total, [1.0, 0.0, 1.0])  # weight 0: logged, not summed


def test_a_raising_function_is_wrapped_with_its_name():
    def broken(prompts, completions, **_):
        return [1 / 0 for _ in completions]

    with pytest.raises(RewardFunctionError, match="reward function 'broken' raised ZeroDivisionError: division by") \
            as caught:
        score_completions([("exact_answer", exact_answer), ("broken", broken)], None, PROMPTS, COMPLETIONS,
                          COLUMNS)
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    assert isinstance(caught.value, FlaxalignError)


def test_a_missing_column_is_wrapped():
    with pytest.raises(RewardFunctionError, match="'exact_answer' raised ValueError: exact_answer needs an 'answer'"):
        score_completions(resolve_reward_functions(["exact_answer"]), None, PROMPTS, COMPLETIONS, {})


@pytest.mark.parametrize("result, message", [
    ([1.0, 2.0], "'bad' returned 2 values for 3 completions"),
    (np.zeros((3, 1)), r"'bad' returned an array of shape \(3, 1\) for 3 completions"),
    (None, "'bad' returned NoneType, not a sequence of 3 floats"),
    (1.0, "'bad' returned float, not a sequence of 3 floats"),
    ("1.0", "'bad' returned str"),
    ([1.0, "high", 0.0], "'bad' returned strings, not floats"),
    ([1.0, object(), 0.0], "'bad' returned values that are not floats"),
    ([1.0, [2.0], 0.0], "'bad' returned values that are not floats"),
])
def test_bad_results_are_named(result, message):
    def bad(prompts, completions, **_):
        return result

    with pytest.raises(RewardFunctionError, match=message):
        score_completions([("bad", bad)], None, PROMPTS, COMPLETIONS, COLUMNS)


def test_generators_and_arrays_are_accepted():
    functions = [("gen", lambda p, c, **_: (float(i) for i in range(len(c)))),
                 ("ints", lambda p, c, **_: np.arange(len(c))), ("bools", lambda p, c, **_: [True, False, True])]
    total, per_function = score_completions(functions, None, PROMPTS, COMPLETIONS, COLUMNS)
    np.testing.assert_array_equal(total, [1.0, 2.0, 5.0])
    assert all(values.dtype == np.float64 for values in per_function.values())


def test_score_checks_aligned_inputs():
    with pytest.raises(ValueError, match="2 prompts for 3 completions"):
        score_completions([("answer_format", answer_format)], None, PROMPTS[:2], COMPLETIONS, {})
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 3 completions"):
        score_completions([("answer_format", answer_format)], None, PROMPTS, COMPLETIONS, {"answer": ["1", "2"]})


def test_module_exports():
    assert set(BUILTIN_REWARDS) == {"exact_answer", "answer_format", "answer_closeness"}
    assert issubclass(rewards.RewardFunctionError, FlaxalignError)
