"""Evaluation of a trained policy: `flaxalign eval`. Presets: `tiny` (the demo's tiny models on built-in data),
`smollm2_135m` (SmolLM2-135M-Instruct runs: chatml prompts, longer windows).

    flaxalign eval --config=configs/eval.py:tiny --checkpoint=runs/dpo \
        --config.reference=checkpoint:runs/sft --config.reward_from=checkpoint:runs/reward
    flaxalign eval --config=configs/eval.py:tiny --checkpoint=hf:exports/sft --config.mc_file=data/mmlu.jsonl \
        --config.mc_template=$'Question: {question}\nAnswer:' --config.mc_choice_prefix=" "  # lm-eval-harness format

Every part is off when its field is empty ("" or 0); see flaxalign/eval/evaluation.py. Results: `eval.json` (and
TensorBoard scalars) in `--workdir`, default `<checkpoint dir>/eval/`.

`tiny`: the policy answers 32 single-digit arithmetic questions (drawn with seed 1; the demo's DPO data use seed 0),
which give exact match, diversity and — with `reference` / `reward_from` set — KL, reward and win rate; perplexity on
the first 4096 tokens of the built-in stdlib corpus (the demo's CLM training text, so a train-set perplexity); and
multiple choice on 32 arithmetic questions with "The answer is N." among near misses, in the demo's prompt format
(the question as is, the answer right after). There is no built-in refusal set: point `refusal_prompts` at prompt
records (JSONL) to measure refusals.
"""

import ml_collections

from flaxalign import config_blocks

PRESETS = {
    "tiny": dict(prompts="builtin:arithmetic_prompts?max=9&seed=1", num_prompts=32, max_prompt_len=32,
                 max_new_tokens=16, batch_size=16, text_files="builtin:stdlib", perplexity_window=128,
                 perplexity_max_tokens=4096, mc_file="builtin:arithmetic_mc?n=32&max=9&seed=1",
                 mc_template="{question}", mc_choice_prefix=""),
    # SmolLM2-135M-Instruct runs (configs/sft.py:smollm2_135m and its DPO): arithmetic questions (plain-text prompts;
    # chatml applies to prompt files of message lists), perplexity on the stdlib docs in 512-token windows, multiple
    # choice in the lm-eval-harness format.
    "smollm2_135m": dict(prompts="builtin:arithmetic_prompts?max=9&seed=1", num_prompts=32, max_prompt_len=64,
                         max_new_tokens=32, batch_size=8, text_files="builtin:stdlib", perplexity_window=512,
                         perplexity_max_tokens=8192, mc_file="builtin:arithmetic_mc?n=32&max=9&seed=1",
                         mc_template="Question: {question}\nAnswer:", mc_choice_prefix=" ", chat_template="chatml"),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    p = config_blocks.preset_values(arg, PRESETS, "configs/eval.py")
    c = ml_collections.ConfigDict()
    c.stage = "eval"
    c.seed = 0

    # Sampled responses: prompt records {"prompt", "answer"?} (JSONL, tfds:NAME, builtin:...); "" = no sampling.
    c.prompts = p["prompts"]
    c.num_prompts = p["num_prompts"]  # the first N records; 0 = all
    # the prompts' shape and column names, as data.format / data.columns (e.g. format=gsm8k for GSM8K's test split)
    c.prompts_format = config_blocks.record_format()
    # message-list prompts: plain | chatml | llama3 | gemma | jinja (the tokenizer's own); auto = the one the
    # checkpoint trained with (else plain)
    c.chat_template = p.get("chat_template", "auto")
    c.max_prompt_len = p["max_prompt_len"]  # longer prompts are cut on the left
    c.max_new_tokens = p["max_new_tokens"]
    c.temperature = 0.7  # 0 = greedy
    # prompts with an answer are also answered greedily (one more pass at temperature > 0): exact_match/greedy_accuracy
    c.greedy_exact_match = True
    c.top_k = 0
    c.top_p = 1.0
    c.batch_size = p["batch_size"]  # rows per forward pass (sampling, scoring)
    c.num_examples = 4  # sampled responses kept in eval.json

    # A second policy (checkpoint:DIR, hf:DIR, gguf:FILE or a run directory): KL(policy ‖ reference) on the samples;
    # with reward_from / gold_reward_from, or prompts that have answers, the reference also answers every prompt (one
    # more sampling pass) and the judges compare the two answers (win rates).
    c.reference = ""
    c.reward_from = ""  # a reward model (checkpoint:DIR of a configs/reward.py run, or hf:DIR): mean score
    # a second reward model (the gold judge, e.g. trained on other pairs): gold/ scores, gold_win_rate/ vs the reference
    c.gold_reward_from = ""
    c.tie_margin = 0.0  # |score − reference score| ≤ margin is a tie

    # Perplexity: comma-separated text specs (files, folders, globs, JSONL text records, builtin:stdlib).
    c.text_files = p["text_files"]
    c.perplexity_window = p["perplexity_window"]  # predictions per window; 0 = the model's max_seq_len
    c.perplexity_max_tokens = p["perplexity_max_tokens"]  # per spec; 0 = all

    # Multiple choice: JSONL of {"question", "choices", "answer": index}, or builtin:arithmetic_mc[?n=&seed=&max=].
    c.mc_file = p["mc_file"]
    c.mc_template = p["mc_template"]  # the context; {question} is replaced by the question
    c.mc_choice_prefix = p["mc_choice_prefix"]  # put before each choice (lm-eval-harness: " ")

    c.refusal_prompts = ""  # prompt records whose responses are checked for refusals; "" = off
    c.loss_chunk = 256  # positions per logits chunk in scoring and KL
    return c
