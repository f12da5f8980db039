"""A damaged checkpoint never ends a run in a traceback and never costs a good one: resuming falls back to the newest
step that reads (moving each damaged newer step aside to `corrupt-N`, bytes untouched), starting from another run
(`init_from`) falls back without changing that run's folder, and when nothing reads, nothing is moved."""

import gc
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import types
import warnings

import jax
import numpy as np
import pytest

from flaxalign import errors
from flaxalign.train import checkpoint, loop
from flaxalign.train.checkpoint import Checkpointer
from tests import helpers

# Reading a deliberately damaged array leaves Orbax read coroutines that the garbage collector may finalise after a
# test ends, under pytest's own unraisable hook; the CLI's output is checked to hold no traceback in test_cli.py.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

STEPS = (2, 4, 6)


def _task():
    task = helpers.clm_task(helpers.tiny_model_config())
    task.train_data = helpers.DataPosition()
    return task


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run folder with checkpoints at steps 2, 4 and 6 whose params differ (so a fallback shows), and each
    step's params as numpy."""
    root = str(tmp_path_factory.mktemp("run"))
    task, mesh = _task(), helpers.mesh((1, 1, 1))
    checkpointer = Checkpointer(os.path.join(root, "checkpoints"), keep=5, async_save=False)
    state, _, _ = loop.initial_state(task, 0, mesh, checkpointer)
    params = {}
    for step in STEPS:
        state = state.replace(params=jax.tree.map(lambda x: x + 0.01 * step, state.params))
        checkpointer.save(step, state, {"batches_consumed": step}, task.metadata)
        params[step] = jax.tree.map(np.asarray, state.params)
    checkpointer.close()
    return root, params


def _digest(folder: str) -> dict:
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _largest_state_file(step_dir: str) -> str:
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(p)]
    return max(files, key=os.path.getsize)


def _truncate(fraction):
    def damage(step_dir):
        path = _largest_state_file(step_dir)
        os.truncate(path, int(os.path.getsize(path) * fraction))
    return damage


def _remove(item):
    return lambda step_dir: shutil.rmtree(os.path.join(step_dir, item))


def _empty(step_dir):
    for name in os.listdir(step_dir):
        path = os.path.join(step_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _write(item, text):
    def damage(step_dir):
        with open(os.path.join(step_dir, item, "metadata"), "w") as f:
            f.write(text)
    return damage


DAMAGE = {
    "state half truncated": (_truncate(0.5), "state item"),
    "state emptied": (_truncate(0.0), "state item"),
    "step folder emptied": (_empty, "meta item"),
    "meta deleted": (_remove("meta"), "meta item"),
    "data deleted": (_remove("data"), "data item"),
    "negative data position": (_write("data", json.dumps({"batches_consumed": -3})), "data position"),
    "garbage data position": (_write("data", "not json"), "data item"),
    "data position a list": (_write("data", "[1, 2]"), "not a JSON object"),
    "half-written meta": (_write("meta", '{"stage": "cl'), "meta item"),
}


def _copy(saved_run, tmp_path) -> str:
    root = str(tmp_path / "run")
    shutil.copytree(saved_run[0], root)
    return root


@pytest.mark.parametrize("case", DAMAGE)
def test_resume_falls_back_past_a_damaged_newest_step(saved_run, tmp_path, case, caplog):
    root = _copy(saved_run, tmp_path)
    directory = os.path.join(root, "checkpoints")
    damage, reason = DAMAGE[case]
    damage(os.path.join(directory, "6"))
    good_before = {s: _digest(os.path.join(directory, str(s))) for s in (2, 4)}
    damaged_before = _digest(os.path.join(directory, "6"))

    task = _task()
    state, _, step = loop.initial_state(task, 0, helpers.mesh((1, 1, 1)), Checkpointer(directory))
    assert step == 4 and task.train_data.get_state() == {"batches_consumed": 4}
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved_run[1][4])):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert sorted(os.listdir(directory)) == ["2", "4", "corrupt-6"]
    assert _digest(os.path.join(directory, "corrupt-6")) == damaged_before  # moved aside, bytes as they were
    assert {s: _digest(os.path.join(directory, str(s))) for s in (2, 4)} == good_before
    warnings = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warnings) == 1 and "step 6" in warnings[0] and reason in warnings[0] and "corrupt-6" in warnings[0]


def test_a_second_damage_of_the_same_step_is_kept_beside_the_first(saved_run, tmp_path):
    root = _copy(saved_run, tmp_path)
    directory = os.path.join(root, "checkpoints")
    os.makedirs(os.path.join(directory, "corrupt-6"))
    _remove("meta")(os.path.join(directory, "6"))
    loop.initial_state(_task(), 0, helpers.mesh((1, 1, 1)), Checkpointer(directory))
    assert sorted(os.listdir(directory)) == ["2", "4", "corrupt-6", "corrupt-6.1"]


def test_when_no_step_reads_nothing_is_moved_and_the_error_names_each_step(saved_run, tmp_path):
    root = _copy(saved_run, tmp_path)
    directory = os.path.join(root, "checkpoints")
    for step in STEPS:
        _remove("meta")(os.path.join(directory, str(step)))
    before = _digest(directory)
    with pytest.raises(errors.CheckpointError, match=r"no checkpoint in .* can be read \(step 6: the meta item .*; "
                                                     r"step 4: .*; step 2: .*\); nothing was moved or deleted"):
        loop.initial_state(_task(), 0, helpers.mesh((1, 1, 1)), Checkpointer(directory))
    assert _digest(directory) == before and sorted(os.listdir(directory)) == ["2", "4", "6"]


def test_another_model_is_refused_not_taken_for_damage(saved_run, tmp_path):
    root = _copy(saved_run, tmp_path)
    directory = os.path.join(root, "checkpoints")
    before = _digest(directory)
    task = helpers.clm_task(helpers.tiny_model_config(d_ff=128))
    task.train_data = helpers.DataPosition()
    with pytest.raises(errors.CheckpointError, match="different model config"):
        loop.initial_state(task, 0, helpers.mesh((1, 1, 1)), Checkpointer(directory))
    assert _digest(directory) == before


def test_a_changed_optimizer_layout_is_refused_naming_the_array(saved_run, tmp_path):
    """Same model, but no gradient clipping: the optimizer state has another layout — an error, not damage."""
    root = _copy(saved_run, tmp_path)
    directory = os.path.join(root, "checkpoints")
    before = _digest(directory)
    task = helpers.clm_task(helpers.tiny_model_config(), helpers.optim_config(clip_norm=0.0))
    task.train_data = helpers.DataPosition()
    with pytest.raises(errors.CheckpointError, match=r"does not match this run's model or optimizer \(.*opt_state"):
        loop.initial_state(task, 0, helpers.mesh((1, 1, 1)), Checkpointer(directory))
    assert _digest(directory) == before


def test_init_from_reads_the_newest_readable_step_and_leaves_the_run_alone(saved_run, tmp_path, caplog):
    root = _copy(saved_run, tmp_path)
    _truncate(0.5)(os.path.join(root, "checkpoints", "6"))
    before = _digest(root)
    task = _task()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = checkpoint.load_params(root, task.abstract_params, jax.tree.map(lambda _: device, task.abstract_params))
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(saved_run[1][4])):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert checkpoint.read_metadata(root)["stage"] == task.metadata["stage"]
    assert _digest(root) == before  # another run's folder is only read
    assert any("step 6" in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records)
    _remove("meta")(os.path.join(root, "checkpoints", "6"))
    assert checkpoint.latest_step(root) == 4


_ABANDONED_READS_SCRIPT = r"""
import os, sys, time
import jax, jax.numpy as jnp, orbax.checkpoint as ocp
from flaxalign.train import checkpoint

directory = sys.argv[1]
tree = {f"a{i}": jnp.arange(20_000 + i, dtype=jnp.float32) for i in range(300)}
manager = ocp.CheckpointManager(directory, item_names=("state",))
manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
manager.wait_until_finished()
files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(directory, "1", "state")) for f in names]
biggest = max(files, key=os.path.getsize)
os.truncate(biggest, os.path.getsize(biggest) // 2)
device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
for _ in range(5):
    try:
        checkpoint._read_arrays(lambda: manager.restore(1, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))), "state item")
    except checkpoint.Unreadable as e:
        print("unreadable:", str(e).splitlines()[0][:80])
time.sleep(2)  # the abandoned reads report from TensorStore threads after the restore has returned


class RaisesWhenCollected:
    def __del__(self):
        raise ValueError("an unrelated error must still be reported")


RaisesWhenCollected()
"""


def test_a_failed_read_leaves_no_late_tracebacks_and_other_errors_still_show(tmp_path):
    """300 arrays, one file cut in half, read 5 times: each read is one `Unreadable`, and the sibling reads Orbax
    abandons (which report "Event loop is closed" from TensorStore threads, seconds later — the CI failure this
    guards against) print nothing; an unrelated unraisable error afterwards is still printed."""
    script = tmp_path / "abandoned_reads.py"
    script.write_text(_ABANDONED_READS_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("unreadable: the state item (ValueError: OUT_OF_RANGE") == 5, done.stdout
    assert "Event loop is closed" not in done.stderr and "coroutine" not in done.stderr, done.stderr[-3000:]
    assert "an unrelated error must still be reported" in done.stderr, done.stderr[-3000:]


def _closed_loop_echo():
    return types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"),
                                 exc_traceback=None, err_msg=None, object=None)


def _warned(text: str) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(text, RuntimeWarning)
    return [str(w.message) for w in caught]


def test_read_echoes_are_dropped_during_a_read_and_after_a_failed_one_only(monkeypatch, caplog):
    """Deterministic half of the test above: the filters are in place while `read` runs (the sibling that reports
    while a failure unwinds), a successful read takes them away again, and a failed read leaves them for good —
    never silencing another unraisable. Only this test's own objects are looked for: a late echo of an earlier
    test's failed read may arrive at any time."""
    gc.collect()
    reached = []
    monkeypatch.setattr(sys, "unraisablehook", reached.append)
    monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])
    monkeypatch.setattr(checkpoint, "_READ_ECHOES", checkpoint._ReadEchoes())
    other = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("not an echo"), exc_traceback=None,
                                  err_msg=None, object=None)
    during, after_success, after_failure = _closed_loop_echo(), _closed_loop_echo(), _closed_loop_echo()

    def logged(text: str) -> bool:
        logging.getLogger("asyncio").error(text)
        return any(r.getMessage() == text for r in caplog.records)

    def read():
        sys.unraisablehook(during)
        sys.unraisablehook(other)
        return _warned("coroutine 'during' was never awaited"), logged("Task exception was never retrieved: during")

    def fail():
        raise OSError("OUT_OF_RANGE: the file is cut")

    def reached_(item) -> bool:
        return any(r is item for r in reached)

    with warnings.catch_warnings():
        assert checkpoint._read_arrays(read, "state item") == ([], False)
        assert reached_(other) and not reached_(during)
        sys.unraisablehook(after_success)
        assert reached_(after_success)
        assert _warned("coroutine 'after_success' was never awaited") == ["coroutine 'after_success' was never awaited"]
        assert logged("Task exception was never retrieved: after success")
        with pytest.raises(checkpoint.Unreadable, match="OUT_OF_RANGE"):
            checkpoint._read_arrays(fail, "state item")
        sys.unraisablehook(after_failure)
        assert not reached_(after_failure)
        assert _warned("coroutine 'after_failure' was never awaited") == []
        assert not logged("Task exception was never retrieved: after failure")
        other.exc_value = ValueError("still not an echo")
        reached.clear()
        sys.unraisablehook(other)
        assert reached_(other)
