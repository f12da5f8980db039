"""`flaxalign convert --format=gguf`: an HF directory, a GGUF file and a run directory (through the command line)
become one llama.cpp file that flaxalign reads back as the same model, with the tokenizer and the chat template
(the run's recorded template as Jinja, else the tokenizer's own); what GGUF cannot hold is refused in one sentence.
A LoRA run (merged on export) is in the slow group."""

import json
import os
import shutil

import gguf
import jax
import numpy as np
import pytest

from flaxalign import errors, interop, weights
from flaxalign.convert import convert
from flaxalign.data import chat
from flaxalign.data.tokenizer import Tokenizer, load_tokenizer
from flaxalign.interop import gguf as gguf_io
from flaxalign.models import heads
from tests import cli_helpers as cli
from tests import helpers
from tests.interop.test_gguf import SAMPLES, _reference_tokenizer

TOKENS = np.array([[5, 17, 99, 3, 41, 8, 250, 11], [7, 7, 300, 2, 0, 0, 0, 0]], np.int32)
MASK = (np.arange(8)[None, :] < np.array([[8], [4]])).astype(np.int32)
# a template that is none of flaxalign's own (`chat.JINJA`), as an HF model's tokenizer_config.json may hold
OWN_TEMPLATE = "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"


def _logits(config, params):
    return np.asarray(interop.apply_lm(config, params, TOKENS, MASK))


class TinyHF:
    """A tiny random Llama saved as an HF directory with a byte-level BPE tokenizer.json and `template`."""

    def __init__(self, directory, template=OWN_TEMPLATE, **overrides):
        self.directory = str(directory)
        self.config = helpers.tiny_model_config(**overrides)
        self.params = helpers.random_params(self.config, seed=7)
        interop.save_hf(self.config, self.params, self.directory)
        _reference_tokenizer("smollm").save(os.path.join(self.directory, "tokenizer.json"))
        with open(os.path.join(self.directory, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|im_start|>", "chat_template": template}, f)
        self.tokenizer = load_tokenizer(self.directory)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return TinyHF(tmp_path_factory.mktemp("hf"))


def _assert_reads_back_as(path, model: TinyHF, logit_error: float):
    loaded = gguf_io.load_gguf(path, dtype="float32")
    assert loaded.config.checkpoint_identity() == model.config.checkpoint_identity()
    gap = np.abs(_logits(loaded.config, loaded.params) - _logits(model.config, model.params)).max()
    assert gap <= logit_error, gap
    for text in SAMPLES:
        assert loaded.tokenizer.encode(text) == model.tokenizer.encode(text), text
    assert (loaded.tokenizer.bos_id, loaded.tokenizer.eos_id) == (model.tokenizer.bos_id, model.tokenizer.eos_id)
    return loaded


def test_an_hf_directory_and_a_gguf_file_convert_to_gguf(tiny_hf, tmp_path):
    f32 = str(tmp_path / "exports" / "tiny.gguf")  # the folder is created
    message = convert(f"hf:{tiny_hf.directory}", f32, "gguf", gguf_type="f32")
    assert message.startswith("wrote a llama GGUF file (f32, 20 tensors, ") and f"MiB) to {f32} with its " \
        "tokenizer (512 tokens, pre-tokenizer smollm) and the tokenizer's chat template" in message, message
    loaded = _assert_reads_back_as(f32, tiny_hf, 1e-4)
    assert loaded.tokenizer.chat_template == OWN_TEMPLATE
    # GGUF -> GGUF, requantised (a bare path ending in .gguf is a GGUF source)
    q8 = str(tmp_path / "tiny.q8_0.gguf")
    assert "(q8_0, 20 tensors" in convert(f32, q8, "gguf", gguf_type="q8_0")
    assert _assert_reads_back_as(q8, tiny_hf, 0.3).tokenizer.chat_template == OWN_TEMPLATE  # the q8_0 bound
    assert gguf.GGUFReader(q8).get_field("general.name").contents() == "tiny"
    # an existing file is replaced only with overwrite, and then in one piece
    with pytest.raises(errors.ConfigError, match=r"--to=.*tiny.q8_0.gguf already exists; choose a new file name or "
                                                 r"pass --overwrite to replace it\."):
        convert(f32, q8, "gguf")
    convert(f32, q8, "gguf", overwrite=True)  # default type: f16
    fields = gguf.GGUFReader(q8).fields
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert sorted(os.listdir(tmp_path)) == ["exports", "tiny.q8_0.gguf"]  # no temporary file left


def test_gguf_export_errors_are_one_sentence(tiny_hf, tmp_path):
    out = str(tmp_path / "out.gguf")
    for kwargs, message in [
        (dict(gguf_type="q4_k"), r"--gguf_type='q4_k' is not one of \['f16', 'bf16', 'f32', 'q8_0'"),
        (dict(merge_parent=True), r"--merge_parent applies to --format=peft only\."),
    ]:
        with pytest.raises(errors.ConfigError, match=message):
            convert(tiny_hf.directory, out, "gguf", **kwargs)
    with pytest.raises(errors.ConfigError, match=r"--gguf_type applies to --format=gguf only\."):
        convert(tiny_hf.directory, str(tmp_path / "hf"), "hf", gguf_type="f16")
    with pytest.raises(errors.ConfigError, match=r"--to=.*model must name a file ending in \.gguf for --format=gguf"):
        convert(tiny_hf.directory, str(tmp_path / "model"), "gguf")
    os.makedirs(tmp_path / "dir.gguf")
    with pytest.raises(errors.ConfigError, match=r"dir.gguf is a directory; --format=gguf writes one \.gguf file"):
        convert(tiny_hf.directory, str(tmp_path / "dir.gguf"), "gguf")

    reward = str(tmp_path / "rm")  # a *ForSequenceClassification directory: stage "reward"
    interop.save_hf(tiny_hf.config, tiny_hf.params, reward, score_head=heads.init_scalar_head(64, seed=1),
                    pad_token_id=0)
    with pytest.raises(errors.ConfigError, match=r"rm is a reward model, and a GGUF file holds a causal LM .* use "
                                                 r"--format=hf \(a \*ForSequenceClassification model\) instead\."):
        convert(reward, out, "gguf")

    spm = str(tmp_path / "spm")  # an HF directory whose tokenizer is SentencePiece (tokenizer.model)
    shutil.copytree(tiny_hf.directory, spm, ignore=shutil.ignore_patterns("tokenizer*"))
    Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 20] * 5, os.path.join(spm, "tokenizer.model"),
                    vocab_size=300)
    with pytest.raises(errors.ConfigError, match=r"tokenizer .*tokenizer.model is a SentencePiece model, which GGUF "
                                                 r"export cannot write; it writes byte-level BPE tokenizers"):
        convert(spm, out, "gguf")
    assert sorted(os.listdir(tmp_path)) == ["dir.gguf", "rm", "spm"]  # nothing written


def test_convert_cli_writes_a_run_as_gguf_with_its_chat_template(tmp_path):
    """A run directory (pretrained weights imported as a run, recording the chatml template its HF directory
    named) exported through the CLI in the default type; errors are one line with exit status 2."""
    model = TinyHF(tmp_path / "hf", template=chat.JINJA["chatml"], tie_embeddings=False)
    run = str(tmp_path / "run")
    convert(f"hf:{model.directory}", run, "checkpoint")
    assert weights.metadata(run)["chat_template"] == "chatml"
    out = str(tmp_path / "run.gguf")
    export = cli.start([f"--from={run}", f"--to={out}", "--format=gguf"], cpu_devices=1, command="convert")
    bad_type = cli.start([f"--from={run}", f"--to={out}", "--format=gguf", "--gguf_type=q3"], cpu_devices=1,
                         command="convert")
    rc, stdout, err = cli.finish(export, timeout=300)
    assert rc == 0, err[-2000:]
    assert f"to {out} with its tokenizer (512 tokens, pre-tokenizer smollm) and the chatml chat template" in stdout
    rc, _, err = cli.finish(bad_type, timeout=300)
    assert rc == 2 and err.strip().count("\n") == 0, err
    assert err.strip() == "flaxalign: error: --gguf_type='q3' is not one of ['f16', 'bf16', 'f32', 'q8_0', " \
                          "'q5_1', 'q5_0', 'q4_1', 'q4_0'].", err

    loaded = _assert_reads_back_as(out, model, 0.02)  # the f16 bound
    assert loaded.tokenizer.chat_template == chat.JINJA["chatml"]
    fields = gguf.GGUFReader(out).fields
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert fields["general.name"].contents() == "run" and "output.weight" in {t.name for t in
                                                                              gguf.GGUFReader(out).tensors}


def test_the_gguf_type_flag_names_every_type():
    from flaxalign import main
    from flaxalign.interop import gguf_export

    text = main.FLAGS["gguf_type"].help
    assert all(name in text for name in gguf_export.GGUF_TYPES), text
    assert f"{gguf_export.DEFAULT_GGUF_TYPE} (default)" in text and main.FLAGS["gguf_type"].default is None


@pytest.mark.slow  # a LoRA run trained, saved and read back (≈ 12 s)
def test_a_lora_run_exports_merged_with_the_run_s_logits(tmp_path):
    from flaxalign.peft import lora
    from tests.test_convert import _lora_run, _run_logits

    config = helpers.tiny_model_config(d_model=64, n_heads=4, n_kv_heads=2, tie_embeddings=False)
    interop.save_hf(config, helpers.random_params(config, 3), str(tmp_path / "base"))
    _lora_run(tmp_path / "lora", config, lora.LoraConfig(rank=4, alpha=8.0), f"hf:{tmp_path / 'base'}", 0)
    message = convert(str(tmp_path / "lora"), str(tmp_path / "lora.gguf"), "gguf", gguf_type="f32")
    assert "without a tokenizer" in message  # the base directory has none
    loaded = gguf_io.load_gguf(str(tmp_path / "lora.gguf"), dtype="float32")
    run_logits = _run_logits(str(tmp_path / "lora"))
    np.testing.assert_allclose(_logits(loaded.config, loaded.params), run_logits, atol=1e-4, rtol=0)
    base = jax.device_get(interop.load_pretrained(str(tmp_path / "base")).params)
    assert np.abs(_logits(config, base) - run_logits).max() > 1e-3  # the adapter changed the model
