"""A llama.cpp GGUF file through the command line: `init_from=gguf:FILE` starts SFT from the file's weights,
`flaxalign convert` turns it into an HF directory with the same logits and tokenizer, and `flaxalign generate
--checkpoint=gguf:FILE` answers with the file's greedy continuation.

The file is a tiny random Llama with a byte-level BPE vocabulary, written by the test (no download). The references
are the NumPy params written into it and the `tokenizers` BPE its vocabulary came from, never flaxalign's own
reading of the file. The CLI runs are `slow` (≈ 75 s of subprocesses on a shared 2-core machine); the in-process
conversion is in the default suite."""

import json
import os

import jax
import numpy as np
import pytest

from flaxalign import interop, sharding, weights
from flaxalign.convert import convert
from flaxalign.data.tokenizer import load_tokenizer
from tests import cli_helpers as cli
from tests import helpers
from tests.interop.test_gguf import _reference_tokenizer, _vocab_metadata, write_gguf

BOS, EOS = 1, 0  # "<|im_start|>" and "<|endoftext|>" of the reference BPE's special tokens
TEXTS = ["the quick brown fox", "Return a new list, sorted.", "    def f(x):\n\treturn x ** 2  # 12345"]
PROMPTS = ["the quick brown fox", "def f(x):"]


class TinyGguf:
    """The file, the model config and NumPy params written into it, and the reference tokenizer."""

    def __init__(self, directory):
        self.tokenizer = _reference_tokenizer("gpt2")
        self.config = helpers.tiny_model_config(vocab_size=self.tokenizer.get_vocab_size())
        self.params = helpers.random_params(self.config, seed=4)
        vocab = _vocab_metadata(self.tokenizer, "gpt2", bos=BOS, eos=EOS, pad=EOS)
        self.path = write_gguf(os.path.join(directory, "tiny.gguf"), self.config, self.params, vocab=vocab)

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return TinyGguf(str(tmp_path_factory.mktemp("gguf")))


def _padded_rows(model: TinyGguf):
    """Two reference-encoded texts, the shorter right-padded: (tokens, mask) `[2, T]`."""
    rows = [model.ids(TEXTS[1]), model.ids(TEXTS[2])]
    width = max(map(len, rows))
    tokens = np.full((2, width), EOS, np.int32)
    mask = np.zeros((2, width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], mask[i, :len(row)] = row, 1
    assert mask.sum(1).min() < width  # one row really is padded
    return tokens, mask


def _assert_hf_directory_is_the_file(directory: str, model: TinyGguf):
    """Same logits as the written params (both float32 copies of the same numbers: the measured difference is 0)
    and a tokenizer that encodes like the reference BPE, with the file's EOS."""
    loaded = interop.load_pretrained(directory, dtype="float32")
    assert loaded.config.checkpoint_identity() == model.config.checkpoint_identity()
    tokens, mask = _padded_rows(model)
    want = np.asarray(interop.apply_lm(model.config, model.params, tokens, mask))
    got = np.asarray(interop.apply_lm(loaded.config, loaded.params, tokens, mask))
    real = mask.astype(bool)
    assert np.abs(want[real]).max() > 0.5  # not two near-zero tensors
    np.testing.assert_allclose(got[real], want[real], atol=1e-6, rtol=0)
    tokenizer = load_tokenizer(directory)
    for text in TEXTS:
        assert tokenizer.encode(text) == model.ids(text), text
    assert tokenizer.eos_id == EOS


def test_gguf_file_converts_to_an_hf_directory_with_its_logits_and_tokenizer(tiny_gguf, tmp_path):
    message = convert(f"gguf:{tiny_gguf.path}", str(tmp_path / "hf"), "hf")
    assert "causal LM" in message and "tokenizer" in message and "generation_config.json" in message, message
    _assert_hf_directory_is_the_file(str(tmp_path / "hf"), tiny_gguf)
    # generation stops at EOS or at the chatml end of turn (this vocabulary has both, as different ids); the
    # ids are in config.json too
    tokenizer = load_tokenizer(str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "generation_config.json") as f:
        generation = json.load(f)
    with open(tmp_path / "hf" / "config.json") as f:
        config = json.load(f)
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert im_end is not None and im_end != tokenizer.eos_id
    assert generation["eos_token_id"] == [tokenizer.eos_id, im_end] and config["eos_token_id"] == tokenizer.eos_id
    assert generation["pad_token_id"] == config["pad_token_id"] == tokenizer.pad_id
    assert config["bos_token_id"] == tokenizer.bos_id and config["vocab_size"] == tiny_gguf.config.vocab_size
    assert config["architectures"] == ["LlamaForCausalLM"]  # the HF class of the file's general.architecture


@pytest.mark.slow  # a CLI subprocess
def test_convert_cli_writes_an_hf_directory_of_a_gguf_file(tiny_gguf, tmp_path):
    out = str(tmp_path / "hf")
    rc, stdout, err = cli.run([f"--from=gguf:{tiny_gguf.path}", f"--to={out}", "--format=hf"], cpu_devices=1,
                              command="convert", timeout=300)
    assert rc == 0, err[-2000:]
    assert f"wrote a causal LM to {out}" in stdout, stdout
    _assert_hf_directory_is_the_file(out, tiny_gguf)


def _max_weight_change(run_dir: str, model: TinyGguf) -> float:
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        _, trained = weights.run_weights(run_dir, mesh)
    changes = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), trained, model.params)
    return max(jax.tree.leaves(changes))


@pytest.mark.slow  # a CLI training run
def test_sft_cli_starts_from_the_weights_and_tokenizer_of_a_gguf_file(tiny_gguf, tmp_path):
    """Two full fine-tuning steps from the file: the run's weights are the file's moved by Adam's few steps (each
    ≤ about lr per weight), not a fresh init (which differs from them by ~0.1–0.5), and the run records the file
    as its tokenizer and source."""
    workdir = str(tmp_path / "sft")
    rc, _, err = cli.run(["--config=configs/sft.py:tiny", f"--workdir={workdir}",
                          f"--config.init_from=gguf:{tiny_gguf.path}", "--config.steps=2", "--config.eval_every=0",
                          "--config.eval_at_start=False", "--config.data.seq_len=64", "--config.data.batch_size=8",
                          "--config.log_every=1", "--config.optim.lr=1e-3", "--config.optim.warmup_steps=0"],
                         cpu_devices=1, timeout=300)
    assert rc == 0, err[-2000:]
    losses = [row["loss"] for row in cli.metrics(workdir) if "loss" in row]
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    meta = weights.metadata(workdir)
    assert meta["init_from"] == f"gguf:{tiny_gguf.path}" and meta["tokenizer"] == tiny_gguf.path
    # Adam's first steps move a weight by at most about the learning rate: Σ lr = 1e-3 + 5.5e-4 (cosine to 10 % over
    # 2 steps) = 1.55e-3, which is also the measured largest change
    change = _max_weight_change(workdir, tiny_gguf)
    assert 1e-5 < change < 2e-3, change


def _greedy_reference(model: TinyGguf, prompt: str, max_new_tokens: int, width: int = 64) -> str:
    """Greedy decoding by recomputing the whole sequence at each step (no KV cache) from the written params, decoded
    by the reference BPE: what `generate --temperature=0` must print. Rows are right-padded to one `width` (one
    compile; real tokens' logits do not depend on the padding)."""
    tokens, new = [BOS] + model.ids(prompt), []
    for _ in range(max_new_tokens):
        row, mask = np.full((1, width), EOS, np.int32), np.zeros((1, width), np.int32)
        row[0, :len(tokens)], mask[0, :len(tokens)] = tokens, 1
        logits = np.asarray(interop.apply_lm(model.config, model.params, row, mask))[0, len(tokens) - 1]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-4, "a near tie: float error could flip the argmax; change the seed"
        token = int(np.argmax(logits))
        if token == EOS:
            break
        tokens.append(token)
        new.append(token)
    return model.tokenizer.decode(new, skip_special_tokens=False)


@pytest.mark.slow  # a CLI subprocess
def test_generate_cli_from_a_gguf_file_prints_its_greedy_continuation(tiny_gguf):
    args = [f"--checkpoint=gguf:{tiny_gguf.path}", "--temperature=0", "--max_new_tokens=12"]
    rc, out, err = cli.run(args + [f"--prompt={p}" for p in PROMPTS], cpu_devices=1, command="generate", timeout=300)
    assert rc == 0, err[-2000:]
    responses = [_greedy_reference(tiny_gguf, p, 12) for p in PROMPTS]
    assert all(responses), responses  # some text each
    assert out == "".join(f">>> {p}\n{r}\n\n" for p, r in zip(PROMPTS, responses))
