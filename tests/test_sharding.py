"""The mesh and the logical→mesh rule table."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flaxalign import errors, models, sharding
from tests import helpers

MESH_2x2x2 = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("sizes, expected", [((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)),
                                             ((1, 1, -1), (1, 1, 8)), ((2, 2, 2), (2, 2, 2))])
def test_resolve_mesh_shape(sizes, expected):
    assert sharding.resolve_mesh_shape(*sizes, num_devices=8) == expected


@pytest.mark.parametrize("sizes, message", [
    ((1, 1, 3), "mesh axis 'tensor' has size 3, which does not divide the 8 devices"),
    ((-1, -1, 1), "only one mesh axis may be -1"),
    ((2, 2, 1), "does not equal the 8 devices"),
    ((0, 1, 1), "mesh axis 'data' has size 0"),
])
def test_mesh_errors_name_the_axis_and_sizes(sizes, message):
    with pytest.raises(errors.MeshError, match=message):
        sharding.resolve_mesh_shape(*sizes, num_devices=8)


def test_rules_map_parameters_with_fallback_to_replication():
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 192), MESH_2x2x2) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16),
                                    MESH_2x2x2) == P(None, "fsdp", "tensor", None)
    # 3 kv heads do not divide tensor=2: replicated, not an error
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 3, 16), MESH_2x2x2) == P(
        "fsdp", None, None)
    # size-1 mesh axes are dropped from specs
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 192), {"data": 8, "fsdp": 1, "tensor": 1}) == P(
        None, None)


def test_batch_is_strict_and_uses_data_and_fsdp():
    assert sharding.logical_to_spec(("act_batch", None), (8, 5), MESH_2x2x2) == P(("data", "fsdp"), None)
    with pytest.raises(errors.MeshError, match="not divisible by mesh axes data×fsdp of size 2×2"):
        sharding.logical_to_spec(("act_batch",), (6,), MESH_2x2x2, name="global batch size")


def test_row_shards_count_the_data_and_fsdp_axes_of_the_active_mesh():
    assert sharding.row_shards() == 1  # no mesh
    for sizes, shards in (((2, 2, 2), 4), ((1, 1, 8), 1), ((8, 1, 1), 8), ((1, 4, 2), 4)):
        with jax.set_mesh(sharding.make_mesh(*sizes)):
            assert sharding.row_shards() == shards, sizes


def test_every_tiny_parameter_is_placed_on_every_test_mesh():
    graphdef, abstract, logical = models.abstract_model(helpers.tiny_model_config())
    for shape in [(8, 1, 1), (2, 2, 2), (2, 1, 4), (1, 8, 1)]:
        mesh = helpers.mesh(shape)
        shardings = sharding.tree_shardings(logical, abstract, mesh)
        for sh, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)):
            shard = sh.shard_shape(x.shape)
            assert all(d % s == 0 for d, s in zip(x.shape, shard)) and np.prod(shard) > 0
