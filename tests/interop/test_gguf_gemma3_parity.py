"""Gemma-3-270M (Q4_K_M GGUF, from `launch/fetch_gemma3.sh`; Gemma terms of use, never committed) loads into
flaxalign like transformers loads it (`gguf_file=`): the same perplexity on English text, also over a passage longer
than its 512-token sliding window, the same greedy continuation, and the same token ids from the file's 262k
SentencePiece vocabulary.

The file is found through $FLAXALIGN_GEMMA3_GGUF or $FLAXALIGN_MODELS/gemma3/*.gguf (default .cache/); the tests skip
without it (`launch/test.sh --parity` fetches it first).
"""

import os

import jax
import numpy as np
import pytest

from flaxalign import interop, models
from flaxalign.data.batching import left_pad_prompts
from flaxalign.data.corpus import stdlib_corpus
from flaxalign.interop import gguf as gguf_io
from flaxalign.sampler import generate

pytestmark = pytest.mark.parity

# Jane Austen, Pride and Prejudice (1813), chapter 1: public domain.
PROSE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of "
    "a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, "
    "this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful "
    "property of some one or other of their daughters."
)
SAMPLES = [
    PROSE,
    "Hello world! I'm sure they'll say it's 2024; we've 3,000,000 users and $100.00 (or 99.5%) to spend.",
    "def f(x):\n    return x**2  # squares\n\tif x > 0:\n\t\tprint(f'{x=}')\n",
    "Unicode: café, naïve, Straße, 日本語のテキスト, русский текст, 🙂👍🏽, x½y²z, \u00a0nbsp, \x00 nul",
    "  whitespace   runs\t\t\ttabs\n\n\n\nnewlines   \r\n  windows  endings    trailing   ",
    "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
]
LONG_TOKENS = 600  # > the 512-token window of the five windowed layers of six


def _find_gguf():
    from flaxalign import config_blocks

    path = os.environ.get("FLAXALIGN_GEMMA3_GGUF") or config_blocks.gemma3_gguf()
    if not os.path.isfile(path):
        pytest.skip("Gemma-3-270M GGUF not found: run launch/fetch_gemma3.sh or set FLAXALIGN_GEMMA3_GGUF.")
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


def _texts(ours):
    """(name, ids): the Austen sentence and a > 512-token passage of the stdlib docs corpus, each after <bos>."""
    bos = ours.tokenizer.bos_id
    long_ids = ours.tokenizer.encode("\n\n".join(stdlib_corpus(max_chars=6000)))[:LONG_TOKENS - 1]
    return [("prose", np.asarray([bos] + ours.tokenizer.encode(PROSE))), ("long", np.asarray([bos] + long_ids))]


def test_config_from_metadata(ours):
    config = ours.config
    assert (config.family, config.n_layers, config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
            config.vocab_size) == ("gemma", 18, 640, 4, 1, 256, 262144)
    assert (config.sliding_window, config.full_attention_layers) == (512, (5, 11, 17))
    assert (config.rope_theta, config.rope_local_theta, config.qk_norm, config.tie_embeddings) == (1e6, 1e4, True,
                                                                                                 True)


def test_perplexity_matches_transformers(ours, theirs):
    torch, _, model = theirs
    for name, ids in _texts(ours):
        our_logits = np.asarray(interop.apply_lm(ours.config, ours.params, ids[None]))[0]
        with torch.no_grad():
            their_logits = model(input_ids=torch.from_numpy(ids[None])).logits[0].float().numpy()
        ppl, ref = _perplexity(our_logits, ids), _perplexity(their_logits, ids)
        gap = np.abs(our_logits - their_logits).max()
        print(f"{name}: perplexity flaxalign {ppl:.4f} transformers {ref:.4f} relative diff "
              f"{abs(ppl - ref) / ref:.2e} max |logit diff| {gap:.2e} ({len(ids)} tokens)")
        assert ref < 100  # English text: a model that reads the file right is far from the 262k-way uniform
        assert abs(ppl - ref) / ref < 0.01, name
        if name == "long":
            assert len(ids) > 512


def test_greedy_continuation_matches_transformers(ours, theirs):
    torch, _, model = theirs
    tokenizer = ours.tokenizer
    prompt = [tokenizer.bos_id] + tokenizer.encode("The capital of France is")
    new = 8
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, min_new_tokens=new)
    their_tokens = out[0, len(prompt):].tolist()
    batch = left_pad_prompts([prompt], pad_id=tokenizer.pad_id)
    graphdef = models.abstract_model(ours.config)[0]
    ours_out = jax.jit(lambda params, batch: generate(
        models.merge(graphdef, params), batch, jax.random.PRNGKey(0), max_new_tokens=new, eos_id=-1,
        pad_id=tokenizer.pad_id, temperature=0.0))(ours.params, batch)
    our_tokens = np.asarray(ours_out["response"])[0].tolist()
    print(f"greedy: flaxalign {tokenizer.decode(our_tokens)!r} transformers {tokenizer.decode(their_tokens)!r}")
    assert our_tokens == their_tokens


def test_tokenizer_matches_transformers(ours, theirs):
    _, tokenizer, _ = theirs
    ours = ours.tokenizer
    for text in SAMPLES + stdlib_corpus(max_chars=20000):
        ids = ours.encode(text)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], text[:80]
        assert ours.decode(ids) == tokenizer.decode(ids) == text, text[:80]
    # with special tokens (what an HF export's tokenizer.json does in transformers): <bos> first, as transformers'
    assert ours._tokenizer.encode(PROSE).ids == tokenizer(PROSE)["input_ids"] == [2] + ours.encode(PROSE)
    turn = ours.encode("<start_of_turn>user\nHi<end_of_turn>")
    assert turn[0] == ours.token_to_id("<start_of_turn>") and turn[-1] == ours.token_to_id("<end_of_turn>")
    assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.pad_id, ours.vocab_size) == (2, 1, 3, 0, 262144)
