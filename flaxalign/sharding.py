"""The one place for the sharding policy: the mesh, the logical→mesh rule table, and multi-host set-up.

Parameters and activations are annotated with *logical* axis names ("embed", "mlp", "act_batch", …). `RULES` maps
each name to mesh axes with ordered fallbacks (MaxText style): the first candidate whose mesh size divides the
dimension, and whose mesh axes the tensor does not already use, wins; a parameter dimension that fits no candidate
is replicated, with a notice logged once. Batch dimensions are strict: they must divide, or a `MeshError` says so.
"""

import glob
import importlib.metadata
import importlib.util
import logging
import math
import os
import pkgutil
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from flaxalign import errors

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> ordered candidates; each candidate is a tuple of mesh axes (empty tuple = replicated).
RULES: dict[str, tuple[tuple[str, ...], ...]] = {
    # parameters
    "vocab": (("tensor",), ()),
    "embed": (("fsdp",), ()),
    "mlp": (("tensor",), ()),
    "heads": (("tensor",), ()),
    "kv_heads": (("tensor",), ()),
    "head_dim": ((),),
    "layers": ((),),
    "norm": ((),),
    # activations
    "act_batch": (("data", "fsdp"),),
    "act_length": ((),),
    "act_embed": ((),),
    "act_heads": (("tensor",), ()),
    "act_kv_heads": (("tensor",), ()),
    "act_mlp": (("tensor",), ()),
    "act_vocab": (("tensor",), ()),
}
STRICT = frozenset({"act_batch"})

_notices_logged: set[tuple[str, int, tuple[str, ...]]] = set()


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Replaces a single -1 with the remaining device count and checks that the product equals `num_devices`."""
    sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise errors.MeshError(f"only one mesh axis may be -1, got {free} (config.mesh).")
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise errors.MeshError(f"mesh axis '{name}' has size {size}; sizes must be positive or -1.")
        if size > 0 and num_devices % size:
            raise errors.MeshError(
                f"mesh axis '{name}' has size {size}, which does not divide the {num_devices} devices.")
    fixed = math.prod(size for size in sizes.values() if size > 0)
    if free:
        if num_devices % fixed:
            raise errors.MeshError(
                f"mesh axes {sizes} leave no whole size for '{free[0]}' on {num_devices} devices.")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise errors.MeshError(
            f"mesh data×fsdp×tensor = {sizes['data']}×{sizes['fsdp']}×{sizes['tensor']} = "
            f"{math.prod(sizes.values())} does not equal the {num_devices} devices.")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axis types (GSPMD propagates everything not annotated)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int],
                    *, name: str = "") -> PartitionSpec:
    """Maps logical axis names of one array to a PartitionSpec using `RULES` and its fallbacks."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"{name}: logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for logical, dim in zip(logical_axes, shape):
        if logical is None:
            spec.append(None)
            continue
        if logical not in RULES:
            raise ValueError(f"{name}: logical axis {logical!r} has no rule in flaxalign.sharding.RULES")
        chosen = None
        for candidate in RULES[logical]:
            axes = tuple(a for a in candidate if mesh_shape.get(a, 1) > 1)
            size = math.prod(mesh_shape[a] for a in axes)
            if not used.intersection(axes) and dim % size == 0:
                chosen = axes
                break
        if chosen is None:
            wanted = tuple(a for a in RULES[logical][0] if mesh_shape.get(a, 1) > 1)
            sizes = "×".join(str(mesh_shape[a]) for a in wanted)
            if logical in STRICT:
                raise errors.MeshError(
                    f"{name or 'batch'} dimension {dim} ({logical}) is not divisible by mesh axes "
                    f"{'×'.join(wanted)} of size {sizes}.")
            chosen = ()
        if not chosen and RULES[logical][0]:
            wanted = tuple(a for a in RULES[logical][0] if mesh_shape.get(a, 1) > 1)
            key = (name, dim, wanted)
            if wanted and key not in _notices_logged:
                _notices_logged.add(key)
                logging.info("sharding: %s dim %d (%s) does not divide mesh axes %s %s; replicated.",
                             name, dim, logical, wanted, [mesh_shape[a] for a in wanted])
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def mesh_shape_of(mesh: Mesh | Any) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def tree_shardings(logical_tree: Any, abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of arrays given a matching pytree of logical-axis tuples."""
    mesh_shape = mesh_shape_of(mesh)
    paths_and_axes = jax.tree_util.tree_flatten_with_path(logical_tree, is_leaf=_is_axes)[0]
    shapes = jax.tree.leaves(abstract_tree)
    if len(paths_and_axes) != len(shapes):
        raise ValueError("logical axes tree does not match the parameter tree")
    specs = [logical_to_spec(axes, np.shape(x), mesh_shape, name=jax.tree_util.keystr(path))
             for (path, axes), x in zip(paths_and_axes, shapes)]
    treedef = jax.tree.structure(abstract_tree)
    return jax.tree.unflatten(treedef, [NamedSharding(mesh, s) for s in specs])


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def batch_sharding(mesh: Mesh, batch_size: int, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[batch, ...]` array: batch over data×fsdp; a clear error if it does not divide."""
    spec = logical_to_spec(("act_batch",) + (None,) * (ndim - 1), (batch_size,) + (1,) * (ndim - 1),
                           mesh_shape_of(mesh), name="global batch size")
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the active mesh (`jax.set_mesh`); a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh_shape_of(mesh), name="activation")
    return jax.lax.with_sharding_constraint(x, spec)


def row_shards() -> int:
    """How many ways the active mesh (`jax.set_mesh`) splits activation rows ("act_batch"): a device's share of a
    step's token rows is N / row_shards(). 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    shape = mesh_shape_of(mesh)
    axes = [a for group in RULES["act_batch"] for a in ((group,) if isinstance(group, str) else group)]
    return math.prod(shape.get(a, 1) for a in axes)


def constrain_rows(tree, strict: bool = True):
    """Each `[batch, ...]` array of `tree` sharded by rows over data×fsdp (`constrain`). Not `strict`: an array whose
    rows do not divide data×fsdp is left as it is instead of refused."""
    def rows(x):
        try:
            return constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))
        except errors.MeshError:
            if strict:
                raise
            return x
    return jax.tree.map(rows, tree)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's rows into global arrays sharded over data×fsdp (each host reads only its shard)."""
    out = {}
    for key, local in local_batch.items():
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        sharding = batch_sharding(mesh, global_shape[0], local.ndim)
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """`jax.distributed.initialize` from flags; with no flags it only runs on Cloud TPU VMs (auto-detected)."""
    if coordinator_address:
        if num_processes < 1 or process_id < 0:
            raise errors.ConfigError(
                "--coordinator_address needs --num_processes and --process_id as well.")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif _on_tpu_vm():
        jax.distributed.initialize()


def skip_absent_tpu() -> bool:
    """Where libtpu is installed (the `[tpu]` extra, for `flaxalign plan`) but this host has no TPU chips, no
    platform was chosen and no other accelerator plugin is installed, selects the CPU before JAX initialises a
    backend: JAX would otherwise probe for TPUs at start-up and print libtpu's errors before falling back to the
    CPU. Returns whether it did."""
    import jax
    if jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS"):
        return False
    if importlib.util.find_spec("libtpu") is None or _on_tpu_vm() or _accelerator_plugins():
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def _accelerator_plugins() -> bool:
    """Whether a PJRT plugin (GPU: jax-cuda12-plugin and the like) is installed; JAX then picks the platform."""
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    try:
        import jax_plugins
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def _on_tpu_vm() -> bool:
    """A Cloud TPU VM: its runtime's environment, or TPU chips visible as /dev/accel* (v2–v4, v5p) or /dev/vfio/N
    (v5e, v6e) — current JAX finds the slice's other hosts from the VM metadata and no longer sets
    CLOUD_TPU_TASK_ID. Runs forced onto the CPU (JAX_PLATFORMS=cpu) never initialise."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return False
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
        return True
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
