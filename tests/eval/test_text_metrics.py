"""The text metrics of `flaxalign.eval.text_metrics` on hand-made inputs whose values are worked out by hand."""

import math

import pytest

from flaxalign.eval import text_metrics as tm


def test_distinct_n_counts_unique_ngrams_over_all_texts():
    texts = ["a b a b", "a c"]
    # unigrams: a b a b a c → 6, unique {a, b, c} = 3
    assert tm.distinct_n(texts, 1) == pytest.approx(3 / 6)
    # bigrams: (a b) (b a) (a b) | (a c) → 4, unique 3 (none crosses from one text into the next)
    assert tm.distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert tm.distinct_n(["one two three"], 3) == 1.0
    assert tm.distinct_n(["", "short"], 2) == 0.0
    assert tm.distinct_n([], 1) == 0.0


def test_repeated_ngram_rate_is_the_mean_fraction_of_repeats_within_each_text():
    # "a b c a b c a b c": trigrams abc bca cab abc bca cab abc → 7, 3 unique, 4 repeats
    loop = "a b c a b c a b c"
    assert tm.repeated_ngram_rate([loop], 3) == pytest.approx(4 / 7)
    # a text without repeats counts 0; one with fewer than 3 words is left out of the mean
    assert tm.repeated_ngram_rate([loop, "w x y z", "too short"], 3) == pytest.approx((4 / 7 + 0) / 2)
    assert tm.repeated_ngram_rate(["the the the"], 1) == pytest.approx(2 / 3)
    # repeats across texts are not repeats
    assert tm.repeated_ngram_rate(["a b c", "a b c"], 3) == 0.0
    assert tm.repeated_ngram_rate(["hi"], 3) == 0.0


def test_self_bleu_of_identical_texts_is_one_and_of_disjoint_texts_zero():
    same = ["the cat sat on the mat today"] * 3
    assert tm.self_bleu(same) == pytest.approx(1.0)
    disjoint = ["alpha beta gamma delta epsilon", "one two three four five", "red green blue cyan magenta"]
    assert tm.self_bleu(disjoint) == 0.0
    assert tm.self_bleu(["just one text"]) == 0.0
    partial = tm.self_bleu(["the cat sat on the mat", "the cat sat on a rug", "a dog ran in the park"])
    assert 0.0 < partial < 1.0


def test_self_bleu_is_the_mean_bleu_of_each_text_against_the_others():
    texts = ["the cat sat on the mat", "the cat sat on a rug by the door", "a dog ran in the park", "", "the the the",
             "the cat sat on the mat", "on the mat the cat sat"]
    words = [t.split() for t in texts]
    expected = sum(tm.bleu(w, words[:i] + words[i + 1:]) for i, w in enumerate(words)) / len(words)
    assert tm.self_bleu(texts) == pytest.approx(expected, rel=1e-12)
    assert 0.0 < expected < 1.0


def test_bleu_by_hand_with_smoothing_and_brevity_penalty():
    hyp, ref = ["a", "b", "c"], ["a", "b", "d", "e"]
    # p1 = 2/3; p2 = (1 + 1)/(2 + 1) (ab matches, bc not); p3 = (0 + 1)/(1 + 1); p4: too short → 1
    # c = 3 < r = 4: BP = exp(1 − 4/3)
    expected = math.exp(1 - 4 / 3) * math.exp((math.log(2 / 3) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert tm.bleu(hyp, [ref]) == pytest.approx(expected)
    # clipping: "the the the" against "the cat" has p1 = 1/3
    assert tm.bleu(["the"] * 3, [["the", "cat"]], max_n=1) == pytest.approx(1 / 3)
    assert tm.bleu([], [ref]) == 0.0


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.", "i cannot do this", "As an AI, I have no opinions.",
    "Sorry, but no.", "I am not able to comply.", "I\u2019m unable to answer that.", "Well... I won't."])
def test_refusals_are_detected(text):
    assert tm.refusal(text)


@pytest.mark.parametrize("text", ["The answer is 12.", "I cannotate", "As an AIrline pilot", "HI can't", ""])
def test_non_refusals_and_word_boundaries(text):
    assert not tm.refusal(text)


def test_refusal_rate():
    assert tm.refusal_rate(["I cannot.", "Sure: 4.", "As a language model, no.", "5"]) == 0.5
    assert tm.refusal_rate([]) == 0.0


def test_exact_match_rate_reuses_exact_answer_and_skips_missing_answers():
    completions = ["The answer is 7.", "It is 12", "The answer is Paris.", "whatever"]
    accuracy, n = tm.exact_match_rate(completions, ["7", "13", "Paris", None])
    assert (accuracy, n) == (pytest.approx(2 / 3), 3)
    assert tm.exact_match_rate(["x"], [None]) == (0.0, 0)


def test_win_rate_with_ties_and_margin():
    scores = [1.0, 2.0, 3.0, 0.5, 1.0]
    reference = [0.0, 2.0, 4.0, 0.45, 1.0]
    result = tm.win_rate(scores, reference)
    assert result == {"win_rate": 2 / 5, "tie_rate": 2 / 5, "loss_rate": 1 / 5,
                      "win_rate_ties_half": pytest.approx(3 / 5), "n": 5}
    wide = tm.win_rate(scores, reference, tie_margin=0.1)  # 0.5 vs 0.45 becomes a tie
    assert (wide["win_rate"], wide["tie_rate"], wide["loss_rate"]) == (1 / 5, 3 / 5, 1 / 5)
    assert tm.win_rate([], [])["n"] == 0
    with pytest.raises(ValueError, match="2 scores for 1"):
        tm.win_rate([1, 2], [1])


def test_length_stats():
    assert tm.length_stats([2, 4, 4, 4, 5, 5, 7, 9]) == {"mean": 5.0, "std": 2.0, "min": 2.0, "max": 9.0}
    assert tm.length_stats([]) == {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
