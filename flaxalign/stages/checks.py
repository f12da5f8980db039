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
