"""The data layer (numpy only): sources and validation, tokenizers, chat templates, packing and batching,
deterministic resumable iteration, prefetch, and the embedded default data."""

from flaxalign.data.batching import (
    left_pad_prompts,
    pack_sft,
    preference_batch,
    split_pair,
    stack_pairs,
    truncate_examples,
    unstack_pairs,
)
from flaxalign.data.chat import ChatTokens, render_chat, render_chat_text
from flaxalign.data.corpus import load_corpus, read_text_documents, stdlib_corpus
from flaxalign.data.loader import BatchIterator, ClmData, build_clm_datasets
from flaxalign.data.packing import pack_documents
from flaxalign.data.prefetch import Prefetcher
from flaxalign.data.sources import read_records, validate_record
from flaxalign.data.tfds_io import jsonl_to_tfds, read_tfds
from flaxalign.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BatchIterator", "ChatTokens", "ClmData", "HFTokenizer", "Prefetcher", "Tokenizer", "build_clm_datasets",
    "jsonl_to_tfds", "left_pad_prompts", "load_corpus", "load_tokenizer", "pack_documents", "pack_sft",
    "preference_batch", "read_records", "read_tfds", "read_text_documents", "render_chat", "render_chat_text",
    "split_pair", "stack_pairs", "stdlib_corpus", "truncate_examples", "unstack_pairs", "validate_record",
]
