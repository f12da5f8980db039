"""`HFTokenizer`: a Hugging Face `tokenizer.json` (the format Llama-3, Qwen2 and SmolLM ship) through the
`tokenizers` package, with the interface of `flaxalign.data.tokenizer.TextTokenizer`; see its docstring for how
the special ids are found.  Pad differs from EOS where it can: a tokenizer without such a pad gets a new special
token "<|pad|>", unless it sits in a model directory whose embedding has no row for one (then pad = EOS; flaxalign
marks padding with masks, never by comparing ids with pad).

`flaxalign.data.tokenizer` re-exports it next to the SentencePiece `Tokenizer` and `load_tokenizer`;
`flaxalign.data.gguf_tokenizer.GGUFTokenizer` builds on it.
"""

import json
import logging
import os

import tokenizers

from flaxalign.errors import DataError

_LOG = logging.getLogger(__name__)

# The token added to HF tokenizers that have no pad distinct from EOS.
ADDED_PAD_TOKEN = "<|pad|>"

# Files next to tokenizer.json that name the special tokens; a later file
# overrides an earlier one, as in transformers.
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (Llama-3, Qwen2, SmolLM, ...) with `Tokenizer`'s interface.

    Special tokens come, lowest priority first, from `tokenizer_config.json`,
    then `special_tokens_map.json` (both next to tokenizer.json, when present;
    values are strings or {"content": ...} dicts), then the constructor's
    arguments, which is transformers' order.  EOS is required; bos and unk may
    be None.  If there is no pad, or pad equals EOS, the special token
    "<|pad|>" is added in memory (vocab_size grows by one, the file is not
    changed) and a notice is logged — except next to a model's config.json
    whose `vocab_size` leaves no embedding row for it: then pad is EOS (a
    pretrained model's vocabulary cannot grow).

    `encode` adds no bos/eos (the file's post-processor is not applied), and
    special tokens written in the text (e.g. "<|im_start|>") become their ids.
    Padding and truncation settings stored in the file are switched off.
    """

    def __init__(self, model_path: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None):
        self._model_path = model_path
        self._tokenizer = _read_tokenizer_json(model_path)
        arguments = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token,
                     "unk_token": unk_token}
        tokens = _special_token_names(model_path, arguments)
        ids = {key: self._special_id(key, *tokens[key]) for key in tokens}
        if ids.get("eos_token") is None:
            raise DataError(
                f"tokenizer '{model_path}' has no known EOS token: add a tokenizer_config.json "
                "with eos_token next to it or pass eos_token."
            )
        self._eos_id = ids["eos_token"]
        self._bos_id = ids.get("bos_token")
        self._unk_id = ids.get("unk_token", self._model_unk_id())
        self._pad_id = ids.get("pad_token")
        if self._pad_id is None or self._pad_id == self._eos_id:
            model_rows = _model_vocab_size(model_path)
            if model_rows is not None and model_rows <= _vocab_size(self._tokenizer):
                self._pad_id = self._eos_id
            else:
                self._pad_id = self._add_pad_token()
        # The vocabulary is fixed from here on; get_vocab copies it (128k entries for Llama-3).
        self._vocab_size = _vocab_size(self._tokenizer)

    @classmethod
    def load(cls, model_path: str, **special_tokens) -> "HFTokenizer":
        """Same as the constructor; mirrors `Tokenizer.load`."""
        return cls(model_path, **special_tokens)

    @property
    def model_path(self) -> str:
        return self._model_path

    @property
    def vocab_size(self) -> int:
        """One more than the largest id, added tokens included (the embedding rows needed)."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    def encode(self, text: str) -> list[int]:
        """Returns the token ids of text, without bos or eos."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text` (as `encode`) and each token's [start, end) character span in it."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(span) for span in encoding.offsets]

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own Jinja chat template: `chat_template` of the tokenizer_config.json next to
        tokenizer.json (a string, or the "default" entry of a list of named templates), else a
        chat_template.jinja file there; None when there is neither."""
        return _own_chat_template(os.path.dirname(os.path.abspath(self._model_path)))

    def encode_batch(self, texts) -> list[list[int]]:
        """Encodes many texts at once, in parallel Rust threads (no offsets computed)."""
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids) -> str:
        """Returns the text of token ids, special tokens included (numpy arrays are accepted)."""
        return self._tokenizer.decode([int(token) for token in ids], skip_special_tokens=False)

    def decode_batch(self, rows) -> list[str]:
        """`decode` of each row (lists of ints) in one call into the Rust tokenizer."""
        return self._tokenizer.decode_batch([list(row) for row in rows], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        """Returns the id of a token (e.g. "<|im_start|>"), or None if there is none."""
        return self._tokenizer.token_to_id(token)

    def save_pretrained(self, directory: str, chat_template: str | None = None) -> list[str]:
        """Writes tokenizer.json (any in-memory pad included) and a tokenizer_config.json naming the special
        tokens, so that transformers' `AutoTokenizer` and `load_tokenizer` read the same ids; returns the files.
        `chat_template` (Jinja) replaces the tokenizer's own (a GGUF file's) in tokenizer_config.json."""
        os.makedirs(directory, exist_ok=True)
        json_path = os.path.join(directory, "tokenizer.json")
        self._tokenizer.save(json_path)
        ids = {"bos_token": self._bos_id, "eos_token": self._eos_id, "pad_token": self._pad_id,
               "unk_token": self._unk_id}
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  **{key: self._tokenizer.id_to_token(i) for key, i in ids.items() if i is not None}}
        chat_template = chat_template or getattr(self, "chat_template", None)
        if chat_template:
            config["chat_template"] = chat_template
        config_path = os.path.join(directory, "tokenizer_config.json")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        return [json_path, config_path]

    def _special_id(self, key, token, source):
        """Returns the id of a configured special token, or None when it is unset."""
        if token is None:
            return None
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise DataError(f"{key} '{token}' from {source} is not a token of '{self._model_path}'.")
        return token_id

    def _model_unk_id(self):
        """Returns the id of the model's own unk token (BPE/WordPiece), if it has one."""
        unk_token = getattr(self._tokenizer.model, "unk_token", None)
        return self._tokenizer.token_to_id(unk_token) if unk_token else None

    def _add_pad_token(self):
        """Adds "<|pad|>" as a special token (or reuses it) and returns its id."""
        pad_id = self._tokenizer.token_to_id(ADDED_PAD_TOKEN)
        if pad_id is None:
            self._tokenizer.add_special_tokens([tokenizers.AddedToken(ADDED_PAD_TOKEN, special=True)])
            pad_id = self._tokenizer.token_to_id(ADDED_PAD_TOKEN)
        _LOG.info("tokenizer %s has no pad token distinct from EOS; using %s as pad, id %d "
                  "(vocab_size %d).", self._model_path, ADDED_PAD_TOKEN, pad_id, _vocab_size(self._tokenizer))
        return pad_id


def _vocab_size(tokenizer):
    """Returns one more than the largest id; ids of added tokens may leave gaps."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def _model_vocab_size(model_path):
    """The `vocab_size` of the model config.json next to a tokenizer file, or None when there is none."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path) as f:
            return int(json.load(f)["vocab_size"])
    except (ValueError, KeyError, TypeError):
        return None


def _read_tokenizer_json(model_path):
    """Returns the `tokenizers.Tokenizer` of a file, with padding and truncation off."""
    if not os.path.isfile(model_path):
        raise DataError(f"tokenizer file '{model_path}' does not exist.")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(model_path)
    except Exception:  # noqa: BLE001 - tokenizers raises plain Exception for any parse error.
        raise DataError(f"tokenizer file '{model_path}' is not a valid tokenizer.json.") from None
    # A file may ask for padding or truncation; encode must return every token.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _own_chat_template(folder: str) -> str | None:
    config_path = os.path.join(folder, "tokenizer_config.json")
    template = None
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as handle:
                template = json.load(handle).get("chat_template")
        except (OSError, ValueError, AttributeError) as error:
            raise DataError(f"tokenizer config '{config_path}' is not a readable JSON object ({error}).") from None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((entry.get("template") for entry in template
                         if isinstance(entry, dict) and entry.get("name") == "default"), None)
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if not template and os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as handle:
            template = handle.read()
    return template if isinstance(template, str) and template.strip() else None


def _special_token_names(model_path, arguments):
    """Returns {key: (token or None, source)} for the special-token keys that are set anywhere."""
    names = {}
    folder = os.path.dirname(os.path.abspath(model_path))
    for file_name in SPECIAL_TOKEN_FILES:
        config_path = os.path.join(folder, file_name)
        if os.path.isfile(config_path):
            names.update(_special_tokens_in_file(config_path))
    for key, token in arguments.items():
        if token is not None:
            names[key] = (token, f"the {key} argument")
    return names


def _special_tokens_in_file(config_path):
    """Reads bos/eos/pad/unk tokens from a tokenizer_config.json-style file."""
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise DataError(f"tokenizer config '{config_path}' is not readable JSON ({error}).") from None
    if not isinstance(config, dict):
        raise DataError(f"tokenizer config '{config_path}' is not a JSON object.")
    names = {}
    for key in SPECIAL_TOKEN_KEYS:
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            raise DataError(f"{key} in tokenizer config '{config_path}' is neither a string nor a dict with content.")
        names[key] = (value, f"'{config_path}'")
    return names
