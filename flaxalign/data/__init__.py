"""Corpora, tokenizer, packing and batching for causal-LM training (numpy only)."""

from flaxalign.data.corpus import load_corpus, read_text_documents, stdlib_corpus
from flaxalign.data.loader import BatchIterator, ClmData, build_clm_datasets
from flaxalign.data.packing import pack_documents
from flaxalign.data.tokenizer import Tokenizer

__all__ = [
    "BatchIterator",
    "ClmData",
    "Tokenizer",
    "build_clm_datasets",
    "load_corpus",
    "pack_documents",
    "read_text_documents",
    "stdlib_corpus",
]
