"""Times reading pretrained weights: a GGUF file (`load_gguf`), a ~100 MB bfloat16 HF safetensors directory
(`load_pretrained`, without and onto an 8-device fsdp mesh), writing one (`save_hf`), and GGUF block dequantisation
(`flaxalign.interop.gguf.dequantize` next to `gguf.quants.dequantize` called directly) on a 576×1536 matrix.

    python bench/weights_io.py                        # .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, best of 3
    python bench/weights_io.py --gguf=PATH --repeats=5 --json=out.json

The safetensors directory has SmolLM2-135M's shapes with 6 layers (49.5M params: 99 MB in bfloat16, as HF
checkpoints are stored), random values, written with `safetensors.numpy.save_file`. Each timing is the best of
--repeats; loads include the host → device transfer (`jax.block_until_ready`).
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # the mesh load on a CPU-only machine

import gguf  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from flaxalign import models, sharding  # noqa: E402
from flaxalign.interop import gguf as gguf_io  # noqa: E402
from flaxalign.interop import hf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GGUF = os.path.join(REPO, ".cache", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEQUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
# gguf.quants cannot quantize k-quants: their blocks are random bytes with these float16 scale fields (byte offsets
# in the block) set to small finite values.
K_SCALES = {"Q4_K": (0, 2), "Q6_K": (208,)}


def _best(fn, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def _mesh():
    n = min(8, len(jax.devices()))
    return sharding.make_mesh(1, n, 1, devices=jax.devices()[:n])


def _params(loaded):
    return loaded.params


def bench_gguf(path: str, repeats: int) -> dict:
    if not os.path.isfile(path):
        print(f"load_gguf: {path} not found (launch/fetch_smollm2.sh fetches it); skipped")
        return {}
    out = {"file_mb": os.path.getsize(path) / 1e6,
           "load_s": _best(lambda: _params(gguf_io.load_gguf(path)), repeats),
           "load_mesh_s": _best(lambda: _params(gguf_io.load_gguf(path, mesh=_mesh())), repeats)}
    print(f"load_gguf {os.path.basename(path)} ({out['file_mb']:.0f} MB): {out['load_s']:.2f} s, "
          f"onto a {len(_mesh().devices.flat)}-device fsdp mesh {out['load_mesh_s']:.2f} s")
    return out


def bench_safetensors(repeats: int) -> dict:
    config = dataclasses.replace(models.ModelConfig.from_dict(models.preset("smollm2_135m")), n_layers=6)
    _, abstract, _ = models.abstract_model(config)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape, np.float32)), abstract)
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf.params_to_hf_state_dict(config, params).items()}
    with tempfile.TemporaryDirectory() as folder:
        model_dir = os.path.join(folder, "bf16")
        os.makedirs(model_dir)
        save_file(state, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(hf.hf_config_dict(config), f)
        size = os.path.getsize(os.path.join(model_dir, "model.safetensors")) / 1e6
        out = {"file_mb": size,
               "load_s": _best(lambda: _params(hf.load_pretrained(model_dir)), repeats),
               "load_mesh_s": _best(lambda: _params(hf.load_pretrained(model_dir, mesh=_mesh())), repeats)}
        written = os.path.join(folder, "f32")
        out["save_f32_s"] = _best(lambda: hf.save_hf(config, params, written), repeats)
        out["save_f32_mb"] = os.path.getsize(os.path.join(written, "model.safetensors")) / 1e6
    print(f"load_pretrained bfloat16 safetensors ({size:.0f} MB): {out['load_s']:.2f} s, onto the mesh "
          f"{out['load_mesh_s']:.2f} s; save_hf float32 ({out['save_f32_mb']:.0f} MB): {out['save_f32_s']:.2f} s")
    return out


def bench_dequantize(repeats: int) -> dict:
    values = np.random.default_rng(1).normal(size=(576, 1536)).astype(np.float32)
    out = {}
    for name in DEQUANT_TYPES:
        raw = _blocks(values, name)
        package = _best(lambda: gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]), repeats)
        try:
            ours = _best(lambda: gguf_io.dequantize(raw, name, values.shape), repeats)
        except ValueError:
            ours = None  # a type this tree's dequantize does not read
        out[name] = {"flaxalign_ms": None if ours is None else ours * 1e3, "gguf_package_ms": package * 1e3}
        shown = "unsupported" if ours is None else f"{ours * 1e3:.1f} ms"
        print(f"dequantize 576x1536 {name}: flaxalign.interop.gguf.dequantize {shown}, "
              f"gguf.quants.dequantize {package * 1e3:.1f} ms")
    return out


def _blocks(values: np.ndarray, name: str) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[name]
    if name not in K_SCALES:
        return gguf.quants.quantize(values, qtype)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, size=(values.size // block_values, block_bytes), dtype=np.uint8)
    for offset in K_SCALES[name]:
        raw[:, offset:offset + 2] = (0.01 * rng.random((len(raw), 1))).astype(np.float16).view(np.uint8)
    return raw.reshape(values.shape[0], -1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", default=DEFAULT_GGUF)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="", help="also write the result here")
    args = p.parse_args(argv)
    result = {"dequantize": bench_dequantize(args.repeats), "safetensors": bench_safetensors(args.repeats),
              "gguf": bench_gguf(args.gguf, args.repeats)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
