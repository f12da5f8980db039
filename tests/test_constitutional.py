"""Constitutional AI data generation and self-refine: the loops over a scripted text model (records, order, principle
sampling, skipped pairs, stopping), constitution files, and the CLI with a tiny random model whose preference pairs a
DPO run trains on."""

import json
import os
import re

import pytest

from flaxalign import constitutional as cai
from flaxalign import errors, generate
from flaxalign.data.sources import read_records
from tests import cli_helpers as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRINCIPLES = ["Be kind.", "Be brief.", "Be right."]


class ScriptedModel:
    """A text model whose outputs say exactly what they answer: "draft(P)" for a prompt P, "critique(R|principle)"
    for a critique request of response R, "revision(R|critique reversed)" for a revision request (reversed, so
    that it does not quote the critique), "feedback(R)" and
    "refined(R)" for self-refine. `keep` lists prompts whose revisions repeat the response (revision == draft),
    `empty` those whose revisions are empty, `echo` those whose revisions repeat the critique, `stop` those whose
    feedback is the stop marker. Every call's requests are kept in `calls`."""

    def __init__(self, keep=(), stop=(), empty=(), echo=()):
        self.calls, self.keep, self.stop, self.empty, self.echo = [], set(keep), set(stop), set(empty), set(echo)

    def __call__(self, requests):
        self.calls.append(list(requests))
        return [self.answer(text) for text in requests]

    def answer(self, text):
        fields = dict(re.findall(r"^(Request|Response|Critique|Feedback): (.*)$", text, re.MULTILINE))
        if text.endswith("Critique:"):
            principle = re.search(r"this principle: (.*)$", text, re.MULTILINE).group(1)
            return f"critique({fields['Response']}|{principle})"
        if text.endswith("Revision:"):
            if fields["Request"] in self.keep:
                return f"Revision: {fields['Response']}  "  # an echoed label and spaces are cleaned away
            if fields["Request"] in self.echo:
                return fields["Critique"]
            return "" if fields["Request"] in self.empty else f"revision({fields['Response']}|{fields['Critique'][::-1]})"
        if text.endswith("Feedback:"):
            return cai.STOP_MARKER if fields["Request"] in self.stop else f"feedback({fields['Response']})"
        if text.endswith("Improved response:"):
            return f"refined({fields['Response']})"
        return f" draft({text})\n"


def test_records_hold_draft_critiques_and_revisions_in_order():
    model = ScriptedModel()
    records = cai.constitutional_pairs(["p0", "p1"], model, PRINCIPLES, rounds=2, seed=5)
    assert len(model.calls) == 5 and all(len(call) == 2 for call in model.calls)  # draft + 2 × (critique, revision)
    schedule = cai.sample_principles(2, 2, PRINCIPLES, 5)
    for index, record in enumerate(records):
        p = f"p{index}"
        a, b = schedule[index]
        c1 = f"critique(draft({p})|{a})"
        r1 = f"revision(draft({p})|{c1[::-1]})"
        c2 = f"critique({r1}|{b})"
        assert list(record) == ["prompt", "draft", "principles", "critiques", "revisions"]
        assert record == {"prompt": p, "draft": f"draft({p})", "principles": [a, b], "critiques": [c1, c2],
                          "revisions": [r1, f"revision({r1}|{c2[::-1]})"]}
    assert model.calls[1][0] == cai.critique_request("p0", "draft(p0)", schedule[0][0])
    assert "Critique request:" in model.calls[1][0] and "Revision request:" in model.calls[2][0]


def test_principles_are_reproducible_per_prompt_and_cover_the_constitution():
    first = cai.sample_principles(6, 3, PRINCIPLES, seed=1)
    assert first == cai.sample_principles(6, 3, PRINCIPLES, seed=1)
    assert first[:4] == cai.sample_principles(4, 3, PRINCIPLES, seed=1)  # prompt i's draws ignore the prompt count
    assert all(sorted(row) == sorted(PRINCIPLES) for row in first)  # 3 rounds of 3 principles: each once
    assert first != cai.sample_principles(6, 3, PRINCIPLES, seed=2)
    long = cai.sample_principles(1, 7, PRINCIPLES, seed=0)[0]
    assert sorted(long[:3]) == sorted(PRINCIPLES) and sorted(long[3:6]) == sorted(PRINCIPLES) and len(long) == 7
    runs = [cai.constitutional_pairs(["a", "b", "c"], ScriptedModel(), PRINCIPLES, seed=3) for _ in range(2)]
    assert runs[0] == runs[1]


def test_preference_and_sft_records_skip_and_count_what_carries_no_preference():
    model = ScriptedModel(keep={"same"}, empty={"blank"}, echo={"parrot"})
    records = cai.constitutional_pairs(["good", "same", "blank", "parrot"], model, PRINCIPLES, seed=0)
    assert records[1]["revisions"] == ["draft(same)"]  # the echoed label and whitespace are cleaned away
    pairs, skipped = cai.preference_records(records)
    assert skipped == {"identical": 1, "empty": 1, "echo": 1}
    assert pairs == [{"prompt": "good", "chosen": records[0]["revisions"][-1], "rejected": "draft(good)"}]
    sft, sft_skipped = cai.sft_records(records)
    assert sft_skipped == 2 and [r["prompt"] for r in sft] == ["good", "same"]
    chat_pairs, _ = cai.preference_records(records, conversational=True)
    assert chat_pairs[0]["prompt"] == [{"role": "user", "content": "good"}]
    assert chat_pairs[0]["rejected"] == [{"role": "assistant", "content": "draft(good)"}]
    chat_sft, _ = cai.sft_records(records, conversational=True)
    assert [m["role"] for m in chat_sft[0]["messages"]] == ["user", "assistant"]


def test_echoes_of_the_critique_or_the_principle_are_recognised():
    principle = "The response is factually correct and says so when it is unsure."
    critique = "The response gets the sum wrong: 75 + 69 is 144, not 21."
    assert cai.echoes_feedback(critique, critique, principle)
    assert cai.echoes_feedback("Sure. " + critique.upper() + " Also more.", critique, principle)
    assert cai.echoes_feedback(f"Here it is:\n{principle[:-1]}  and I am sure", "No.", principle)
    assert not cai.echoes_feedback("75 + 69 = 144.", critique, principle)
    assert not cai.echoes_feedback("No. The answer is 144.", "No.", principle)  # short critiques may appear


def test_written_records_read_back_as_preference_and_sft_data(tmp_path):
    from flaxalign.data.embedded import write_jsonl

    records = cai.constitutional_pairs(["What is 2 + 2?", "Name a colour."], ScriptedModel(), PRINCIPLES)
    for conversational in (False, True):
        pairs, _ = cai.preference_records(records, conversational=conversational)
        sft, _ = cai.sft_records(records, conversational=conversational)
        write_jsonl(pairs, str(tmp_path / "p.jsonl"))
        write_jsonl(sft, str(tmp_path / "s.jsonl"))
        assert read_records(str(tmp_path / "p.jsonl"), "preference") == pairs  # what DPO's data layer reads
        assert read_records(str(tmp_path / "s.jsonl"), "sft") == sft


def test_self_refine_runs_feedback_and_refinement_rounds_and_stops_on_the_marker():
    model = ScriptedModel(stop={"done"})
    answers, trace = cai.self_refine(["q", "done"], model, 2)
    assert [len(call) for call in model.calls] == [2, 2, 1, 1, 1]  # draft; round 1: feedback ×2, refine ×1; round 2
    assert answers == ["refined(refined(draft(q)))", "draft(done)"]
    assert trace[0] == {"prompt": "q", "draft": "draft(q)", "stopped": False,
                        "feedback": ["feedback(draft(q))", "feedback(refined(draft(q)))"],
                        "refinements": ["refined(draft(q))", "refined(refined(draft(q)))"]}
    assert trace[1]["stopped"] and trace[1]["feedback"] == [cai.STOP_MARKER] and trace[1]["refinements"] == []
    model = ScriptedModel()
    answers, _ = cai.self_refine(["q"], model, 3, "Request: {prompt}\nResponse: {response}\nFeedback:")
    assert len(model.calls) == 1 + 2 * 3 and answers == ["refined(refined(refined(draft(q))))"]
    assert cai.self_refine(["q"], ScriptedModel(), 0)[0] == ["draft(q)"]


def test_bad_templates_rounds_and_models_are_named():
    with pytest.raises(errors.ConfigError, match="feedback template"):
        cai.self_refine(["q"], ScriptedModel(), 1, "{prompt} {answer}")
    with pytest.raises(errors.ConfigError, match="rounds must be >= 1"):
        cai.constitutional_pairs(["q"], ScriptedModel(), PRINCIPLES, rounds=0)
    with pytest.raises(ValueError, match="one string per prompt"):
        cai.constitutional_pairs(["q", "r"], lambda requests: ["only one"], PRINCIPLES)


def test_constitution_files(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("# mine\n\n  Be kind.  \n# not this\nBe brief.\n")
    assert cai.read_principles(str(path)) == ["Be kind.", "Be brief."]
    for text in ("", "\n\n", "# only\n  # comments\n"):
        path.write_text(text)
        with pytest.raises(errors.DataError, match=f"constitution {re.escape(str(path))} has no principles"):
            cai.read_principles(str(path))
    with pytest.raises(errors.DataError, match="missing.txt does not exist"):
        cai.read_principles(str(tmp_path / "missing.txt"))
    shipped = cai.read_principles(os.path.join(REPO, "data", "constitution.txt"))
    assert shipped == list(cai.DEFAULT_PRINCIPLES) == cai.read_principles("builtin:default")


def test_prompt_buckets():
    assert [generate.prompt_bucket(n, 200) for n in (1, 16, 17, 100, 129, 500)] == [16, 16, 32, 128, 200, 200]


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory):
    """A random tiny model (vocab 512) saved as an HF directory with a SentencePiece tokenizer trained on a few
    stdlib docs: enough to run the sampler and the DPO stage, no training."""
    from flaxalign import interop
    from flaxalign.data.corpus import stdlib_corpus
    from flaxalign.data.tokenizer import Tokenizer
    from tests import helpers

    directory = tmp_path_factory.mktemp("tiny_hf")
    Tokenizer.train(stdlib_corpus(max_chars=60_000), str(directory / "tokenizer.model"), vocab_size=512)
    config = helpers.tiny_model_config()
    interop.save_hf(config, helpers.random_params(config, seed=3), str(directory))
    return str(directory)


def test_model_completer_loads_once_and_samples_reproducibly(tiny_hf_model):
    kwargs = dict(chat_template="plain", max_new_tokens=6, temperature=1.0, seed=1, batch_size=2)
    complete = generate.model_completer(f"hf:{tiny_hf_model}", **kwargs)
    prompts = ["What is 1 + 1?", "Say hi.", "x " * 400]  # the last is cut on the left to fit max_seq_len
    first = complete(prompts)
    assert len(first) == 3 and all(isinstance(text, str) for text in first)
    assert complete.truncated == 1 and complete.calls == 1
    assert generate.model_completer(f"hf:{tiny_hf_model}", **kwargs)(prompts) == first
    with pytest.raises(errors.ConfigError, match="chat_template='chatm' is not one of"):
        generate.model_completer(f"hf:{tiny_hf_model}", chat_template="chatm")


@pytest.mark.slow  # two CLI runs
def test_cli_writes_preferences_that_a_dpo_run_trains_on(tiny_hf_model, tmp_path):
    workdir = str(tmp_path / "cai")
    rc, out, err = cli.run(["--config=configs/constitutional.py:tiny", f"--workdir={workdir}",
                            f"--config.checkpoint=hf:{tiny_hf_model}", "--config.num_prompts=12",
                            "--config.max_new_tokens=8", "--config.temperature=1.0", "--config.batch_size=12"],
                           cpu_devices=1, command="constitutional")
    assert rc == 0, err[-2000:]
    assert "12 prompts × 1 round(s)" in out and "preferences.jsonl" in out, out
    with open(os.path.join(workdir, "trace.jsonl")) as handle:
        trace = [json.loads(line) for line in handle]
    assert len(trace) == 12 and all(len(row["principles"]) == 1 and "answer" in row for row in trace)
    pairs = read_records(os.path.join(workdir, "preferences.jsonl"), "preference")
    with open(os.path.join(workdir, "summary.json")) as handle:
        summary = json.load(handle)
    assert len(pairs) == summary["preference_pairs"] >= 8
    assert len(pairs) + sum(summary[f"skipped_{k}"] for k in ("identical", "empty", "echo")) == 12
    assert pairs[0]["prompt"][0]["role"] == "user"  # chat_template plain: message lists, rendered by DPO alike

    rc, out, err = cli.run(["--config=configs/dpo.py:tiny", f"--workdir={tmp_path / 'dpo'}",
                            f"--config.init_from=hf:{tiny_hf_model}",
                            f"--config.data.train={workdir}/preferences.jsonl", "--config.data.eval_fraction=0.25",
                            "--config.data.batch_size=4", "--config.steps=2", "--config.eval_every=0",
                            "--config.eval_at_start=False", "--config.eval_kl.num_prompts=0"], cpu_devices=1)
    assert rc == 0, err[-2000:]
    assert "dpo finished at step 2" in out, out


def test_cli_errors_are_one_line(tmp_path):
    rc, _, err = cli.run(["--config=configs/constitutional.py:tiny", f"--workdir={tmp_path}"], cpu_devices=1,
                         command="constitutional")
    assert rc == 2 and "set --config.checkpoint" in err and err.strip().count("\n") == 0, err
    rc, _, err = cli.run(["--config=configs/constitutional.py:tiny", f"--workdir={tmp_path}",
                          "--config.checkpoint=hf:/nonexistent", f"--config.constitution={tmp_path}/none.txt"],
                         cpu_devices=1, command="constitutional")
    assert rc == 2 and "none.txt does not exist" in err and err.strip().count("\n") == 0, err
    rc, _, err = cli.run(["--checkpoint=hf:/x", "--prompt=hi", "--refine_rounds=-1"], cpu_devices=1,
                         command="generate")
    assert rc == 2 and "--refine_rounds must be >= 0" in err, err


def test_generate_with_refine_rounds_prints_draft_and_refined_answer(tiny_hf_model):
    rc, out, err = cli.run([f"--checkpoint=hf:{tiny_hf_model}", "--prompt=What is 2 + 3?", "--prompt=Hi",
                            "--refine_rounds=1", "--max_new_tokens=6", "--chat_template=plain"], cpu_devices=1,
                           command="generate")
    assert rc == 0, err[-2000:]
    assert out.count("[draft]") == 2 and out.count("[after 1 refinement(s)") + out.count("[after 0") == 2, out
