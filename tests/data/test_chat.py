"""Tests of flaxalign.data.chat: exact template text, ids equal to whole-text encoding, exact assistant masks."""

import pytest

from flaxalign.data.chat import ChatTokens, render_chat, render_chat_text
from flaxalign.data.tokenizer import HFTokenizer, Tokenizer
from flaxalign.errors import DataError
from tests.data.test_tokenizer_hf import CHAT_TOKENS, build_hf_tokenizer, training_documents

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome.\n\nIt has been the capital since 1871."},
]

# The published ChatML (Qwen2 without its default system message) and
# Meta-Llama-3-Instruct templates applied to CONVERSATION, written out by hand.
CHATML_REFERENCE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n"
    "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
    "<|im_start|>assistant\nRome.\n\nIt has been the capital since 1871.<|im_end|>\n"
)
LLAMA3_REFERENCE = (
    "<|begin_of_text|>"
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nThe capital of France is Paris.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd of Italy?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nRome.\n\nIt has been the capital since 1871.<|eot_id|>"
)
PLAIN_REFERENCE = (
    "System: You are a helpful assistant.\n\n"
    "User: What is the capital of France?\n\n"
    "Assistant: The capital of France is Paris.</s>\n\n"
    "User: And of Italy?\n\n"
    "Assistant: Rome.\n\nIt has been the capital since 1871.</s>"
)
REFERENCES = {"chatml": CHATML_REFERENCE, "llama3": LLAMA3_REFERENCE, "plain": PLAIN_REFERENCE}
GENERATION_PROMPTS = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "plain": "\n\nAssistant:",
}
# What the masked tokens of each assistant answer decode to (EOS is written as "</s>" here).
MASKED_TEXT = {
    "chatml": ["The capital of France is Paris.<|im_end|>", "Rome.\n\nIt has been the capital since 1871.<|im_end|>"],
    "llama3": ["The capital of France is Paris.<|eot_id|>", "Rome.\n\nIt has been the capital since 1871.<|eot_id|>"],
    "plain": [" The capital of France is Paris.</s>", " Rome.\n\nIt has been the capital since 1871.</s>"],
}


@pytest.fixture(scope="module")
def tokenizers_by_name(tmp_path_factory):
    """A Llama-3-style and a GPT-2-style HF tokenizer and a SentencePiece one, all with the chat tokens."""
    folder = tmp_path_factory.mktemp("chat_tokenizers")
    documents = training_documents()
    found = {"sentencepiece": Tokenizer.train(
        documents, str(folder / "sp.model"), vocab_size=500, user_defined_symbols=CHAT_TOKENS)}
    for style in ("llama3", "gpt2"):
        path = build_hf_tokenizer(folder / style / "tokenizer.json", documents, style=style)
        # eos "</s>" cannot be used: it is not in these vocabularies, so each gets a real one.
        found[f"hf_{style}"] = HFTokenizer(path, eos_token="<|end_of_text|>", bos_token="<|begin_of_text|>")
    return found


def eos_text(tokenizer):
    """How the EOS id is written in rendered text: the HF token, or SentencePiece's piece."""
    return "<|end_of_text|>" if isinstance(tokenizer, HFTokenizer) else "</s>"


def encode_rendered(tokenizer, text, eos):
    """Encodes text, turning each written EOS into the EOS id (SentencePiece does not match "</s>")."""
    parts = text.split(eos)
    ids = tokenizer.encode(parts[0])
    for part in parts[1:]:
        ids += [tokenizer.eos_id] + tokenizer.encode(part)
    return ids


def masked_runs(tokens: ChatTokens):
    """Returns the maximal runs of consecutive ids whose mask is 1."""
    runs, current = [], []
    for token, masked in zip(tokens.ids, tokens.assistant_mask):
        if masked:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", ["chatml", "llama3", "plain"])
def test_text_equals_the_reference(template):
    assert render_chat_text(CONVERSATION, template, eos_token="</s>") == REFERENCES[template]
    prompt = render_chat_text(CONVERSATION[:4], template, add_generation_prompt=True, eos_token="</s>")
    reference_prefix = REFERENCES[template][:REFERENCES[template].rindex(GENERATION_PROMPTS[template])]
    assert prompt == reference_prefix + GENERATION_PROMPTS[template]


def test_llama3_strips_content_and_chatml_keeps_it():
    messages = [{"role": "user", "content": "  Hi \n"}, {"role": "assistant", "content": "\nHello!  "}]
    assert render_chat_text(messages, "llama3") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    )
    assert render_chat_text(messages, "chatml") == (
        "<|im_start|>user\n  Hi \n<|im_end|>\n<|im_start|>assistant\n\nHello!  <|im_end|>\n"
    )


@pytest.mark.parametrize("template", ["chatml", "llama3", "plain"])
@pytest.mark.parametrize("name", ["sentencepiece", "hf_llama3", "hf_gpt2"])
def test_ids_equal_encoding_the_reference(tokenizers_by_name, name, template):
    tokenizer = tokenizers_by_name[name]
    eos = eos_text(tokenizer)
    tokens = render_chat(CONVERSATION, tokenizer, template)
    text = render_chat_text(CONVERSATION, template, eos_token=eos)
    assert tokens.ids == encode_rendered(tokenizer, text, eos)
    assert len(tokens.assistant_mask) == len(tokens.ids)
    if template != "plain":
        assert tokens.ids == tokenizer.encode(REFERENCES[template])
        assert tokenizer.decode(tokens.ids) == REFERENCES[template]


@pytest.mark.parametrize("template", ["chatml", "llama3", "plain"])
@pytest.mark.parametrize("name", ["sentencepiece", "hf_llama3", "hf_gpt2"])
def test_mask_covers_exactly_the_answers_and_end_tokens(tokenizers_by_name, name, template):
    tokenizer = tokenizers_by_name[name]
    tokens = render_chat(CONVERSATION, tokenizer, template)
    runs = masked_runs(tokens)
    assert len(runs) == 2
    decoded = [tokenizer.decode(run) for run in runs]
    if template == "plain":
        # SentencePiece decodes control ids (EOS) as nothing, so check the id itself.
        assert all(run[-1] == tokenizer.eos_id for run in runs)
        decoded = [tokenizer.decode(run[:-1]) + "</s>" for run in runs]
    assert decoded == MASKED_TEXT[template]
    # Everything else (headers, system and user turns, separators) is unmasked.
    unmasked = [token for token, masked in zip(tokens.ids, tokens.assistant_mask) if not masked]
    assert len(unmasked) + sum(map(len, runs)) == len(tokens.ids)
    if template == "chatml":
        assert tokenizer.decode(tokens.ids[-1:]) == "\n" and tokens.assistant_mask[-1] == 0


@pytest.mark.parametrize("template", ["chatml", "llama3", "plain"])
def test_generation_prompt_is_unmasked(tokenizers_by_name, template):
    tokenizer = tokenizers_by_name["hf_llama3"]
    tokens = render_chat(CONVERSATION[:4], tokenizer, template, add_generation_prompt=True)
    text = render_chat_text(CONVERSATION[:4], template, add_generation_prompt=True, eos_token="<|end_of_text|>")
    assert tokens.ids == tokenizer.encode(text)
    assert text.endswith(GENERATION_PROMPTS[template])
    prompt_ids = tokenizer.encode(GENERATION_PROMPTS[template])
    assert tokens.ids[-len(prompt_ids):] == prompt_ids
    # One answer in the history, none in the prompt.
    assert len(masked_runs(tokens)) == 1 and tokens.assistant_mask[-len(prompt_ids):] == [0] * len(prompt_ids)


def test_answers_starting_with_whitespace_are_encoded_segment_wise(tokenizers_by_name):
    """The documented boundary rule: no token spans the start of an answer."""
    messages = [{"role": "user", "content": "Indent this"}, {"role": "assistant", "content": "    return x\n"}]
    for name, tokenizer in tokenizers_by_name.items():
        tokens = render_chat(messages, tokenizer, "chatml")
        prefix = tokenizer.encode("<|im_start|>user\nIndent this<|im_end|>\n<|im_start|>assistant\n")
        answer = tokenizer.encode("    return x\n") + [tokenizer.token_to_id("<|im_end|>")]
        assert tokens.ids == prefix + answer + tokenizer.encode("\n"), name
        assert tokens.assistant_mask == [0] * len(prefix) + [1] * len(answer) + [0] * len(tokenizer.encode("\n"))
    # Whole-text encoding agrees for Llama-3-style and SentencePiece tokenizers.
    for name in ("hf_llama3", "sentencepiece"):
        tokenizer = tokenizers_by_name[name]
        assert render_chat(messages, tokenizer, "chatml").ids == tokenizer.encode(render_chat_text(messages, "chatml"))


@pytest.mark.parametrize("messages, message", [
    ([], r"the conversation has no messages"),
    ("hello", r"the conversation has no messages"),
    ([{"role": "user"}], r"message 0 of the conversation is not a dict with 'role' and 'content'"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hi"}],
     r"message 1 of the conversation has role 'bot'; roles are system, user and assistant"),
    ([{"role": "user", "content": ["hi"]}], r"message 0 of the conversation has content of type list"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "be nice"}],
     r"message 1 of the conversation is a system message; only the first message may be one"),
])
def test_invalid_messages(tokenizers_by_name, messages, message):
    with pytest.raises(DataError, match=message):
        render_chat(messages, tokenizers_by_name["hf_llama3"], "chatml")
    with pytest.raises(DataError, match=message):
        render_chat_text(messages, "plain")


def test_errors_name_the_source():
    with pytest.raises(DataError, match=r"message 2 of 'sft.jsonl' line 7 has role 'tool'"):
        render_chat_text(CONVERSATION[:2] + [{"role": "tool", "content": "{}"}], "chatml",
                         source="'sft.jsonl' line 7")


def test_unknown_template():
    with pytest.raises(DataError, match=r"chat template 'vicuna' is unknown; use one of chatml, llama3, gemma, plain, jinja"):
        render_chat_text(CONVERSATION, "vicuna")


def test_templates_need_their_tokens(tmp_path):
    documents = training_documents()[:5]
    path = build_hf_tokenizer(tmp_path / "tokenizer.json", documents, vocab_size=400,
                              special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = HFTokenizer(path, eos_token="<|endoftext|>")
    assert render_chat(CONVERSATION, tokenizer, "chatml").ids
    with pytest.raises(DataError, match=r"tokenizer '.*tokenizer.json' has no '<\|begin_of_text\|>' token, "
                                        r"which chat template 'llama3' needs"):
        render_chat(CONVERSATION, tokenizer, "llama3")
    plain_sp = Tokenizer.train(documents, str(tmp_path / "plain.model"), vocab_size=400)
    with pytest.raises(DataError, match=r"has no '<\|im_start\|>' token, which chat template 'chatml' needs"):
        render_chat(CONVERSATION, plain_sp, "chatml")
    assert render_chat(CONVERSATION, plain_sp, "plain").ids.count(plain_sp.eos_id) == 2


@pytest.mark.parametrize("system", ["", "You are a helpful assistant."])
def test_generate_prompts_place_an_optional_system_turn(tokenizers_by_name, system):
    """`flaxalign generate --system=… --chat_template=chatml`: the prompt ids are the system turn (when given), the
    user turn and the generation prompt, as the template's reference text writes them."""
    from flaxalign.generate import ModelCompleter

    tokenizer = tokenizers_by_name["hf_llama3"]
    completer = ModelCompleter(tokenizer=tokenizer, model_config=None, params=None, mesh=None, sample=None,
                               chat_template="chatml", max_new_tokens=1, batch_size=1, seed=0, system=system)
    expected = CHATML_REFERENCE.split("<|im_start|>user")[0] if system else ""
    expected += "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" + GENERATION_PROMPTS["chatml"]
    assert tokenizer.decode(completer.encode("What is the capital of France?")) == expected


def test_exports_stop_generation_at_the_end_of_a_turn(tokenizers_by_name, tmp_path):
    """`convert --format=hf` writes a generation_config.json with bos/pad ids and an eos list that also holds the end-of-turn token of each chat format the tokenizer can write (<|im_end|>, <|eot_id|>), so that
    transformers' generate() stops where a chat-trained model ends its turn; a tokenizer without chat tokens
    stops at EOS only."""
    import json

    from flaxalign.convert import GENERATION_CONFIG, _write_generation_ids
    from flaxalign.data.chat import end_of_turn_ids

    tokenizer = tokenizers_by_name["hf_llama3"]
    turn_ends = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|eot_id|>")]
    assert None not in turn_ends and tokenizer.eos_id not in turn_ends
    assert end_of_turn_ids(tokenizer) == [tokenizer.eos_id, *turn_ends]
    _write_generation_ids(tokenizer, str(tmp_path))
    generation = json.loads((tmp_path / GENERATION_CONFIG).read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_id, *turn_ends]
    assert generation["pad_token_id"] == tokenizer.pad_id and generation["bos_token_id"] == tokenizer.bos_id

    class NoChatTokens:  # a vocabulary without any template's special tokens
        eos_id = 2

        def token_to_id(self, token):
            return None

    assert end_of_turn_ids(NoChatTokens()) == [2]


def test_a_stage_inherits_the_template_its_init_from_run_trained_with():
    from flaxalign.data.chat import resolve_template

    lines = []
    assert resolve_template("", "chatml", source="checkpoint:runs/sft", log=lines.append) == "chatml"
    assert lines == ["chat template: chatml, as checkpoint:runs/sft trained with (data.chat_template is unset)"]
    lines.clear()
    assert resolve_template("llama3", "chatml", source="checkpoint:runs/sft", log=lines.append) == "llama3"
    assert lines == ["chat template: llama3 (data.chat_template), although checkpoint:runs/sft trained with chatml"]
    lines.clear()
    assert resolve_template("", "", log=lines.append) == "plain" and lines == []
    assert resolve_template("chatml", "chatml", log=lines.append) == "chatml" and lines == []
    with pytest.raises(DataError, match="'chatlm' is unknown"):
        resolve_template("chatlm", "")


def test_a_run_records_the_template_only_when_its_data_held_conversations():
    from flaxalign.data.chat import is_conversation, trained_template

    assert is_conversation({"messages": [{"role": "user", "content": "hi"}]})
    assert is_conversation({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"})
    assert not is_conversation({"prompt": "q", "completion": "a"})
    assert trained_template("chatml", 3, "") == "chatml"
    assert trained_template("plain", 0, "chatml") == "chatml"  # raw text on top of a chatml model: still chatml
    assert trained_template("plain", 0, "") == ""
