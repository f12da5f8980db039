"""Times the data loader on synthetic token examples and compares it with the model's train-step throughput,
measured in the same process.

    python bench/data_loader.py                    # 50k SFT examples, 20k pairs, 50k documents; `small` CLM step
    python bench/data_loader.py --model_preset=tiny --model_tokens_per_sec=0   # 0 = measure (the default)
    python bench/data_loader.py --parquet_only     # only the Parquet record stream (1M preference rows)

The model side is the CLM train step (`bench/clm_step.py`'s timer: compiled step, AdamW, float32) of
`--model_preset` on batches of the shape the SFT and CLM pipelines feed, `--batch` × `--seq_len`, timed before the
loader: after one compile step, the best of `--repeats` rounds of `--model_steps` steps (the fastest model gives
the smallest, most conservative ratio). `--model_tokens_per_sec=N` skips the measurement and uses N.

Pipelines (examples arrive as Python lists of token ids, as tokenizers return them; making them is not timed):
  SFT         truncate_examples + pack_sft, then one epoch of BatchIterator batches; also from numpy arrays
  preference  truncate_examples + preference_batch (all pairs at once) + stack_pairs, then one epoch of batches
  preference  per batch: preference_batch on each batch of pairs (the alternative to building all rows at once)
  CLM         pack_documents, then one epoch of batches
and the per-batch cost of BatchIterator alone and through Prefetcher. First, before anything else runs, the
record reader: `--parquet_rows` preference rows written to a Parquet file, then validated records streamed from it
(`sources.iter_records`), with the process's peak memory growth while streaming (Linux VmHWM, reset first).
tokens = real (input, target) positions delivered, padding excluded; the ratio divides them by the model's tokens/s,
which counts every position of its batches, so the ratio is a lower bound (for the preference rows too: a DPO step
does 8/6 of the CLM step's work per token).  Each timing is the best of --repeats.
"""

import argparse
import os
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from flaxalign.data.batching import (  # noqa: E402
    pack_sft,
    preference_batch,
    stack_pairs,
    truncate_examples,
)
from flaxalign.data.loader import BatchIterator  # noqa: E402
from flaxalign.data.packing import pack_documents  # noqa: E402
from flaxalign.data.prefetch import Prefetcher  # noqa: E402

VOCAB = 32_000
PAD, BOS, EOS = 0, 1, 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=50_000, help="SFT examples and CLM documents")
    p.add_argument("--pairs", type=int, default=20_000, help="preference pairs")
    p.add_argument("--min_len", type=int, default=32)
    p.add_argument("--max_len", type=int, default=512)
    p.add_argument("--seq_len", type=int, default=512, help="row length of SFT and CLM rows")
    p.add_argument("--pair_len", type=int, default=384, help="row length of preference rows")
    p.add_argument("--batch", type=int, default=8, help="global batch size (rows, or pairs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model_preset", default="small", help="the model whose CLM train step is measured")
    p.add_argument("--model_steps", type=int, default=2, help="timed model steps per round (--repeats rounds)")
    p.add_argument("--model_tokens_per_sec", type=float, default=0.0,
                   help="use this train-step tokens/s instead of measuring it (0 = measure)")
    p.add_argument("--parquet_rows", type=int, default=1_000_000, help="rows of the Parquet stream (0 = skip it)")
    p.add_argument("--parquet_only", action="store_true", help="time only the Parquet record stream")
    return p.parse_args(argv)


def sft_examples(count, min_len, max_len, rng):
    """(ids, mask) lists: a prompt of 10-90 % of the tokens with mask 0, then the completion with mask 1."""
    examples = []
    for length in rng.integers(min_len, max_len + 1, size=count).tolist():
        prompt = int(length * rng.uniform(0.1, 0.9))
        examples.append((rng.integers(3, VOCAB, size=length).tolist(),
                         [0] * prompt + [1] * (length - prompt)))
    return examples


def preference_pairs(count, min_len, max_len, rng):
    """(prompt, chosen, rejected) lists; each part is min_len/2 .. max_len/2 tokens."""
    lengths = rng.integers(min_len // 2, max_len // 2 + 1, size=(count, 3)).tolist()
    return [tuple(rng.integers(3, VOCAB, size=n).tolist() for n in parts) for parts in lengths]


def as_numpy(examples):
    """The same examples as int32/int8 arrays, as a record reader might give them."""
    return [(np.asarray(ids, np.int32), np.asarray(mask, np.int8)) for ids, mask in examples]


def documents(count, min_len, max_len, rng):
    return [rng.integers(3, VOCAB, size=n).tolist() for n in rng.integers(min_len, max_len + 1, size=count)]


def one_epoch(arrays, batch, prefetch=False):
    """Reads every row once in batches (as the training loop does); returns the number of batches."""
    num_rows = len(next(iter(arrays.values())))
    steps = -(-num_rows // batch)
    iterator = BatchIterator(arrays, batch, seed=0)
    batches = Prefetcher(iterator, depth=2) if prefetch else iterator
    for _ in range(steps):
        next(batches)
    if prefetch:
        batches.close()
    return steps


def build_sft(examples, args):
    kept, stats = truncate_examples(examples, args.seq_len + 1, "truncate_prompt_left")
    rows = pack_sft(kept, args.seq_len, pad_id=PAD)
    note = (f"{stats['truncated']} truncated, {len(rows['inputs'])} rows, "
            f"fill {np.mean(rows['segment_ids'] > 0):.0%}")
    return rows, int((rows["segment_ids"] > 0).sum()), note


def build_preference(pairs, args):
    kept, stats = truncate_examples(pairs, args.pair_len + 1, "truncate_prompt_left")
    rows = stack_pairs(preference_batch(kept, args.pair_len, pad_id=PAD))
    note = (f"{stats['truncated']} truncated, [2×{len(kept)}, {args.pair_len}] rows, "
            f"fill {np.mean(rows['segment_ids'] > 0):.0%}")
    return rows, int((rows["segment_ids"] > 0).sum()), note


def build_preference_per_batch(pairs, args):
    """Builds the rows batch by batch instead (nothing left to iterate)."""
    kept, _ = truncate_examples(pairs, args.pair_len + 1, "truncate_prompt_left")
    tokens = 0
    for start in range(0, len(kept), args.batch):
        tokens += int(preference_batch(kept[start:start + args.batch], args.pair_len,
                                       pad_id=PAD)["segment_ids"].sum())
    return None, tokens, f"{-(-len(kept) // args.batch)} calls of {args.batch} pairs"


def build_clm(docs, args):
    rows = pack_documents(docs, args.seq_len, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    return rows, int(rows["loss_mask"].sum()), f"{len(rows['inputs'])} rows, fill {rows['loss_mask'].mean():.0%}"


def best_time(build, data, args):
    """Returns (build seconds, epoch seconds, tokens, note) of the fastest of the repeats."""
    best = None
    for _ in range(args.repeats):
        start = time.perf_counter()
        rows, tokens, note = build(data, args)
        built = time.perf_counter()
        if rows is not None:
            one_epoch(rows, args.batch)
        timing = (built - start, time.perf_counter() - built, tokens, note)
        if best is None or sum(timing[:2]) < sum(best[:2]):
            best = timing
    return best


def prefetch_overhead(rows, args):
    """Returns (plain, prefetched) microseconds per batch over one epoch, best of the repeats."""
    results = []
    for prefetch in (False, True):
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            steps = one_epoch(rows, args.batch, prefetch=prefetch)
            seconds.append((time.perf_counter() - start) / steps)
        results.append(1e6 * min(seconds))
    return results


def measure_model(args):
    """(tokens/s, description) of the CLM train step of `--model_preset` on `--batch` × `--seq_len` batches: the
    best of `--repeats` rounds of `--model_steps` steps after a compile step, or `--model_tokens_per_sec` if set."""
    if args.model_tokens_per_sec > 0:
        return args.model_tokens_per_sec, "--model_tokens_per_sec"
    import jax

    from bench import clm_step
    from flaxalign import models

    config = models.ModelConfig.from_dict(models.preset(args.model_preset))
    if args.seq_len > config.max_seq_len:
        raise ValueError(f"--seq_len={args.seq_len} exceeds {args.model_preset}'s max_seq_len={config.max_seq_len}.")
    timer_args = types.SimpleNamespace(steps=args.model_steps, loss_chunk=256, batch=args.batch, seq=args.seq_len)
    with tempfile.TemporaryDirectory() as workdir:
        timer = clm_step.FlaxalignTimer(config, timer_args, workdir)
        seconds = min(timer.seconds_per_step(args.model_steps) for _ in range(args.repeats))
    what = (f"`{args.model_preset}` CLM train step, {args.batch}×{args.seq_len}, {config.dtype}, on "
            f"{jax.devices()[0].device_kind}: {seconds:.2f} s/step, best of {args.repeats}×{args.model_steps} steps, "
            f"measured in this run")
    return args.batch * args.seq_len / seconds, what


def _peak_rss_mib(reset=False):
    """The process's peak resident memory (VmHWM) in MiB, after resetting it when `reset`; None off Linux."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        return None


def parquet_stream(rows, repeats):
    """Writes `rows` preference records to a Parquet file (in chunks, so writing does not raise the peak) and
    returns {rows/s, seconds, peak memory growth while streaming, file size}, the best of `repeats`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flaxalign.data.sources import iter_records

    chunk = 50_000
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "pairs.parquet")
        schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                            ("source", pa.string())])
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, rows, chunk):
                ids = range(start, min(rows, start + chunk))
                writer.write_table(pa.table({
                    "prompt": [f"What is {i % 97} + {i % 89}? Answer with a number." for i in ids],
                    "chosen": [f"The answer is {i % 97 + i % 89}." for i in ids],
                    "rejected": [f"I think it might be {i % 97 + i % 89 + 1}, but I am not sure." for i in ids],
                    "source": ["synthetic"] * len(ids)}, schema=schema))
        best = None
        for _ in range(repeats):
            before = _peak_rss_mib(reset=True)
            start = time.perf_counter()
            count = sum(1 for _ in iter_records(path, "preference"))
            seconds = time.perf_counter() - start
            after = _peak_rss_mib()
            assert count == rows
            if best is None or seconds < best["seconds"]:
                best = {"rows": rows, "seconds": seconds, "rows_per_sec": rows / seconds,
                        "peak_growth_mib": None if before is None else after - before,
                        "file_mib": os.path.getsize(path) / 2**20}
    growth = "n/a" if best["peak_growth_mib"] is None else f"{best['peak_growth_mib']:.0f} MiB"
    print(f"Parquet preference records: {rows:,} rows ({best['file_mib']:.0f} MiB file) streamed and validated in "
          f"{best['seconds']:.2f} s = {best['rows_per_sec']:,.0f} rows/s (target ≥ 100,000); peak memory growth "
          f"while streaming {growth} (best of {repeats})", flush=True)
    return best


def main(argv=None):
    args = parse_args(argv)
    parquet = parquet_stream(args.parquet_rows, args.repeats) if args.parquet_rows else None
    if args.parquet_only:
        return {"parquet": parquet}
    print(f"timing the model: {args.model_preset} CLM train step on {args.batch}×{args.seq_len} ...", flush=True)
    model_tokens_per_sec, model_note = measure_model(args)
    rng = np.random.default_rng(0)
    print(f"making synthetic data: {args.examples:,} SFT examples and CLM documents, {args.pairs:,} pairs, "
          f"lengths {args.min_len}-{args.max_len} ...", flush=True)
    sft = sft_examples(args.examples, args.min_len, args.max_len, rng)
    pairs = preference_pairs(args.pairs, args.min_len, args.max_len, rng)
    cases = [
        ("SFT", build_sft, sft, args.examples),
        ("SFT, numpy inputs", build_sft, as_numpy(sft), args.examples),
        ("preference", build_preference, pairs, args.pairs),
        ("preference per batch", build_preference_per_batch, pairs, args.pairs),
        ("CLM pack_documents", build_clm, documents(args.examples, args.min_len, args.max_len, rng),
         args.examples),
    ]
    header = (f"{'pipeline':21} {'examples':>8} {'tokens':>11} {'build s':>7} {'epoch s':>7} "
              f"{'examples/s':>10} {'tokens/s':>11} {'× model':>7}  notes")
    print(header)
    print("-" * len(header))
    rows = []
    for name, build, data, count in cases:
        build_seconds, epoch_seconds, tokens, note = best_time(build, data, args)
        seconds = build_seconds + epoch_seconds
        rows.append({"pipeline": name, "examples": count, "tokens": tokens, "build_seconds": build_seconds,
                     "epoch_seconds": epoch_seconds, "tokens_per_sec": tokens / seconds,
                     "times_model": tokens / seconds / model_tokens_per_sec})
        print(f"{name:21} {count:8,} {tokens:11,} {build_seconds:7.3f} {epoch_seconds:7.3f} "
              f"{count / seconds:10,.0f} {tokens / seconds:11,.0f} {rows[-1]['times_model']:7,.0f}  {note}",
              flush=True)
    print(f"model: {model_tokens_per_sec:,.0f} tokens/s ({model_note}); target: loader ≥ 10× model")
    plain, prefetched = prefetch_overhead(build_sft(sft, args)[0], args)
    step_seconds = args.batch * args.seq_len / model_tokens_per_sec
    print(f"per batch of {args.batch} SFT rows: BatchIterator {plain:.0f} µs, through Prefetcher {prefetched:.0f} µs "
          f"(a thread hand-off; a {args.batch}×{args.seq_len} step at {model_tokens_per_sec:,.0f} tokens/s takes "
          f"{step_seconds:.2f} s)")
    return {"parquet": parquet, "model_tokens_per_sec": model_tokens_per_sec, "model": model_note, "pipelines": rows,
            "batch_iterator_us": plain, "prefetcher_us": prefetched}


if __name__ == "__main__":
    main()
