"""Config checks every stage makes before it reads any data, so a bad setting fails fast with one sentence."""

from flaxalign import errors, sharding


def check_shapes(config, model_config, mesh) -> None:
    """Sequence length within the model's, batch divisible into micro-batches, micro-batch divisible by the mesh."""
    data_cfg = config.data
    if data_cfg.seq_len > model_config.max_seq_len:
        raise errors.ConfigError(
            f"data.seq_len={data_cfg.seq_len} exceeds model.max_seq_len={model_config.max_seq_len}.")
    if data_cfg.batch_size % config.grad_accum:
        raise errors.ConfigError(
            f"data.batch_size={data_cfg.batch_size} is not divisible by grad_accum={config.grad_accum}.")
    sharding.batch_sharding(mesh, data_cfg.batch_size // config.grad_accum)


def check_rows(mesh, rows: int, what: str) -> None:
    """`rows` sequences that one program runs (a rollout, a micro-batch, the held-out prompts of an evaluation) split
    over the mesh's batch axes: checked before any weights are read, the error naming the fields behind `rows`
    (a misfit would otherwise surface later, as an activation whose batch does not divide)."""
    try:
        sharding.batch_sharding(mesh, rows)
    except errors.MeshError as e:
        rows_do = "1 row does" if rows == 1 else f"{rows} rows do"
        raise errors.ConfigError(f"{what} = {rows_do} not split over the mesh: {e}") from None
