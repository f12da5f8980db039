"""Chat template `jinja` (the tokenizer's own Jinja) and `gemma`: the built-in templates written as Jinja render to
the built-in ids and masks; `{% generation %}` marks give the same masks as turn-by-turn rendering; templates that
cannot be split turn by turn, that raise, or that are missing stop with one line; `auto` picks the inherited
template, else the tokenizer's own, else plain. (transformers' own rendering: tests/data/test_chat_parity.py.)"""

import json

import pytest

from flaxalign.data import chat
from flaxalign.data.chat import JINJA, leading_ids, render_chat, render_chat_text, resolve_template
from flaxalign.data.tokenizer import HFTokenizer
from flaxalign.errors import DataError
from tests.data.test_chat import CONVERSATION
from tests.data.test_tokenizer_hf import CHAT_TOKENS, build_hf_tokenizer, training_documents

GEMMA_TOKENS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
# CONVERSATION in Gemma's format, written out by hand: the system message opens the first user turn.
GEMMA_REFERENCE = (
    "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nWhat is the capital of France?<end_of_turn>\n"
    "<start_of_turn>model\nThe capital of France is Paris.<end_of_turn>\n"
    "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
    "<start_of_turn>model\nRome.\n\nIt has been the capital since 1871.<end_of_turn>\n"
)
# chatml with the trained part marked, as transformers' return_assistant_tokens_mask wants it.
CHATML_GENERATION = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    return build_hf_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", training_documents(),
                              special_tokens=CHAT_TOKENS + GEMMA_TOKENS)


def _with_template(folder, tokenizer_json, template, *, as_file=False, bos="<bos>", eos="<eos>"):
    """A tokenizer folder whose own chat template is `template` (in tokenizer_config.json or chat_template.jinja)."""
    folder.mkdir(exist_ok=True)
    path = folder / "tokenizer.json"
    path.write_bytes(open(tokenizer_json, "rb").read())
    config = {"bos_token": bos, "eos_token": eos}
    if as_file:
        (folder / "chat_template.jinja").write_text(template)
    elif template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return HFTokenizer(str(path))


def test_gemma_text_and_generation_prompt():
    assert render_chat_text(CONVERSATION, "gemma", bos_token="<bos>") == GEMMA_REFERENCE
    prompt = render_chat_text(CONVERSATION[1:2], "gemma", add_generation_prompt=True, bos_token="<bos>")
    assert prompt == "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("template", ["chatml", "llama3", "gemma", "plain"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_builtin_templates_as_jinja_give_the_builtin_ids_and_masks(tokenizer_json, tmp_path, template,
                                                                   add_generation_prompt):
    """The same conversations through the Jinja path (whole text encoded, turn-by-turn spans) and the built-in
    renderer (segment-wise): equal ids and masks, the stages' leading BOS included."""
    bos, eos = {"llama3": ("<|begin_of_text|>", "<|eot_id|>")}.get(template, ("<bos>", "<eos>"))
    own = _with_template(tmp_path / template, tokenizer_json, JINJA[template], bos=bos, eos=eos)
    for messages in (CONVERSATION, CONVERSATION[:3], CONVERSATION[1:3], CONVERSATION[:4]):
        if add_generation_prompt and messages[-1]["role"] != "user":
            messages = messages[:-1]
        builtin = render_chat(messages, own, template, add_generation_prompt=add_generation_prompt)
        jinja = render_chat(messages, own, "jinja", add_generation_prompt=add_generation_prompt)
        lead = leading_ids(own, template)
        assert jinja.ids == lead + builtin.ids
        assert jinja.assistant_mask == [0] * len(lead) + builtin.assistant_mask
        assert leading_ids(own, "jinja") == []


def test_generation_marks_give_the_turn_by_turn_masks(tokenizer_json, tmp_path):
    marked = _with_template(tmp_path / "marked", tokenizer_json, CHATML_GENERATION)
    plain = _with_template(tmp_path / "plain", tokenizer_json, JINJA["chatml"])
    for messages in (CONVERSATION, CONVERSATION[:3]):
        assert render_chat(messages, marked, "jinja") == render_chat(messages, plain, "jinja")
    assert 1 in render_chat(CONVERSATION, marked, "jinja").assistant_mask


def test_the_own_template_is_read_from_the_tokenizer_files(tokenizer_json, tmp_path):
    assert _with_template(tmp_path / "a", tokenizer_json, "{{ 'x' }}").chat_template == "{{ 'x' }}"
    named = [{"name": "tool_use", "template": "{{ 't' }}"}, {"name": "default", "template": "{{ 'd' }}"}]
    assert _with_template(tmp_path / "b", tokenizer_json, named).chat_template == "{{ 'd' }}"
    assert _with_template(tmp_path / "c", tokenizer_json, "{{ 'f' }}", as_file=True).chat_template == "{{ 'f' }}"
    assert _with_template(tmp_path / "d", tokenizer_json, None).chat_template is None


def test_an_hf_export_keeps_the_tokenizers_own_template(tokenizer_json, tmp_path):
    own = _with_template(tmp_path / "own", tokenizer_json, CHATML_GENERATION)
    own.save_pretrained(str(tmp_path / "export"))
    assert json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())["chat_template"] == \
        CHATML_GENERATION


@pytest.mark.parametrize("template, message", [
    (None, "has no chat template of its own"),
    ("{% for m in messages %}{{ raise_exception('Conversation roles must alternate') }}{% endfor %}",
     r"^train.jsonl line 3: the chat template refused the conversation \(Conversation roles must alternate\)\.$"),
    ("{% for m in messages %}{{ m['content'] if loop.last or m['role'] != 'assistant' else '[earlier answer]' }}"
     "{% endfor %}", r"^train.jsonl line 3: the chat template renders message 2 \(assistant\) differently once "),
    ("{% for m in messages %}", "does not compile as Jinja"),
])
def test_templates_that_cannot_be_used_are_one_line(tokenizer_json, tmp_path, template, message):
    own = _with_template(tmp_path / "bad", tokenizer_json, template)
    with pytest.raises(DataError, match=message):
        render_chat(CONVERSATION, own, "jinja", source="train.jsonl line 3")


def test_auto_is_the_inherited_template_else_the_tokenizers_own_else_plain(tokenizer_json, tmp_path):
    own = _with_template(tmp_path / "own", tokenizer_json, JINJA["chatml"])
    bare = _with_template(tmp_path / "bare", tokenizer_json, None)
    logged = []
    assert resolve_template("auto", "llama3", tokenizer=own, log=logged.append) == "llama3"
    assert resolve_template("auto", "", tokenizer=own, log=logged.append) == chat.OWN_TEMPLATE
    assert resolve_template("auto", "", tokenizer=bare, log=logged.append) == "plain"
    assert logged[1] == "chat template: jinja (data.chat_template=auto)"
    assert resolve_template("jinja", "", tokenizer=own, log=logged.append) == "jinja"
