"""Parity of flaxalign.data.chat with transformers' apply_chat_template on the published templates."""

import pytest
import tokenizers

from flaxalign.data.chat import render_chat, render_chat_text
from flaxalign.data.tokenizer import HFTokenizer
from tests.data.test_chat import CONVERSATION
from tests.data.test_jinja_chat import GEMMA_TOKENS
from tests.data.test_tokenizer_hf import CHAT_TOKENS, build_hf_tokenizer, training_documents

pytestmark = pytest.mark.parity

# The generic ChatML template (transformers' docs; Qwen2's without its default system message).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The same two with {% generation %} around the trained part, for transformers' assistant masks.
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
)
LLAMA3_GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
)
# Gemma 2's published template (no system role; roles must alternate).
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE}
GENERATION_TEMPLATES = {"chatml": CHATML_GENERATION_TEMPLATE, "llama3": LLAMA3_GENERATION_TEMPLATE}
CONVERSATIONS = [
    CONVERSATION,
    CONVERSATION[:4],
    [{"role": "user", "content": "  Padded question \n"}, {"role": "assistant", "content": "\n Padded answer.  "}],
]


@pytest.fixture(scope="module")
def transformers():
    # Imported only when these tests run: importing transformers adds methods to
    # logging.Logger, which changes stdlib_corpus() for the rest of the process.
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return build_hf_tokenizer(tmp_path_factory.mktemp("parity") / "tokenizer.json", training_documents(),
                              special_tokens=CHAT_TOKENS + GEMMA_TOKENS)


def hf_tokenizer(transformers, tokenizer_path, chat_template):
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_file(tokenizer_path), chat_template=chat_template,
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
    )


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_text_equals_apply_chat_template(transformers, tokenizer_path, template, add_generation_prompt):
    reference = hf_tokenizer(transformers, tokenizer_path, TEMPLATES[template])
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert render_chat_text(messages, template, add_generation_prompt) == expected


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_ids_and_mask_equal_transformers_assistant_masks(transformers, tokenizer_path, template):
    reference = hf_tokenizer(transformers, tokenizer_path, GENERATION_TEMPLATES[template])
    ours = HFTokenizer(tokenizer_path, eos_token="<|eot_id|>")
    # Not the padded conversation: its chatml answer starts with "\n", which whole-text
    # encoding merges with the header's "\n" and flaxalign keeps apart (see chat.py).
    for messages in CONVERSATIONS[:2]:
        expected = reference.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        tokens = render_chat(messages, ours, template)
        assert tokens.ids == list(expected["input_ids"])
        assert tokens.assistant_mask == list(expected["assistant_masks"])


@pytest.mark.parametrize("template", ["chatml", "llama3", "gemma", "plain"])
def test_the_exported_jinja_gives_the_training_ids_in_transformers(transformers, tokenizer_path, template, tmp_path):
    """What `convert` writes into tokenizer_config.json (`chat.JINJA`) makes `apply_chat_template` reproduce the ids
    the stages trained on, token for token: the generation prompt and whole conversations (plain's bos included)."""
    from flaxalign.data.chat import JINJA

    ours = HFTokenizer(tokenizer_path, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    ours.save_pretrained(str(tmp_path), JINJA[template])
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    lead = [ours.bos_id] if template == "plain" else []  # the stages' rule (sft_example, prompt_example)
    for messages in CONVERSATIONS[:2] + [[{"role": "system", "content": "Be brief."}, *CONVERSATION[-2:-1]]]:
        prompt = messages if messages[-1]["role"] == "user" else messages[:-1]
        expected = reference.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        assert lead + render_chat(prompt, ours, template, add_generation_prompt=True).ids == list(
            expected["input_ids"])
        if messages[-1]["role"] == "assistant":
            whole = reference.apply_chat_template(messages, tokenize=True, return_dict=True)
            assert lead + render_chat(messages, ours, template).ids == list(whole["input_ids"])


def _own(tokenizer_path, folder, template, bos="<|begin_of_text|>", eos="<|eot_id|>"):
    """An HFTokenizer whose own template (tokenizer_config.json) is `template`: chat template `jinja`."""
    import json
    import shutil

    folder.mkdir()
    shutil.copy(tokenizer_path, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos,
                                                              "chat_template": template}))
    return HFTokenizer(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_jinja_ids_and_masks_equal_transformers_with_generation_marks(transformers, tokenizer_path, template,
                                                                       tmp_path):
    """Chat template `jinja` renders and encodes as apply_chat_template(return_assistant_tokens_mask=True), the
    conversation whose answers start with whitespace included (whole-text encoding, as transformers)."""
    reference = hf_tokenizer(transformers, tokenizer_path, GENERATION_TEMPLATES[template])
    ours = _own(tokenizer_path, tmp_path / "own", GENERATION_TEMPLATES[template])
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        tokens = render_chat(messages, ours, "jinja")
        assert tokens.ids == list(expected["input_ids"])
        assert tokens.assistant_mask == list(expected["assistant_masks"])


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_jinja_without_marks_finds_the_answers_transformers_marks(transformers, tokenizer_path, template, tmp_path):
    """The published templates have no {% generation %}: turn-by-turn rendering finds the tokens transformers
    marks in the marked variant, and the ids are apply_chat_template's."""
    marked = hf_tokenizer(transformers, tokenizer_path, GENERATION_TEMPLATES[template])
    published = hf_tokenizer(transformers, tokenizer_path, TEMPLATES[template])
    ours = _own(tokenizer_path, tmp_path / "own", TEMPLATES[template])
    for messages in CONVERSATIONS:
        ids = published.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        masks = marked.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)["assistant_masks"]
        tokens = render_chat(messages, ours, "jinja")
        assert tokens.ids == list(ids)
        assert tokens.assistant_mask == list(masks)


def test_gemma_equals_gemma2s_published_template(transformers, tokenizer_path, tmp_path):
    reference = hf_tokenizer(transformers, tokenizer_path, GEMMA2_TEMPLATE)
    reference.bos_token = "<bos>"
    ours = _own(tokenizer_path, tmp_path / "own", GEMMA2_TEMPLATE, bos="<bos>", eos="<eos>")
    for messages in (CONVERSATION[1:], CONVERSATION[1:3], CONVERSATIONS[2]):
        for generation_prompt in (False, True):
            turns = messages[:-1] if generation_prompt else messages
            text = reference.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
            assert render_chat_text(turns, "gemma", generation_prompt, bos_token="<bos>") == text
            ids = reference.apply_chat_template(turns, tokenize=True, add_generation_prompt=generation_prompt,
                                                return_dict=True)["input_ids"]
            assert render_chat(turns, ours, "jinja", add_generation_prompt=generation_prompt).ids == list(ids)
    with pytest.raises(Exception, match="System role not supported"):
        render_chat(CONVERSATION, ours, "jinja")
