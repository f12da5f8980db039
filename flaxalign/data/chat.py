"""Chat templates: a conversation becomes token ids plus a mask of the tokens to train on.

A conversation is a list of {"role": ..., "content": ...} messages; roles are
"system" (first message only), "user" and "assistant"; content is a string.

Templates (the text `render_chat_text` returns):

* `chatml` (Qwen2, SmolLM2-Instruct, ...), per message
  `<|im_start|>{role}\\n{content}<|im_end|>\\n`; generation prompt
  `<|im_start|>assistant\\n`.  No default system message is inserted.
* `llama3` (Meta-Llama-3-Instruct), `<|begin_of_text|>` once, then per message
  `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>`;
  generation prompt `<|start_header_id|>assistant<|end_header_id|>\\n\\n`.
* `gemma` (Gemma 2 / 3): `<bos>` once, then per message
  `<start_of_turn>{role}\n{content.strip()}<end_of_turn>\n` with role "model" for the assistant; a system
  message has no turn of its own: its content and a blank line open the first user message.  Generation prompt
  `<start_of_turn>model\n`.
* `jinja`: the tokenizer's own Jinja chat template, rendered as transformers does (`flaxalign.data.jinja_chat`).
* `plain`, for tokenizers without chat tokens: messages `System: {content}`,
  `User: {content}` and `Assistant: {content}{EOS}` joined by a blank line
  ("\\n\\n"); generation prompt `Assistant:` (after a blank line).  The space
  after "Assistant:" belongs to the answer, so a prompt never ends in a space.
  The EOS is the tokenizer's EOS id; in the text it is `eos_token`.

The assistant mask is 1 on the tokens of each assistant message's content and
its end token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, or EOS for `plain`; for `plain`
also the space before the content) and 0 elsewhere: role headers, system and
user messages, separators and the generation prompt.

Ids are built segment by segment so that the mask is exact: special tokens
become their ids directly, and each run of text with the same mask value is
encoded on its own, so no token is half prompt, half answer.  This equals
encoding the whole rendered text when the tokenizer's pre-tokenizer already
splits at the edges of the answers, which byte-level BPE (Llama-3, Qwen2 and
GPT-2/SmolLM styles) and flaxalign's SentencePiece models do for answers that
start with a non-space character (llama3 strips answers).  When an answer
starts with whitespace a GPT-2-style tokenizer may merge it with the header's
newline in the whole text; the segment-wise ids are kept then, like TRL's
DPOTrainer, which encodes prompt and completion separately.
"""

import dataclasses
from collections.abc import Mapping, Sequence

from flaxalign.errors import DataError

ROLES = ("system", "user", "assistant")

# The special tokens each template needs as single ids in the tokenizer.
TEMPLATE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "plain": (),
}
OWN_TEMPLATE = "jinja"  # the tokenizer's own Jinja template
TEMPLATES = (*TEMPLATE_TOKENS, OWN_TEMPLATE)
# The token that ends an assistant turn (generation should stop there); `plain` ends with EOS.
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}
# Each template as the Jinja that transformers' `apply_chat_template` runs (written into exports'
# tokenizer_config.json): the same text as `render_chat_text`, and for `plain` the tokenizer's bos first, as the
# stages write it (chatml has none; llama3 writes its own). Jinja escapes: the Python string holds '\\n'.
JINJA = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": (
        "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set lead = messages[0]['content'] + '\n\n' %}"
        "{% set turns = messages[1:] %}{% else %}{% set lead = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + "
        "'\n' + (lead if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "plain": (
        "{% if bos_token %}{{ bos_token }}{% endif %}{% for message in messages %}{% if not loop.first %}"
        "{{ '\\n\\n' }}{% endif %}{{ {'system': 'System', 'user': 'User', 'assistant': 'Assistant'}[message['role']]"
        " + ': ' + message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"),
}
# Record fields that hold a conversation (a message list) instead of text.
CONVERSATION_FIELDS = ("messages", "prompt", "chosen", "rejected", "completion")


def is_conversation(record) -> bool:
    """Whether a data record holds message lists, so that a chat template renders it."""
    return any(isinstance(record.get(field), list) for field in CONVERSATION_FIELDS)


def resolve_template(configured: str, inherited: str, *, source: str = "", log=print, tokenizer=None) -> str:
    """The template a stage renders message lists with: `configured` (`data.chat_template`) when set, else
    `inherited` — the template the run it starts from (`init_from`, named by `source`) trained with — else
    `plain`. `configured` "auto" is `inherited` when there is one, else the `tokenizer`'s own Jinja template
    (`jinja`) when it has one, else `plain`. An explicit template that differs from the inherited one is allowed
    and logged, since the model then learns a second format."""
    if configured == "auto":
        configured = inherited or (OWN_TEMPLATE if getattr(tokenizer, "chat_template", None) else "plain")
        log(f"chat template: {configured} (data.chat_template=auto)")
        return configured
    if configured and configured not in TEMPLATES:
        raise DataError(f"chat template '{configured}' is unknown; use auto or one of {', '.join(TEMPLATES)}.")
    if configured and inherited and configured != inherited:
        log(f"chat template: {configured} (data.chat_template), although {source} trained with {inherited}")
    elif not configured and inherited:
        log(f"chat template: {inherited}, as {source} trained with (data.chat_template is unset)")
    return configured or inherited or "plain"


def trained_template(template: str, records_with_messages: int, inherited: str) -> str:
    """The template to record in a run's metadata: the one it applied when its data held message lists, else the
    one its `init_from` run recorded ("" when neither: the model never saw a chat format)."""
    return template if records_with_messages else inherited


def leading_ids(tokenizer, template: str) -> list[int]:
    """The ids the stages put before a rendered conversation: BOS for `plain` (which writes none itself), nothing
    for the templates that write their own start (llama3, gemma, and most Jinja templates) or have none (chatml)."""
    return [tokenizer.bos_id] if template == "plain" and tokenizer.bos_id is not None else []


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that end a response for this tokenizer: EOS, then the end-of-turn token of each chat template whose
    tokens it has (a chatml vocabulary: `<|im_end|>`), so that a sampler stopping at any of them stops where a
    model trained in any of those formats ends its turn."""
    ids = [tokenizer.eos_id]
    for template, token in END_OF_TURN.items():
        if all(tokenizer.token_to_id(t) is not None for t in TEMPLATE_TOKENS[template]):
            ids.append(tokenizer.token_to_id(token))
    return list(dict.fromkeys(ids))


PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    """Token ids of a rendered conversation and a 0/1 mask of the assistant tokens."""

    ids: list[int]
    assistant_mask: list[int]


@dataclasses.dataclass(frozen=True)
class _Piece:
    """A stretch of the rendered conversation: text, a special token, or the EOS id."""

    kind: str  # "text", "token" (value is the token's string), "bos" or "eos"
    value: str
    trained: bool  # the assistant-mask value of its tokens


def render_chat_text(messages, template: str, add_generation_prompt: bool = False, *,
                     eos_token: str = "", bos_token: str = "", source: str = "") -> str:
    """Returns the conversation rendered as one string.

    `eos_token` is the text written where the `plain` template puts the EOS
    id (e.g. "</s>"; other templates ignore it), `bos_token` where `gemma` puts BOS.  `source` names where the
    messages come from (e.g. "'train.jsonl' line 3") in error messages.
    """
    if template == OWN_TEMPLATE:
        raise DataError("chat template 'jinja' is the tokenizer's own: render it with render_chat.")
    pieces = _render_pieces(messages, template, add_generation_prompt, source)
    special = {"eos": eos_token, "bos": bos_token}
    return "".join(special.get(piece.kind, piece.value) for piece in pieces)


def render_chat(messages, tokenizer, template: str, *, add_generation_prompt: bool = False,
                source: str = "") -> ChatTokens:
    """Returns the conversation's token ids and assistant mask (see the module docstring).

    `tokenizer` is a `Tokenizer` or `HFTokenizer`; no bos is added beyond
    what the template writes (llama3's `<|begin_of_text|>`).  `source` names
    where the messages come from in error messages.
    """
    if template == OWN_TEMPLATE:
        from flaxalign.data import jinja_chat

        _check_messages(messages, source or "the conversation")
        ids, mask = jinja_chat.render_own(messages, tokenizer, add_generation_prompt=add_generation_prompt,
                                          where=source or "the conversation")
        return ChatTokens(ids=ids, assistant_mask=mask)
    pieces = _render_pieces(messages, template, add_generation_prompt, source)
    token_ids = _template_token_ids(tokenizer, template)
    ids, mask = [], []
    for piece in _merge_text(pieces):
        if piece.kind == "text":
            piece_ids = tokenizer.encode(piece.value)
        elif piece.kind == "token":
            piece_ids = [token_ids[piece.value]]
        elif piece.kind == "bos":
            piece_ids = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        else:
            piece_ids = [tokenizer.eos_id]
        ids.extend(piece_ids)
        mask.extend([int(piece.trained)] * len(piece_ids))
    return ChatTokens(ids=ids, assistant_mask=mask)


def _render_pieces(messages, template, add_generation_prompt, source):
    """Checks the messages and returns the template's pieces for them."""
    if template not in TEMPLATE_TOKENS:
        raise DataError(f"chat template '{template}' is unknown; use one of {', '.join(TEMPLATES)}.")
    _check_messages(messages, source or "the conversation")
    render = {"chatml": _chatml_pieces, "llama3": _llama3_pieces, "gemma": _gemma_pieces,
              "plain": _plain_pieces}[template]
    return render(messages, add_generation_prompt)


def _chatml_pieces(messages, add_generation_prompt):
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message."""
    pieces = []
    for message in messages:
        trained = message["role"] == "assistant"
        pieces += [
            _token("<|im_start|>"), _text(message["role"] + "\n"),
            _text(message["content"], trained), _token("<|im_end|>", trained), _text("\n"),
        ]
    if add_generation_prompt:
        pieces += [_token("<|im_start|>"), _text("assistant\n")]
    return pieces


def _llama3_pieces(messages, add_generation_prompt):
    """`<|begin_of_text|>`, then a header, the stripped content and `<|eot_id|>` per message."""
    pieces = [_token("<|begin_of_text|>")]
    for message in messages:
        trained = message["role"] == "assistant"
        # Meta's template applies Jinja's `trim`, which is str.strip().
        pieces += _llama3_header(message["role"]) + [
            _text(message["content"].strip(), trained), _token("<|eot_id|>", trained),
        ]
    if add_generation_prompt:
        pieces += _llama3_header("assistant")
    return pieces


def _llama3_header(role):
    return [_token("<|start_header_id|>"), _text(role), _token("<|end_header_id|>"), _text("\n\n")]


def _gemma_pieces(messages, add_generation_prompt):
    """`<bos>`, then `<start_of_turn>{user|model}\n{stripped content}<end_of_turn>\n` per message; a system
    message's content and a blank line open the first user turn (not stripped, as in Gemma's template)."""
    pieces = [_Piece("bos", "", False)]
    lead = ""
    if messages[0]["role"] == "system":
        lead, messages = messages[0]["content"] + "\n\n", messages[1:]
    for index, message in enumerate(messages):
        trained = message["role"] == "assistant"
        header = ("model" if trained else "user") + "\n" + (lead if index == 0 else "")
        pieces += [_token("<start_of_turn>"), _text(header), _text(message["content"].strip(), trained),
                   _token("<end_of_turn>", trained), _text("\n")]
    if add_generation_prompt:
        pieces += [_token("<start_of_turn>"), _text("model\n")]
    return pieces


def _plain_pieces(messages, add_generation_prompt):
    """`Role: content` per message, blank lines between, EOS after each assistant answer."""
    pieces = []
    for index, message in enumerate(messages):
        trained = message["role"] == "assistant"
        if index:
            pieces.append(_text("\n\n"))
        pieces += [_text(PLAIN_ROLE_NAMES[message["role"]] + ":"), _text(" " + message["content"], trained)]
        if trained:
            pieces.append(_Piece("eos", "", True))
    if add_generation_prompt:
        pieces += [_text("\n\n"), _text("Assistant:")]
    return pieces


def _text(value, trained=False):
    return _Piece("text", value, trained)


def _token(value, trained=False):
    return _Piece("token", value, trained)


def _merge_text(pieces):
    """Joins neighbouring text pieces with the same mask value, so that only
    special tokens and the edges of assistant answers split the encoding."""
    merged = []
    for piece in pieces:
        previous = merged[-1] if merged else None
        if (piece.kind == "text" and previous is not None and previous.kind == "text"
                and previous.trained == piece.trained):
            merged[-1] = _text(previous.value + piece.value, piece.trained)
        elif piece.kind != "text" or piece.value:
            merged.append(piece)
    return merged


def _template_token_ids(tokenizer, template):
    """Returns {token: id} for the template's special tokens, or a DataError naming a missing one."""
    token_ids = {}
    for token in TEMPLATE_TOKENS[template]:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise DataError(
                f"tokenizer '{tokenizer.model_path}' has no '{token}' token, which chat template "
                f"'{template}' needs; use a tokenizer that has it or the 'plain' template."
            )
        token_ids[token] = token_id
    return token_ids


def _check_messages(messages, where):
    """Raises a DataError naming the first message that is not a valid chat message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise DataError(f"{where} has no messages; it must be a non-empty list of role/content dicts.")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(f"message {index} of {where} is not a dict with 'role' and 'content'.")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(
                f"message {index} of {where} has role {role!r}; roles are system, user and assistant."
            )
        if not isinstance(content, str):
            raise DataError(
                f"message {index} of {where} has content of type {type(content).__name__}; "
                "content must be a string."
            )
        if role == "system" and index > 0:
            raise DataError(f"message {index} of {where} is a system message; only the first message may be one.")
