"""Peak FLOP/s for MFU: measured in-process on CPU (this class of machine swings 2× between minutes), from a table
of datasheet dense peaks on accelerators."""

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip.
ACCELERATOR_PEAK = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def measure_matmul_peak(dtype=jnp.float32, size: int = 1024, repeats: int = 8, device=None) -> float:
    """Best-of-`repeats` FLOP/s of a square matmul on one device (XLA CPU already uses every core for it)."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    b = jax.device_put(jnp.ones((size, size), dtype) * 0.5, device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def peak_flops(dtype=jnp.float32) -> tuple[float, str]:
    """Peak FLOP/s of all devices of this job and where the number comes from."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measure_matmul_peak(dtype), "measured f32 matmul (CPU)"
    for name, peak in ACCELERATOR_PEAK.items():
        if name.lower() in device.device_kind.lower():
            return peak * jax.device_count(), f"{device.device_kind} datasheet bf16 × {jax.device_count()}"
    return measure_matmul_peak(dtype) * jax.device_count(), f"measured matmul ({device.device_kind})"
