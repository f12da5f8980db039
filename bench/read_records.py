"""Times `read_records` on a JSONL file of preference records (the timing moved out of the test suite).

    python bench/read_records.py                  # 100k lines, best of 3
    python bench/read_records.py --lines=1000000 --json=out.json

Prints records/s; the test suite checks only that the Python work per record is constant
(tests/data/test_sources.py), which no busy machine can make fail.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flaxalign.data.sources import read_records  # noqa: E402

RECORD = {"prompt": "What is 37 + 58?", "chosen": "The answer is 95.", "rejected": "The answer is 96."}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="", help="also write the result here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "pairs.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(RECORD) + "\n" for _ in range(args.lines))
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            records = read_records(path, "preference")
            seconds.append(time.perf_counter() - start)
            assert len(records) == args.lines
    best = min(seconds)
    result = {"lines": args.lines, "best_seconds": best, "records_per_sec": args.lines / best}
    print(f"read_records: {result['records_per_sec']:,.0f} preference records/s "
          f"({args.lines:,} JSONL lines, best of {args.repeats}: {best:.3f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
