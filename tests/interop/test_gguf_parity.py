"""SmolLM2-135M-Instruct (Q4_1 GGUF, from `launch/fetch_smollm2.sh`) loads into flaxalign like transformers loads it:
the same perplexity on English prose, a sensible greedy ChatML answer, and the same token ids as transformers'
GGUF tokenizer — except where transformers drops the file's "smollm" digit split, where ours matches llama.cpp.

The file is found through $FLAXALIGN_SMOLLM2_GGUF or $FLAXALIGN_MODELS/smollm2/*.gguf (default .cache/); the tests
skip without it.
"""

import glob
import os

import jax
import numpy as np
import pytest

from flaxalign import interop, models
from flaxalign.data import chat
from flaxalign.data.batching import left_pad_prompts
from flaxalign.generate import decode_responses
from flaxalign.interop import gguf as gguf_io
from flaxalign.sampler import generate

pytestmark = pytest.mark.parity


# Jane Austen, Pride and Prejudice (1813), chapter 1: public domain.
PROSE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of "
    "a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, "
    "this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful "
    "property of some one or other of their daughters. \"My dear Mr. Bennet,\" said his lady to him one day, "
    "\"have you heard that Netherfield Park is let at last?\" Mr. Bennet replied that he had not. \"But it is,\" "
    "returned she; \"for Mrs. Long has just been here, and she told me all about it.\" Mr. Bennet made no answer. "
    "\"Do you not want to know who has taken it?\" cried his wife impatiently. \"You want to tell me, and I have no "
    "objection to hearing it.\" This was invitation enough. \"Why, my dear, you must know, Mrs. Long says that "
    "Netherfield is taken by a young man of large fortune from the north of England.\""
)

# Varied text; none has a whitespace run right before a digit (see TRANSFORMERS_DIFFERS).
SAMPLES = [
    PROSE,
    "Hello world! I'm sure they'll say it's 2024; we've 3,000,000 users and $100.00 (or 99.5%) to spend.",
    "def f(x):\n    return x**2  # squares\n\tif x > 0:\n\t\tprint(f'{x=}')\n",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}\n<html><body class=\"x\">Hi</body></html>",
    "Unicode: café, naïve, Straße, 日本語のテキスト, русский текст, 🙂👍🏽, x½y²z, \u00a0nbsp, \x00 nul",
    "whitespace   runs\t\t\ttabs\n\n\n\nnewlines   \r\n  windows  endings    trailing   ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|endoftext|><repo_name>",
    "numbers12345and67890mixed, 3.14159, 1e-5, 0x1F, 2nd 3rd 4th, v1.2.3",
]
# Whitespace before a digit (any \p{N}: also ½ ² Ⅻ): llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own
# tokenizer.json, Digits(individual_digits) + ByteLevel) splits the digit off first, so a run of spaces stays one
# token ("x", "  ", "4", "2"); transformers 5's GGUF reader builds a plain GPT-2 ByteLevel for "smollm", which keeps
# " 4" together and so splits the run ("x", " ", " ", "4", "2").
TRANSFORMERS_DIFFERS = ["x  42", "a   12345 b", "       999", "  1 2  3", "½ ² Ⅻ"]

# llama.cpp's regexes for LLAMA_VOCAB_PRE_TYPE_SMOLLM (src/llama-vocab.cpp), applied one after the other
LLAMA_CPP_SMOLLM = [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]


def _find_gguf():
    from flaxalign import config_blocks

    path = os.environ.get("FLAXALIGN_SMOLLM2_GGUF") or next(
        iter(sorted(glob.glob(os.path.join(config_blocks.models_dir(), "smollm2", "*.gguf")))), None)
    if not path or not os.path.isfile(path):
        pytest.skip("SmolLM2 GGUF not found: run launch/fetch_smollm2.sh or set FLAXALIGN_SMOLLM2_GGUF.")
    return path


@pytest.fixture(scope="module")
def path():
    return _find_gguf()


@pytest.fixture(scope="module")
def ours(path):
    return gguf_io.load_gguf(path, dtype="float32")


@pytest.fixture(scope="module")
def theirs(path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return torch, tokenizer, model


def _perplexity(logits, ids):
    logits = np.asarray(logits, np.float64)[:-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(np.exp(np.mean(logz - logits[np.arange(len(ids) - 1), ids[1:]])))


def test_perplexity_matches_transformers(ours, theirs):
    torch, _, model = theirs
    ids = np.asarray(ours.tokenizer.encode(PROSE))
    assert 150 < len(ids) < 300
    our_logits = np.asarray(interop.apply_lm(ours.config, ours.params, ids[None]))[0]
    with torch.no_grad():
        their_logits = model(input_ids=torch.from_numpy(ids[None])).logits[0].float().numpy()
    ppl, ref = _perplexity(our_logits, ids), _perplexity(their_logits, ids)
    logit_gap = np.abs(our_logits - their_logits).max()
    print(f"perplexity flaxalign {ppl:.4f} transformers {ref:.4f} relative diff {abs(ppl - ref) / ref:.2e} "
          f"max |logit diff| {logit_gap:.2e} ({len(ids)} tokens)")
    # measured (CPU, float32, both dequantising the same Q4_1 blocks): perplexity 20.8448 vs 20.8447, a relative
    # gap of 1.8e-7, and max |Δlogit| 8.2e-5 over all 220 × 49152 logits; the bounds leave room for another CPU's
    # summation order, not for a misread block or a wrong RoPE permutation (those move logits by whole units)
    assert 15 < ref < 30
    assert abs(ppl - ref) / ref < 1e-5
    assert logit_gap < 1e-3


def test_greedy_chatml_answer_names_paris(ours):
    tokenizer = ours.tokenizer
    assert tokenizer.chat_template_name == "chatml"
    prompt = chat.render_chat([{"role": "user", "content": "What is the capital of France?"}], tokenizer, "chatml",
                              add_generation_prompt=True).ids
    batch = left_pad_prompts([prompt], pad_id=tokenizer.pad_id)
    graphdef = models.abstract_model(ours.config)[0]
    out = jax.jit(lambda params, batch: generate(models.merge(graphdef, params), batch, jax.random.PRNGKey(0),
                                                 max_new_tokens=24,
                                                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                                 temperature=0.0))(ours.params, batch)
    answer = decode_responses(tokenizer, np.asarray(out["response"]), np.asarray(out["response_mask"]))[0]
    print(f"answer: {answer!r}")
    assert "Paris" in answer


def _llama_cpp_reference(backend, text, specials):
    """Token ids as llama.cpp tokenizes `text` for pre type "smollm": special tokens matched whole, then each of
    LLAMA_CPP_SMOLLM splits every piece (matches and the text between them are pieces), then byte-level BPE
    (transformers' BPE model over the file's vocabulary and merges)."""
    import regex

    from flaxalign.data.gguf_tokenizer import byte_alphabet

    spelling = byte_alphabet()
    ids = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if part in specials:
            ids.append(backend.token_to_id(part))
            continue
        pieces = [part] if part else []
        for pattern in LLAMA_CPP_SMOLLM:
            split = []
            for piece in pieces:
                start = 0
                for match in regex.finditer(pattern, piece):
                    split += [piece[start:match.start()], match.group()]
                    start = match.end()
                split.append(piece[start:])
            pieces = [p for p in split if p]
        for piece in pieces:
            ids += [t.id for t in backend.model.tokenize("".join(spelling[b] for b in piece.encode("utf-8")))]
    return ids


def test_tokenizer_matches_transformers_and_llama_cpp(ours, theirs):
    _, tokenizer, _ = theirs
    ours = ours.tokenizer
    specials = [tokenizer.convert_ids_to_tokens(i) for i in range(17)]  # the file's 17 control tokens
    for text in SAMPLES:
        ids = ours.encode(text)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], text
        assert ids == _llama_cpp_reference(tokenizer.backend_tokenizer, text, specials), text
        assert ours.decode(ids) == tokenizer.decode(ids) == text
    for text in TRANSFORMERS_DIFFERS:
        assert ours.encode(text) == _llama_cpp_reference(tokenizer.backend_tokenizer, text, specials), text
    assert [ours.decode([i]) for i in ours.encode("x  42")] == ["x", "  ", "4", "2"]
    assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.pad_id) == (1, 2, 0, 2) and ours.vocab_size == 49152
    assert ours.model_path.endswith(".gguf")


def test_hf_export_generates_in_transformers_and_stops_at_the_end_of_the_turn(path, theirs, tmp_path):
    """SmolLM2-135M-Instruct converted GGUF → HF directory: transformers' `generate()` (greedy, with the exported
    generation_config.json) answers a chat prompt and stops at <|im_end|> instead of running into a new turn."""
    from flaxalign.convert import convert

    torch, _, _ = theirs
    transformers = pytest.importorskip("transformers")
    exported = str(tmp_path / "hf")
    convert(f"gguf:{path}", exported, "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = model.generation_config.eos_token_id
    assert im_end in (stops if isinstance(stops, list) else [stops])  # this GGUF's EOS is <|im_end|> itself
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=48, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    text = tokenizer.decode(new)
    print(f"transformers on the export: {text!r}")
    assert new[-1] == im_end and len(new) < 48 and "<|im_start|>" not in text and "Paris" in text
