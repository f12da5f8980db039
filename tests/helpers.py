"""Shared test helpers: tiny configs, synthetic packed batches, tasks built without a corpus."""

import jax
import ml_collections
import numpy as np

from flaxalign import models, sharding
from flaxalign.policy import TrainableModel
from flaxalign.stages import clm
from flaxalign.train.task import Task


def tiny_model_config(**overrides) -> models.ModelConfig:
    return models.ModelConfig.from_dict({**models.preset("tiny"), **overrides})


def max_difference(a, b) -> float:
    """The largest |a − b| over the leaves of two pytrees of arrays."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                    jax.tree.leaves(b)))


def optim_config(**overrides) -> ml_collections.ConfigDict:
    values = dict(lr=1e-2, warmup_steps=2, total_steps=20, schedule="cosine", final_lr_fraction=0.1, b1=0.9,
                  b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def packed_batch(batch_size=8, seq_len=32, vocab=512, seed=0) -> dict:
    """Rows of two packed documents each, plus a padded tail, like `data.packing` produces."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab, size=(batch_size, seq_len + 1)).astype(np.int32)
    split = rng.integers(seq_len // 4, seq_len // 2, size=batch_size)
    pad = rng.integers(0, seq_len // 4, size=batch_size)
    cols = np.arange(seq_len)[None]
    segment_ids = np.where(cols < split[:, None], 1, 2).astype(np.int32)
    segment_ids = np.where(cols >= seq_len - pad[:, None], 0, segment_ids)
    positions = np.where(segment_ids == 2, cols - split[:, None], cols).astype(np.int32)
    positions = np.where(segment_ids == 0, 0, positions)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
            "positions": positions, "loss_mask": (segment_ids > 0).astype(np.float32)}


def clm_task(model_config, optim_cfg=None, *, grad_accum=1, seed=0, chunk_size=16, lora_config=None,
             quant_config=None, init_base=None) -> Task:
    policy = TrainableModel(model_config, lora_config, quant_config, seed=seed)
    return clm.make_task(policy, optim_cfg or optim_config(), grad_accum=grad_accum, chunk_size=chunk_size,
                         init_base=init_base)


def random_params(config, seed=0):
    """Random numpy params (no compile) with std 0.12 kernels, so attention scores are of order one, and norms and
    biases off their 1/0 initial values, so layouts and masks show in the outputs."""
    _, abstract, _ = models.abstract_model(config)
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten_with_path(abstract)
    out = []
    for path, leaf in leaves:
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        name = jax.tree_util.keystr(path)
        out.append(1.0 + 0.3 * noise if "scale" in name else 0.3 * noise if "bias" in name else 0.12 * noise)
    return jax.tree.unflatten(treedef, out)


def mesh(shape):
    data, fsdp, tensor = shape
    devices = jax.devices()[: data * fsdp * tensor]
    return sharding.make_mesh(data, fsdp, tensor, devices=devices)


def pair_batch(num_pairs=8, seq_len=32, vocab=512, seed=0, kto=False) -> dict:
    """`[num_pairs, 2, seq_len]` preference rows (prompt + chosen, prompt + rejected) of random tokens and lengths,
    as `data.preference_data` builds them; with `kto`, a `label` per example (alternating 1, 0)."""
    from flaxalign.data.batching import preference_batch, stack_pairs

    rng = np.random.default_rng(seed)

    def tokens(lo, hi):
        return list(rng.integers(4, vocab, size=int(rng.integers(lo, hi))))

    pairs = [(tokens(2, seq_len // 3), tokens(1, seq_len // 3), tokens(1, seq_len // 2)) for _ in range(num_pairs)]
    batch = stack_pairs(preference_batch(pairs, seq_len, pad_id=0))
    if kto:
        batch["label"] = (np.arange(num_pairs) % 2 == 0).astype(np.float32)
    return batch


def right_padded_batch(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, attention mask) int64 [2, 16]: the second row is right-padded (id 0) after 9 real tokens."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, (2, 16)).astype(np.int64)
    mask = np.ones_like(tokens)
    mask[1, 9:] = 0
    tokens[1, 9:] = 0
    return tokens, mask


class DataPosition:
    """A stand-in for a stage's train iterator where only its resumable position matters."""

    def __init__(self):
        self.state = {"batches_consumed": 0}

    def get_state(self):
        return dict(self.state)

    def set_state(self, state):
        self.state = dict(state)


def random_rows_and_a_packed_row(vocab_size: int, *, rows: int = 2, length: int = 32, doc_lengths=(10, 7, 15)):
    """(tokens, positions, segment_ids) `[rows + 1, length]` for HF parity tests: `rows` rows of random tokens with
    default positions, then one row packing `doc_lengths` documents, positions restarting at each (one batch shape,
    so a case compiles once)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, (rows + 1, length), dtype=np.int32)
    positions = np.tile(np.arange(length, dtype=np.int32), (rows + 1, 1))
    segment_ids = np.ones((rows + 1, length), np.int32)
    positions[-1] = np.concatenate([np.arange(n) for n in doc_lengths])
    segment_ids[-1] = np.concatenate([np.full(n, i + 1) for i, n in enumerate(doc_lengths)])
    return tokens, positions, segment_ids
