"""A model's own chat template: the Jinja of its tokenizer (tokenizer_config.json, chat_template.jinja or a GGUF
file's `tokenizer.chat_template`), rendered as transformers' `apply_chat_template` renders it, with the tokens of
the assistant turns marked for training.

Rendering follows transformers: a sandboxed, immutable Jinja environment with `trim_blocks` and `lstrip_blocks`,
the `loopcontrols` extension, a `tojson` filter, and `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
`raise_exception` and `strftime_now` in the context. The ids are those of the whole rendered text, encoded at once
with special tokens recognised (transformers' `tokenize=True`).

Which tokens are the assistant's:
* a template that marks them with `{% generation %} … {% endgeneration %}` (the convention of transformers'
  `return_assistant_tokens_mask`): the tokens that overlap the text rendered inside those blocks, exactly as
  transformers marks them;
* any other template: rendered turn by turn. For each assistant message at index k, the text of messages[:k]
  with the generation prompt and the text of messages[:k+1] must both start the whole conversation's text; the
  assistant span is what the second adds to the first — the answer and the template's end-of-turn text — with
  trailing whitespace left out (so chatml trains `answer<|im_end|>` but not the newline after it, as the built-in
  templates do). A template whose earlier turns change when later ones follow (some drop reasoning from past
  turns) is refused with one line: add `{% generation %}` to it.
"""

import dataclasses
import datetime
import functools
import json

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flaxalign.errors import DataError


class _GenerationBlocks(Extension):
    """`{% generation %}…{% endgeneration %}`: renders its body and, while a render is recording, notes the
    [start, end) characters the body occupies in the output."""

    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        self.output: list[str] | None = None  # the chunks rendered so far, while recording
        self.spans: list[tuple[int, int]] = []

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark", []), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        text = caller()
        if self.output is not None:
            start = sum(map(len, self.output))
            self.spans.append((start, start + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: no HTML escaping, unlike Jinja's own tojson
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@dataclasses.dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[tuple[int, int]] | None  # assistant character spans from {% generation %}; None without the tag


class JinjaTemplate:
    """A compiled chat template (one per template source; see `compiled`)."""

    def __init__(self, source: str):
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[_GenerationBlocks, loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _now
        self._generation = environment.extensions[_GenerationBlocks.identifier]
        try:
            self._template = environment.from_string(source)
        except jinja2.exceptions.TemplateError as error:
            raise DataError(f"the chat template does not compile as Jinja ({error}).") from None
        self.marks_generation = "generation" in source and "endgeneration" in source

    def render(self, messages, *, add_generation_prompt: bool, bos_token: str, eos_token: str,
               where: str) -> Rendered:
        output: list[str] = []
        self._generation.output, self._generation.spans = output, []
        try:
            for chunk in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 bos_token=bos_token, eos_token=eos_token):
                output.append(chunk)
        except jinja2.exceptions.TemplateError as error:
            raise DataError(f"{where}: the chat template refused the conversation ({error}).") from None
        finally:
            self._generation.output = None
        return Rendered("".join(output), list(self._generation.spans) if self.marks_generation else None)


@functools.lru_cache(maxsize=8)
def compiled(source: str) -> JinjaTemplate:
    return JinjaTemplate(source)


def own_template(tokenizer) -> str:
    """The tokenizer's own Jinja template, or a DataError saying it has none."""
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        raise DataError(f"tokenizer '{tokenizer.model_path}' has no chat template of its own (chat template "
                        "'jinja' renders the tokenizer's); name one of flaxalign's templates instead.")
    return source


def _special_text(tokenizer, token_id) -> str:
    return "" if token_id is None else tokenizer.decode([token_id])


def render_own(messages, tokenizer, *, add_generation_prompt: bool, where: str):
    """(ids, assistant mask) of a conversation in the tokenizer's own template (see the module docstring)."""
    template = compiled(own_template(tokenizer))
    bos, eos = _special_text(tokenizer, tokenizer.bos_id), _special_text(tokenizer, tokenizer.eos_id)

    def render(turns, generation_prompt):
        return template.render(list(turns), add_generation_prompt=generation_prompt, bos_token=bos,
                               eos_token=eos, where=where)

    whole = render(messages, add_generation_prompt)
    spans = whole.spans if whole.spans is not None else _turn_by_turn_spans(messages, whole.text, render, where)
    if not hasattr(tokenizer, "encode_with_offsets"):
        raise DataError(f"tokenizer '{tokenizer.model_path}' gives no character offsets, which chat template "
                        "'jinja' needs; use a tokenizer.json or GGUF tokenizer.")
    ids, offsets = tokenizer.encode_with_offsets(whole.text)
    mask = [int(any(start < span_end and span_start < end for span_start, span_end in spans))
            for start, end in offsets]
    return ids, mask


def _turn_by_turn_spans(messages, text, render, where):
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:index], True).text if index else ""
        through = render(messages[:index + 1], False).text
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(f"{where}: the chat template renders message {index} (assistant) differently once "
                            "later messages follow, so its tokens cannot be found turn by turn; mark the "
                            "assistant text with {% generation %} … {% endgeneration %} in the template.")
        spans.append((len(before), len(through.rstrip())))
    return spans
