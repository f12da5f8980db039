"""Tests of flaxalign.data.corpus: the built-in corpus and text files on disk."""

import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

from flaxalign.data.corpus import (
    CHUNK_MAX_CHARS,
    MIN_DOC_CHARS,
    load_corpus,
    read_text_documents,
    stdlib_corpus,
)
from flaxalign.errors import DataError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _digest(documents):
    """A hash of the documents and their boundaries."""
    return hashlib.sha256("\x00".join(documents).encode("utf-8")).hexdigest()


def test_stdlib_corpus_is_large_clean_english():
    documents = stdlib_corpus()
    text = "\n".join(documents)
    assert len(text) > 1_000_000
    assert len(documents) > 1000
    assert min(len(doc) for doc in documents) >= MIN_DOC_CHARS
    assert len(set(documents)) == len(documents)
    assert all(doc == doc.strip() for doc in documents)
    for word in (" the ", " function ", " returns ", " string ", " exception "):
        assert word in text


@pytest.mark.parametrize("imports_first", ["", "import jax, flax, ml_collections; "])
def test_stdlib_corpus_is_deterministic_across_processes(imports_first):
    # Another hash seed, or packages that patch stdlib modules on import,
    # must not change the corpus.
    script = (
        f"{imports_first}import hashlib; from flaxalign.data.corpus import stdlib_corpus; "
        "print(hashlib.sha256('\\x00'.join(stdlib_corpus()).encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO_ROOT,
        capture_output=True, text=True, check=True, timeout=120,
    )
    assert result.stdout.strip().splitlines()[-1] == _digest(stdlib_corpus())


def test_methods_patched_onto_stdlib_classes_are_not_read(monkeypatch):
    """transformers adds documented methods to logging.Logger on import; the corpus must not change."""
    import logging

    before = _digest(stdlib_corpus())

    def warning_advice(self):
        """A docstring from a third-party package that must not enter the corpus."""

    warning_advice.__module__ = "some_package.logging"
    monkeypatch.setattr(logging.Logger, "warning_advice", warning_advice, raising=False)
    assert _digest(stdlib_corpus()) == before


def test_max_chars_keeps_a_prefix_of_the_corpus():
    full = stdlib_corpus()
    small = stdlib_corpus(max_chars=10_000)
    assert sum(len(doc) for doc in small) == 10_000
    assert small[:-1] == full[: len(small) - 1]
    assert full[len(small) - 1].startswith(small[-1])
    assert stdlib_corpus(max_chars=0) == full
    assert load_corpus("builtin:stdlib", max_chars=10_000) == small


def test_negative_max_chars_is_an_error():
    with pytest.raises(DataError, match="max_chars must be >= 0"):
        stdlib_corpus(max_chars=-1)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    _write(tmp_path / "b.txt", "second file")
    _write(tmp_path / "a.md", "first file")
    _write(tmp_path / "sub" / "c.rst", "third file")
    _write(tmp_path / "sub" / "README", "fourth file\r\nwith a windows line end")
    _write(tmp_path / "sub" / "skip.py", "print('not text')")
    _write(tmp_path / ".hidden" / "x.txt", "hidden folder")
    _write(tmp_path / "blank.txt", "  \n\n ")
    documents = read_text_documents(str(tmp_path))
    assert documents == [
        "first file",
        "second file",
        "fourth file\nwith a windows line end",
        "third file",
    ]


def test_single_file_and_glob(tmp_path):
    _write(tmp_path / "one.txt", "alpha")
    _write(tmp_path / "two.txt", "beta")
    _write(tmp_path / "code.py", "gamma")
    assert read_text_documents(str(tmp_path / "code.py")) == ["gamma"]
    assert read_text_documents(str(tmp_path / "*.txt")) == ["alpha", "beta"]
    assert load_corpus(str(tmp_path / "*.txt"), max_chars=7) == ["alpha", "be"]


def test_large_file_is_split_in_order_on_blank_lines(tmp_path):
    paragraphs = [f"paragraph {index} " + "word " * (index % 300) for index in range(2000)]
    _write(tmp_path / "big.txt", "\n\n".join(paragraphs))
    documents = read_text_documents(str(tmp_path / "big.txt"))
    assert len(documents) > 4
    assert all(len(doc) <= CHUNK_MAX_CHARS for doc in documents)
    assert "\n\n".join(documents) == "\n\n".join(paragraphs)


def test_huge_line_is_cut(tmp_path):
    _write(tmp_path / "line.txt", "x" * (5 * CHUNK_MAX_CHARS + 5))
    documents = read_text_documents(str(tmp_path / "line.txt"))
    assert [len(doc) for doc in documents] == [CHUNK_MAX_CHARS] * 5 + [5]


def test_missing_path_is_an_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=f"corpus path '{missing}' does not exist"):
        read_text_documents(str(missing))
    with pytest.raises(DataError, match="does not exist .the glob matches no file"):
        load_corpus(str(tmp_path / "*.txt"))


def test_empty_file_and_folder_are_errors(tmp_path):
    _write(tmp_path / "empty.txt", "\n \n")
    with pytest.raises(DataError, match=f"corpus '{tmp_path / 'empty.txt'}' is empty"):
        read_text_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "folder").mkdir()
    _write(tmp_path / "folder" / "code.py", "x = 1")
    with pytest.raises(DataError, match=f"corpus '{tmp_path / 'folder'}' is empty"):
        read_text_documents(str(tmp_path / "folder"))


def test_non_utf8_file_names_file_line_and_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"fine line\ncaf\xe9\n")
    with pytest.raises(DataError) as error:
        read_text_documents(str(tmp_path))
    message = str(error.value)
    assert f"file '{bad}' is not valid UTF-8" in message
    assert "line 2, byte offset 13" in message


def test_functions_other_packages_replace_are_not_read(monkeypatch):
    """torch.package replaces inspect.getfile on import; neither the corpus nor the built-in SFT pairs may change."""
    import inspect

    from flaxalign.data.embedded import _all_sft_pairs

    build_pairs = _all_sft_pairs.__wrapped__  # uncached
    before, pairs_before = _digest(stdlib_corpus()), build_pairs()

    def patched_getfile(obj):
        """Work out which source or compiled file an object was defined in."""
        return "elsewhere"

    patched_getfile.__module__ = "torch.package.package_importer"
    monkeypatch.setattr(inspect, "getfile", patched_getfile)
    assert _digest(stdlib_corpus()) == before
    assert build_pairs() == pairs_before
