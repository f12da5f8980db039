"""Tests of flaxalign.data.loader: BatchIterator and build_clm_datasets."""

import json
import os
import types

import numpy as np
import pytest

from flaxalign.data.corpus import stdlib_corpus
from flaxalign.data.loader import BatchIterator, build_clm_datasets, split_every_kth
from flaxalign.data.tokenizer import Tokenizer
from flaxalign.errors import DataError
from tests.data.batch_asserts import assert_same_batches, take


def _rows(num_rows):
    """Arrays whose rows name themselves, so batches show which rows they hold."""
    ids = np.arange(num_rows)
    return {"row": ids, "pair": np.stack([ids, -ids], axis=1)}


def test_same_seed_same_batches_other_seed_other_batches():
    first = take(BatchIterator(_rows(50), 8, seed=3), 10)
    assert_same_batches(first, take(BatchIterator(_rows(50), 8, seed=3), 10))
    other = take(BatchIterator(_rows(50), 8, seed=4), 10)
    assert any(not np.array_equal(a["row"], b["row"]) for a, b in zip(first, other))
    np.testing.assert_array_equal(first[0]["pair"][:, 1], -first[0]["row"])


def test_unshuffled_reads_rows_in_order():
    batches = take(BatchIterator(_rows(10), 4, seed=0, shuffle=False), 3)
    assert [batch["row"].tolist() for batch in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_batches_straddle_epochs_and_cover_each_row_once_per_epoch():
    iterator = BatchIterator(_rows(10), 4, seed=7)
    stream = np.concatenate([batch["row"] for batch in take(iterator, 10)])  # 4 epochs
    for epoch in range(4):
        assert sorted(stream[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert iterator.epoch == 4
    # Epoch orders differ, and follow the documented formula.
    np.testing.assert_array_equal(stream[:10], np.random.default_rng([7, 0]).permutation(10))
    np.testing.assert_array_equal(stream[10:20], np.random.default_rng([7, 1]).permutation(10))


def test_batch_larger_than_the_dataset_wraps_epochs():
    batch = next(BatchIterator(_rows(3), 7, seed=0))
    assert sorted(batch["row"][:3]) == [0, 1, 2] and sorted(batch["row"][3:6]) == [0, 1, 2]


def test_resume_from_state_continues_the_same_stream():
    uninterrupted = take(BatchIterator(_rows(37), 6, seed=1), 20)
    first_run = BatchIterator(_rows(37), 6, seed=1)
    take(first_run, 13)
    state = json.loads(json.dumps(first_run.get_state()))  # as stored in a checkpoint
    assert state["batches_consumed"] == 13
    resumed = BatchIterator(_rows(37), 6, seed=1)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 7), uninterrupted[13:])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_make_up_the_global_batch(process_count):
    global_batches = take(BatchIterator(_rows(23), 8, seed=5), 9)
    local = [
        take(BatchIterator(_rows(23), 8, seed=5, process_index=index, process_count=process_count), 9)
        for index in range(process_count)
    ]
    for step, global_batch in enumerate(global_batches):
        joined = np.concatenate([local[index][step]["row"] for index in range(process_count)])
        np.testing.assert_array_equal(joined, global_batch["row"])


def test_batch_not_divisible_by_processes_is_an_error():
    with pytest.raises(DataError, match="global batch size 6 is not divisible by the process count 4"):
        BatchIterator(_rows(10), 6, seed=0, process_count=4)


def test_no_rows_is_an_error():
    with pytest.raises(DataError, match="has no rows"):
        BatchIterator(_rows(0), 4, seed=0)


def test_state_from_other_data_is_an_error():
    state = BatchIterator(_rows(10), 4, seed=0).get_state()
    with pytest.raises(DataError, match="training data changed since the checkpoint"):
        BatchIterator(_rows(11), 4, seed=0).set_state(state)
    with pytest.raises(DataError, match="training data changed since the checkpoint"):
        BatchIterator(_rows(10), 4, seed=1).set_state(state)
    with pytest.raises(DataError, match="global batch size changed"):
        BatchIterator(_rows(10), 8, seed=0).set_state(state)


def test_split_every_kth():
    documents = [f"doc {index}" for index in range(10)]
    train, evaluation = split_every_kth(documents, 0.25)
    assert evaluation == ["doc 3", "doc 7"]
    assert train == [doc for doc in documents if doc not in evaluation]
    assert split_every_kth(documents[:3], 0.01) == (documents[:2], ["doc 2"])
    with pytest.raises(DataError, match="eval_fraction must be in"):
        split_every_kth(documents, 0.0)
    with pytest.raises(DataError, match="too few to hold out"):
        split_every_kth(documents[:1], 0.5)


@pytest.fixture(scope="module")
def corpus_folder(tmp_path_factory):
    """A folder of 400 text files: the last (short, docstring) stdlib documents."""
    folder = tmp_path_factory.mktemp("corpus")
    for index, document in enumerate(stdlib_corpus()[-400:]):
        (folder / f"doc{index:04d}.txt").write_text(document, encoding="utf-8")
    return folder


def _config(train, **overrides):
    settings = dict(train=str(train), eval="", eval_fraction=0.05, max_chars=0,
                    tokenizer="", vocab_size=400, seq_len=64)
    settings.update(overrides)
    return types.SimpleNamespace(**settings)


def test_build_clm_datasets_end_to_end_and_cache_hit(corpus_folder, tmp_path):
    messages = []
    config = _config(corpus_folder)
    first = build_clm_datasets(config, str(tmp_path), log=messages.append)
    assert (tmp_path / "tokenizer.model").exists()
    assert first.tokenizer.vocab_size == 400
    assert first.stats["cache_hit"] is False
    assert first.stats["train_rows"] == len(first.train["inputs"]) > 0
    assert first.stats["eval_rows"] == len(first.eval["inputs"]) > 0
    assert (first.stats["train_documents"], first.stats["eval_documents"]) == (380, 20)
    assert first.train["inputs"].shape[1] == 64
    cache_files = [name for name in os.listdir(tmp_path) if name.startswith("data_cache_")]
    assert len(cache_files) == 1 and cache_files[0].endswith(".npz")
    json.dumps(first.stats)  # stored in checkpoint metadata

    second = build_clm_datasets(config, str(tmp_path), log=messages.append)
    assert second.stats["cache_hit"] is True
    for split in ("train", "eval"):
        for key, value in getattr(first, split).items():
            np.testing.assert_array_equal(getattr(second, split)[key], value)
            assert getattr(second, split)[key].dtype == value.dtype
    assert any("loaded packed arrays" in message for message in messages)


def test_changed_settings_miss_the_cache(corpus_folder, tmp_path):
    build_clm_datasets(_config(corpus_folder), str(tmp_path), log=lambda message: None)
    other = build_clm_datasets(_config(corpus_folder, seq_len=32), str(tmp_path), log=lambda message: None)
    assert other.stats["cache_hit"] is False and other.train["inputs"].shape[1] == 32
    assert len([name for name in os.listdir(tmp_path) if name.startswith("data_cache_")]) == 2


def test_given_tokenizer_and_eval_corpus(corpus_folder, tmp_path):
    tokenizer = Tokenizer.train(stdlib_corpus(max_chars=100_000), str(tmp_path / "given.model"), 500)
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("A small evaluation document about lists and dictionaries.", encoding="utf-8")
    config = _config(corpus_folder, tokenizer=str(tmp_path / "given.model"), eval=str(eval_file),
                     max_chars=50_000)
    data = build_clm_datasets(config, str(tmp_path / "work"), log=lambda message: None)
    assert data.tokenizer.model_path == tokenizer.model_path and data.tokenizer.vocab_size == 500
    assert not (tmp_path / "work" / "tokenizer.model").exists()
    assert data.stats["eval_documents"] == 1 and data.stats["train_chars"] == 50_000
    assert data.eval["loss_mask"].sum() == len(tokenizer.encode(eval_file.read_text())) + 1


def test_unreadable_cache_is_rebuilt(corpus_folder, tmp_path):
    config = _config(corpus_folder, max_chars=20_000)
    build_clm_datasets(config, str(tmp_path), log=lambda message: None)
    (cache_file,) = [name for name in os.listdir(tmp_path) if name.startswith("data_cache_")]
    (tmp_path / cache_file).write_bytes(b"truncated")
    rebuilt = build_clm_datasets(config, str(tmp_path), log=lambda message: None)
    assert rebuilt.stats["cache_hit"] is False
    assert build_clm_datasets(config, str(tmp_path), log=lambda message: None).stats["cache_hit"]


def test_jsonl_tfds_and_text_sources_give_the_same_rows(corpus_folder, tmp_path, monkeypatch):
    """`data.train` may be text files, JSONL with a `text` field, or a tfds dataset: same documents, same rows."""
    from flaxalign.data.embedded import write_jsonl
    from flaxalign.data.tfds_io import jsonl_to_tfds

    documents = [(corpus_folder / name).read_text(encoding="utf-8") for name in sorted(os.listdir(corpus_folder))]
    jsonl = tmp_path / "corpus.jsonl"
    write_jsonl([{"text": doc} for doc in documents], str(jsonl))
    jsonl_to_tfds({"train": str(jsonl)}, str(tmp_path / "tfds"), "clm_corpus", "text")
    tokenizer = Tokenizer.train(documents, str(tmp_path / "tok.model"), 400)

    def rows(spec, **extra):
        config = _config(spec, tokenizer=tokenizer.model_path, **extra)
        return build_clm_datasets(config, str(tmp_path / f"work{len(extra)}{abs(hash(spec))}"),
                                  log=lambda message: None).train

    expected = rows(str(corpus_folder))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    for spec in (str(jsonl), "tfds:clm_corpus"):
        got = rows(spec)
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{spec}: {key}")


def test_hf_tokenizer_json_drives_the_clm_data(corpus_folder, tmp_path):
    import tokenizers

    from tests.data.test_tokenizer_hf import build_hf_tokenizer

    documents = [(corpus_folder / name).read_text(encoding="utf-8") for name in sorted(os.listdir(corpus_folder))]
    path = tmp_path / "hf" / "tokenizer.json"
    path.parent.mkdir()
    build_hf_tokenizer(path, documents[:100], special_tokens=["<|begin_of_text|>", "<|end_of_text|>"])
    (path.parent / "tokenizer_config.json").write_text(
        '{"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}')
    data = build_clm_datasets(_config(corpus_folder, tokenizer=str(path.parent)), str(tmp_path / "work"),
                              log=lambda message: None)
    reference = tokenizers.Tokenizer.from_file(str(path))
    first_doc = reference.encode(documents[0], add_special_tokens=False).ids
    row = data.train["inputs"][0]
    bos, eos = reference.token_to_id("<|begin_of_text|>"), reference.token_to_id("<|end_of_text|>")
    expected = ([bos] + first_doc)[: len(row)]
    np.testing.assert_array_equal(row[: len(expected)], expected)
    assert (data.train["targets"] == eos).sum() == data.stats["train_documents"]  # one EOS closes each document
    assert data.tokenizer.pad_id not in (bos, eos)


def test_hf_tokenizer_without_bos_packs_eos_separated_documents(tmp_path):
    from flaxalign.data.packing import pack_documents

    packed = pack_documents([[5, 6, 7], [8, 9]], 8, bos_id=None, eos_id=3, pad_id=0)
    np.testing.assert_array_equal(packed["inputs"][0], [5, 6, 7, 8, 9, 0, 0, 0])
    np.testing.assert_array_equal(packed["targets"][0], [6, 7, 3, 9, 3, 0, 0, 0])
    np.testing.assert_array_equal(packed["segment_ids"][0], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(packed["positions"][0], [0, 1, 2, 0, 1, 0, 0, 0])
