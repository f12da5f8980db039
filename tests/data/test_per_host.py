"""Two real JAX processes, each reading only its slice of the data, assemble the same global batches as one process."""

import sys

import numpy as np
import pytest

from flaxalign.data.batching import pack_sft
from flaxalign.data.loader import BatchIterator
from tests import cli_helpers as cli

pytestmark = pytest.mark.slow

TIMEOUT = 120
NUM_BATCHES = 6
GLOBAL_BATCH = 8
SEED = 11

# Each process: 4 CPU devices, joins the 2-process job, reads its half of every
# global batch through a Prefetcher that assembles global arrays on an (8,1,1)
# mesh, gathers them back to host memory and saves them.
WORKER = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
process_id, address, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=process_id)

import numpy as np
from jax.experimental import multihost_utils
from flaxalign import sharding
from flaxalign.data.loader import BatchIterator
from flaxalign.data.prefetch import Prefetcher
from tests.data.test_per_host import GLOBAL_BATCH, NUM_BATCHES, SEED, dataset

assert jax.device_count() == 8 and jax.local_device_count() == 4
mesh = sharding.make_mesh(8, 1, 1)
source = BatchIterator(dataset(), GLOBAL_BATCH, seed=SEED,
                       process_index=jax.process_index(), process_count=2)
gathered = {}
with Prefetcher(source, transform=lambda local: sharding.global_batch(local, mesh)) as batches:
    for step in range(NUM_BATCHES):
        for key, value in next(batches).items():
            assert value.shape[0] == GLOBAL_BATCH
            gathered[f"{step}_{key}"] = multihost_utils.process_allgather(value, tiled=True)
    state = batches.get_state()
assert state["batches_consumed"] == NUM_BATCHES, state
np.savez(out_path, **gathered)
"""


def dataset():
    """Packed SFT rows, the same in every process (row count not a multiple of the batch)."""
    rng = np.random.default_rng(0)
    examples = []
    for length in rng.integers(2, 30, size=60).tolist():
        prompt = int(rng.integers(1, length))
        examples.append((rng.integers(4, 500, size=length).tolist(),
                         [0] * prompt + [1] * (length - prompt)))
    return pack_sft(examples, 32, pad_id=0)


def test_two_processes_assemble_the_one_process_global_batches(tmp_path):
    arrays = dataset()
    assert len(arrays["inputs"]) % GLOBAL_BATCH  # so some batch straddles two epochs
    assert len(arrays["inputs"]) < NUM_BATCHES * GLOBAL_BATCH
    single = BatchIterator(arrays, GLOBAL_BATCH, seed=SEED, process_count=1)
    expected = [next(single) for _ in range(NUM_BATCHES)]

    address = f"127.0.0.1:{cli.free_port()}"
    outputs = [str(tmp_path / f"process_{index}.npz") for index in range(2)]
    # The first worker to fail kills the other and fails the test with its log (no wait on a dead peer).
    cli.run_together([[sys.executable, "-c", WORKER, str(index), address, outputs[index]] for index in range(2)],
                     timeout=TIMEOUT)

    for path in outputs:
        with np.load(path) as got:
            for step, batch in enumerate(expected):
                for key, value in batch.items():
                    np.testing.assert_array_equal(got[f"{step}_{key}"], value,
                                                  err_msg=f"{path} batch {step} {key}")

