"""The model-based parts of `flaxalign eval` on tiny random models saved as HF directories: perplexity and
multiple-choice log-likelihoods against independent `apply_lm` computations, KL(π‖π_ref), bad input, and one
end-to-end `evaluate` (in process) plus one through the CLI."""

import importlib.util
import json
import os
import re
import shutil
import types

import jax
import numpy as np
import pytest

from flaxalign import errors, interop, models
from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.sources import read_records
from flaxalign.data.tokenizer import Tokenizer
from flaxalign.eval import evaluation as ev
from flaxalign.eval import likelihood
from tests import cli_helpers as cli
from tests import helpers

TEXT = ("The quick brown fox jumps over the lazy dog. Return a new list containing all items from the iterable in "
        "ascending order. A custom key function can be supplied to customize the sort order.")


def eval_config(**overrides):
    spec = importlib.util.spec_from_file_location("eval_config", os.path.join(cli.REPO, "configs/eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two random tiny policies ("a", "b") and two random reward models ("rm", "rm2") as HF directories sharing one
    SentencePiece tokenizer, and the numpy params of "a" and "b"."""
    root = tmp_path_factory.mktemp("eval_models")
    tokenizer = Tokenizer.train(stdlib_corpus(max_chars=20_000), str(root / "tokenizer.model"), vocab_size=400)
    config = helpers.tiny_model_config()
    params = {"a": helpers.random_params(config, seed=0), "b": helpers.random_params(config, seed=1)}
    dirs = {}
    for name in ("a", "b", "rm", "rm2"):
        dirs[name] = str(root / name)
        if name.startswith("rm"):
            seed = 2 if name == "rm" else 4
            head = {"kernel": np.random.default_rng(seed + 1).normal(size=config.d_model).astype(np.float32) * 0.3,
                    "bias": np.float32(0.1)}
            interop.save_hf(config, helpers.random_params(config, seed=seed), dirs[name], score_head=head,
                            pad_token_id=tokenizer.pad_id)
        else:
            interop.save_hf(config, params[name], dirs[name])
        shutil.copy(tokenizer.model_path, os.path.join(dirs[name], "tokenizer.model"))
    return types.SimpleNamespace(config=config, params=params, dirs=dirs, tokenizer=tokenizer,
                                 graphdef=models.abstract_model(config)[0],
                                 scorer=likelihood.make_scorer(models.abstract_model(config)[0], 16))


def target_logps(config, params, ids, start, width=48):
    """log p(ids[k] | ids[:k]) for k ≥ start, from `apply_lm` on the whole sequence (right-padded to `width`
    positions, which leaves real tokens' logits unchanged, so every call has one shape)."""
    inputs = np.zeros((1, width), np.int32)
    inputs[0, :len(ids) - 1] = ids[:-1]
    mask = (np.arange(width) < len(ids) - 1).astype(np.int32)[None]
    logits = np.asarray(interop.apply_lm(config, params, inputs, mask))[0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return np.array([logp[k - 1, ids[k]] for k in range(start, len(ids))])


def test_perplexity_is_exp_of_the_mean_nll_from_apply_lm(tiny, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(TEXT)
    tok = tiny.tokenizer
    result = likelihood.perplexity(tiny.scorer, tiny.params["a"], tok, str(path), window=16, batch_size=4)
    ids = [tok.bos_id] + tok.encode(read_records(str(path), "text")[0]["text"]) + [tok.eos_id]
    assert len(ids) > 3 * 16  # several windows, and a partial batch
    logps = np.concatenate([target_logps(tiny.config, tiny.params["a"], ids[k:k + 17], 1)
                            for k in range(0, len(ids) - 1, 16)])
    assert result["tokens"] == len(logps) == len(ids) - 1
    assert result["nll"] == pytest.approx(-logps.mean(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(-logps.mean()), rel=1e-5)


def test_perplexity_max_tokens_cuts_the_text(tiny, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(TEXT)
    result = likelihood.perplexity(tiny.scorer, tiny.params["a"], tiny.tokenizer, str(path), window=16,
                                   batch_size=4, max_tokens=20)
    assert result["tokens"] == 19


def test_multiple_choice_picks_the_choice_of_highest_log_likelihood(tiny, tmp_path):
    tok = tiny.tokenizer
    questions = [("What is 2 + 2?", ["4", "5", "twenty-two"]), ("Name a colour.", ["red", "the sky", "blue"])]
    expected = []
    for question, choices in questions:
        context = [tok.bos_id] + tok.encode(f"Question: {question}\nAnswer:")
        expected.append([target_logps(tiny.config, tiny.params["a"], context + tok.encode(" " + c),
                                      len(context)).sum() for c in choices])
    best = [int(np.argmax(e)) for e in expected]
    answers = [best[0], (best[1] + 1) % 3]  # the first question is answered right, the second wrong
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for (q, c), a in zip(questions, answers)))
    result = likelihood.multiple_choice(tiny.scorer, tiny.params["a"], tok, str(path), max_seq_len=256,
                                        batch_size=4)
    assert result["acc"] == 0.5 and result["questions"] == 2 and result["choices"] == 6
    sequences, starts = likelihood.mc_sequences(likelihood.read_mc_file(str(path)), tok,
                                                template=likelihood.DEFAULT_MC_TEMPLATE, prefix=" ", max_tokens=257)
    logp, count = likelihood.score_sequences(tiny.scorer, tiny.params["a"], sequences, starts, width=48,
                                             batch_size=4, pad_id=tok.pad_id)
    np.testing.assert_allclose(logp, np.concatenate(expected), rtol=1e-5, atol=1e-4)
    assert count.tolist() == [len(s) - k for s, k in zip(sequences, starts)]


def test_acc_norm_divides_by_the_characters_of_the_choice():
    # choice 0: −4 over 2 characters (−2 per char); choice 1: −6 over 10 (−0.6 per char)
    result = likelihood.choice_accuracy([[-4.0, -6.0], [-1.0, -3.0]], [[2, 10], [5, 5]], [1, 0])
    assert result == {"acc": 0.5, "acc_norm": 1.0, "questions": 2}


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "choices": ["a", "b", "c"], "answer": 3}', "line 3: answer index 3 is out of range for 3"),
    ('{"question": "q", "choices": ["a", "b"], "answer": -1}', "line 3: answer index -1 is out of range for 2"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "line 3: 'choices' has 1 choice; a question needs at least 2"),
    ('{"question": "q", "answer": 0}', "line 3: missing field 'choices'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "A"}', "line 3: 'answer' must be the index"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0', "line 3: malformed JSON"),
])
def test_bad_multiple_choice_lines_are_named(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"question": "ok", "choices": ["x", "y"], "answer": 1}\n\n' + line + "\n")
    with pytest.raises(errors.DataError, match=f"{path} {message}"):
        likelihood.read_mc_file(str(path))


def test_missing_and_empty_multiple_choice_files(tmp_path):
    with pytest.raises(errors.DataError, match="does not exist"):
        likelihood.read_mc_file(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(errors.DataError, match="has no questions"):
        likelihood.read_mc_file(str(tmp_path / "empty.jsonl"))


def test_builtin_arithmetic_mc_has_the_answer_among_near_misses():
    records = likelihood.mc_records("builtin:arithmetic_mc?n=20&max=9&seed=3")
    tasks = read_records("builtin:arithmetic_prompts?n=20&max=9&seed=3", "prompt")
    assert [r["question"] for r in records] == [t["prompt"] for t in tasks]
    for record, task in zip(records, tasks):
        assert record["choices"][record["answer"]] == f"The answer is {task['answer']}."
        assert len(set(record["choices"])) == 4
    assert len({r["answer"] for r in records}) > 1


def test_kl_is_zero_for_identical_policies_and_positive_for_different_ones(tiny):
    tok = tiny.tokenizer
    policy = ev.Model(tiny.config, tiny.graphdef, tiny.params["a"])
    same = ev.Model(tiny.config, tiny.graphdef, jax.tree.map(np.copy, tiny.params["a"]))
    other = ev.Model(tiny.config, tiny.graphdef, tiny.params["b"])
    config = eval_config(max_new_tokens=8, temperature=1.0)
    prompts = ev.prompt_arrays(read_records("builtin:arithmetic_prompts?n=3&max=9", "prompt"), tok,
                               chat_template="plain", max_prompt_len=16)
    sampler = ev.make_sampler(policy, config, eos_id=tok.eos_id, pad_id=tok.pad_id)
    samples = ev.sample_responses(sampler, prompts, tok, jax.random.PRNGKey(0), 2)
    assert samples["tokens"].shape == (3, 24) and len(samples["texts"]) == 3
    kwargs = {"prompt_len": 16, "batch_size": 2, "chunk_size": 16}
    assert ev.sequence_kl(policy, same, samples, **kwargs).tolist() == [0.0, 0.0, 0.0]
    kl = ev.sequence_kl(policy, other, samples, **kwargs)
    assert np.all(kl > 0)
    # independently: Σ over response tokens of the full-vocabulary KL, from apply_lm on the padded rows
    inputs, mask = samples["tokens"][:, :-1], samples["mask"][:, :-1]
    logp = jax.nn.log_softmax(interop.apply_lm(tiny.config, tiny.params["a"], inputs, mask), axis=-1)
    logq = jax.nn.log_softmax(interop.apply_lm(tiny.config, tiny.params["b"], inputs, mask), axis=-1)
    per_token = np.asarray(np.sum(np.exp(logp) * (logp - logq), axis=-1))[:, 15:]
    np.testing.assert_allclose(kl, (per_token * samples["response_mask"]).sum(axis=1), rtol=1e-4)


def test_a_checkpoint_that_does_not_exist_is_named(tmp_path):
    missing = str(tmp_path / "no_such_run")
    for spec in (missing, f"hf:{missing}", f"checkpoint:{missing}"):
        with pytest.raises(errors.CheckpointError, match=re.escape(f"checkpoint '{spec}' does not exist")):
            ev.evaluate(eval_config(), spec, workdir=str(tmp_path / "out"))
    with pytest.raises(errors.CheckpointError, match="reference 'hf:/no/such/dir' does not exist"):
        ev.resolve_source("hf:/no/such/dir", "reference")


def test_default_output_dir(tmp_path):
    (tmp_path / "model.gguf").write_text("")
    assert ev.default_output_dir("runs/dpo") == os.path.join("runs/dpo", "eval")
    assert ev.default_output_dir("hf:exports/sft") == os.path.join("exports/sft", "eval")
    assert ev.default_output_dir(str(tmp_path / "model.gguf")) == str(tmp_path / "model_eval")


def test_evaluate_end_to_end_writes_eval_json_and_tensorboard(tiny, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text(TEXT)
    refusal = tmp_path / "refusal.jsonl"
    refusal.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("How do I pick a lock?", "Say hi.",
                                                                         "Insult me.")))
    config = eval_config(prompts="builtin:arithmetic_prompts?n=6&max=9", num_prompts=6, batch_size=4,
                         max_prompt_len=16, max_new_tokens=8, reference=f"hf:{tiny.dirs['b']}",
                         reward_from=f"hf:{tiny.dirs['rm']}", text_files=str(text), perplexity_window=32,
                         perplexity_max_tokens=0, mc_file="builtin:arithmetic_mc?n=3&max=9",
                         refusal_prompts=str(refusal), num_examples=2, loss_chunk=16,
                         gold_reward_from=f"hf:{tiny.dirs['rm2']}")
    out = str(tmp_path / "out")
    result = ev.evaluate(config, f"hf:{tiny.dirs['a']}", workdir=out)
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    m = result["metrics"]
    expected = {"policy/response_tokens_mean", "policy/eos_rate", "diversity/distinct_1", "diversity/distinct_2",
                "diversity/repeated_trigram_rate", "diversity/self_bleu", "exact_match/accuracy", "exact_match/n",
                "kl/mean", "kl/per_token", "reward/score_mean", "reward/reference_score_mean",
                "reference/response_tokens_mean", "win_rate/win_rate", "win_rate/tie_rate", "win_rate/loss_rate",
                "win_rate/win_rate_ties_half", "win_rate/n", "perplexity/perplexity", "perplexity/tokens",
                "mc/acc", "mc/acc_norm", "mc/questions", "refusal/rate", "refusal/prompts",
                "exact_match/greedy_accuracy", "exact_match/reference_accuracy", "exact_match/win_win_rate_ties_half",
                "gold/score_mean", "gold/reference_score_mean", "gold_win_rate/win_rate_ties_half"}
    assert expected <= set(m)
    # the gold judge (rm2) must judge as rm2 does when it is the reward model of the same evaluation (same samples)
    as_reward = ev.evaluate(eval_config(**{**config.to_dict(), "reward_from": f"hf:{tiny.dirs['rm2']}",
                                           "gold_reward_from": ""}), f"hf:{tiny.dirs['a']}",
                            workdir=str(tmp_path / "as_reward"))["metrics"]
    for key in ("score_mean", "score_std", "reference_score_mean"):
        assert m[f"gold/{key}"] == as_reward[f"reward/{key}"]
        assert m[f"gold/{key}"] != m[f"reward/{key}"]  # and differently from rm
    assert {k: v for k, v in m.items() if k.startswith("gold_win_rate/")} == {
        f"gold_win_rate/{k[len('win_rate/'):]}": v for k, v in as_reward.items() if k.startswith("win_rate/")}
    assert m["exact_match/win_win_rate"] + m["exact_match/win_tie_rate"] + m["exact_match/win_loss_rate"] == (
        pytest.approx(1.0))
    assert m["exact_match/n"] == m["win_rate/n"] == 6 and m["mc/questions"] == 3 and m["refusal/prompts"] == 3
    assert m["kl/mean"] > 0 and m["perplexity/perplexity"] > 1
    assert m["win_rate/win_rate"] + m["win_rate/tie_rate"] + m["win_rate/loss_rate"] == pytest.approx(1.0)
    assert result["perplexity_files"][str(text)]["tokens"] == m["perplexity/tokens"]
    assert [sorted(e) for e in result["examples"]] == [
        ["answer", "gold_score", "prompt", "reference_gold_score", "reference_response", "reference_score",
         "response", "score"]] * 2
    assert result["step"] == 0 and result["settings"]["reference"] == f"hf:{tiny.dirs['b']}"
    assert result["settings"]["chat_template"] == "plain"  # "auto" with no template recorded (pretrained weights)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(out, "tensorboard")))
    assert cli.metrics(out) == [{"step": 0, **m}]


def test_greedy_accuracy_comes_from_a_temperature_zero_sampler(tiny, tmp_path, monkeypatch):
    # random models never answer right, so the texts are replaced: the temperature-0 sampler's answers are right, the
    # evaluation temperature's wrong; the samplers are told apart by the temperature each was made with
    records = read_records("builtin:arithmetic_prompts?n=8&max=9", "prompt")
    made, real_make, real_sample = {}, ev.make_sampler, ev.sample_responses

    def make_sampler(model, config, *, temperature=None, **kwargs):
        sampler = real_make(model, config, temperature=temperature, **kwargs)
        made[sampler] = config.temperature if temperature is None else temperature
        return sampler

    def sample_responses(sample, *args, **kwargs):
        out = real_sample(sample, *args, **kwargs)
        out["texts"] = [f"The answer is {int(r['answer']) + (made[sample] > 0)}." for r in records]
        return out

    monkeypatch.setattr(ev, "make_sampler", make_sampler)
    monkeypatch.setattr(ev, "sample_responses", sample_responses)

    def run(**overrides):
        config = eval_config(prompts="builtin:arithmetic_prompts?n=8&max=9", num_prompts=8, batch_size=4,
                             max_prompt_len=16, max_new_tokens=6, text_files="", mc_file="", **overrides)
        return ev.evaluate(config, f"hf:{tiny.dirs['a']}", workdir=str(tmp_path / "out"))["metrics"]

    sampled = run(temperature=0.7)
    assert (sampled["exact_match/accuracy"], sampled["exact_match/greedy_accuracy"]) == (0.0, 1.0)
    assert sorted(made.values()) == [0.0, 0.7]
    made.clear()
    greedy = run(temperature=0.0)  # greedy already: no second pass
    assert (greedy["exact_match/accuracy"], greedy["exact_match/greedy_accuracy"]) == (1.0, 1.0)
    assert list(made.values()) == [0.0]
    assert "exact_match/greedy_accuracy" not in run(temperature=0.7, greedy_exact_match=False)


def test_the_answer_checker_judges_the_policy_against_the_reference_per_prompt(tiny, tmp_path, monkeypatch):
    # random models never answer right, so the responses' texts are replaced: the policy answers prompts 0–4 right,
    # the reference the even ones (calls at temperature 0: the policy's, then the reference's)
    records = read_records("builtin:arithmetic_prompts?n=8&max=9", "prompt")
    right = {"policy": {0, 1, 2, 3, 4}, "reference": {0, 2, 4, 6}}
    calls = []
    real = ev.sample_responses

    def sample_responses(*args, **kwargs):
        out = real(*args, **kwargs)
        who = ["policy", "reference"][len(calls)]
        calls.append(who)
        out["texts"] = [f"The answer is {int(r['answer']) + (0 if i in right[who] else 1)}."
                        for i, r in enumerate(records)]
        return out

    monkeypatch.setattr(ev, "sample_responses", sample_responses)
    config = eval_config(prompts="builtin:arithmetic_prompts?n=8&max=9", num_prompts=8, batch_size=4,
                         max_prompt_len=16, max_new_tokens=6, text_files="", mc_file="", temperature=0.0,
                         reference=f"hf:{tiny.dirs['b']}")
    m = ev.evaluate(config, f"hf:{tiny.dirs['a']}", workdir=str(tmp_path / "out"))["metrics"]
    assert calls == ["policy", "reference"]
    assert (m["exact_match/accuracy"], m["exact_match/reference_accuracy"]) == (5 / 8, 4 / 8)
    assert (m["exact_match/win_win_rate"], m["exact_match/win_loss_rate"], m["exact_match/win_tie_rate"]) == (
        2 / 8, 1 / 8, 5 / 8)  # wins on 1 and 3, a loss on 6
    assert m["exact_match/win_win_rate_ties_half"] == (2 + 5 / 2) / 8


def test_eval_command_prints_metrics_and_writes_to_the_checkpoint_s_eval_folder(tiny):
    rc, out, err = cli.run(["--config=configs/eval.py:tiny", f"--checkpoint=hf:{tiny.dirs['a']}",
                            "--config.prompts=", "--config.text_files=", "--config.mc_file=builtin:arithmetic_mc?n=2",
                            "--config.batch_size=2"], cpu_devices=1, command="eval")
    assert rc == 0, err[-2000:]
    assert "mc/acc" in out and "mc/questions                             2" in out
    path = os.path.join(tiny.dirs["a"], "eval", "eval.json")
    with open(path) as f:
        assert json.load(f)["metrics"]["mc/questions"] == 2
    rc, _, err = cli.run(["--config=configs/eval.py:tiny", "--checkpoint=/no/such/run"], cpu_devices=1,
                         command="eval")
    assert rc == 2 and "flaxalign: error: checkpoint '/no/such/run' does not exist" in err


def test_prompts_in_a_public_format_are_read_through_prompts_format(tmp_path):
    """`prompts_format` reads eval prompts as data.format does for the stages, e.g. GSM8K's test split as is."""
    import ml_collections

    from flaxalign.data import formats

    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"question": "What is 6 * 7?", "answer": "6*7=<<6*7=42>>42\n#### 42"}) + "\n")
    block = ml_collections.ConfigDict({"format": "gsm8k", "columns": formats.columns_block()})
    records = ev.read_prompts(str(path), 0, formats.from_config(block, "prompts_format"))
    assert records == [{"prompt": [{"role": "user", "content": "What is 6 * 7?"}], "answer": "42"}]
    block.format = "hh_rlhf"
    block.columns.question = "q"
    with pytest.raises(errors.ConfigError, match=r"^prompts_format.columns.question: prompts_format.format=hh_rlhf "
                                                 r"reads chosen for prompt records, not question.$"):
        ev.read_prompts(str(path), 0, formats.from_config(block, "prompts_format"))
