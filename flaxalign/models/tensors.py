"""HF tensor tables: one `HFTensor` per Hugging Face tensor, saying where it lives in flaxalign's params and how the
two layouts convert. Each model family states its table next to its module (`llama.global_tensors` /
`llama.layer_tensors`, `gemma.…`); `flaxalign.interop.hf` reads and writes checkpoints through the table of the
config's family (`models.families`). numpy only.

HF `nn.Linear.weight` is [out, in]; flaxalign kernels are [in, ...out] and stacked over a leading layer axis. HF
splits the q/k/v output features head-major (`view(B, T, heads, head_dim)`), which is exactly a reshape of the
transposed kernel to [D, heads, head_dim].

A fused HF tensor (Phi-3's `qkv_proj` / `gate_up_proj`) is several `HFTensor`s with the same `hf_name`, each
`rows` of it (a slice of its first dimension) with its own place in flaxalign's params: reading a part reads the
region of its rows, writing concatenates the parts in row order (`whole_shapes`, `assemble`).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

Index = tuple[slice, ...]  # a region of an array: one slice per dimension, numpy style


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One HF tensor and where it lives in flaxalign's params; `hf_name` holds `{i}` for per-layer tensors.

    `to_flax` / `to_hf` convert the whole tensor. `to_flax` also converts a region of the HF tensor that
    `hf_region(index)` gives for a region `index` of the flax array (slices with int start and stop, step 1): that
    region covers `index`, widened to whole heads where the flax array splits an HF dimension into heads × head_dim,
    so `to_flax(hf[hf_region(index)])` is `flax[index]` except that a head_dim cut is still to be made
    (`read_flax` makes it).

    `rows` (int bounds): this tensor is those rows of the HF tensor `hf_name`, whose other rows are other params
    (a fused tensor); `hf_shape`, `to_flax`, `to_hf` and `hf_region` are then the part's."""

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_region: Callable[[Index], Index]
    rows: slice | None = None

    def part(self, whole: np.ndarray) -> np.ndarray:
        """This tensor's rows of the whole HF tensor (the whole tensor unless fused)."""
        return whole if self.rows is None else whole[self.rows]

    def read_flax(self, tensors: Any, name: str, index: Index) -> np.ndarray:
        """Region `index` (slices with int bounds, step 1) of the float32 flax-layout array of HF tensor `name` (this
        tensor, or one layer's), read from `tensors` (`tensors.read(name, hf_index)`, e.g. a `SafetensorsFiles`) as
        the region of the HF tensor that covers it."""
        region = self.hf_region(index)
        if self.rows is not None:  # the part's rows, offset into the fused tensor
            first, *rest = region
            start, stop, _ = first.indices(self.hf_shape[0])
            region = (slice(self.rows.start + start, self.rows.start + stop), *rest)
        piece = self.to_flax(np.asarray(tensors.read(name, region), np.float32))
        # a dimension read whole because the HF dimension holds whole heads (head_dim) is cut to `index` here
        piece = piece[tuple(slice(None) if n == s.stop - s.start else s for n, s in zip(piece.shape, index))]
        return np.ascontiguousarray(piece)


def whole_shapes(specs: list[HFTensor]) -> dict[str, tuple[int, ...]]:
    """HF name → shape of the whole HF tensor, for a table in which fused tensors are parts (`HFTensor.rows`) that
    tile its rows in order."""
    out: dict[str, tuple[int, ...]] = {}
    parts: dict[str, list[HFTensor]] = {}
    for spec in specs:
        if spec.rows is None:
            out[spec.hf_name] = spec.hf_shape
        else:
            parts.setdefault(spec.hf_name, []).append(spec)
    for name, fused in parts.items():
        fused.sort(key=lambda spec: spec.rows.start)
        stop = 0
        for spec in fused:
            if (spec.rows.start, spec.rows.stop) != (stop, stop + spec.hf_shape[0]) or \
                    spec.hf_shape[1:] != fused[0].hf_shape[1:]:
                raise ValueError(f"the parts of fused HF tensor {name!r} do not tile its rows")
            stop = spec.rows.stop
        out[name] = (stop,) + fused[0].hf_shape[1:]
    return out


def assemble(pieces: list[tuple[str, HFTensor, np.ndarray]]) -> dict[str, np.ndarray]:
    """HF tensors by name from (name, spec, HF-layout value of the spec) pieces: a whole tensor as it is, a fused
    one as its parts concatenated in row order (at the place of its first part)."""
    grouped: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, spec, value in pieces:
        grouped.setdefault(name, []).append((0 if spec.rows is None else spec.rows.start, value))
    return {name: parts[0][1] if len(parts) == 1 else
            np.concatenate([value for _, value in sorted(parts, key=lambda p: p[0])])
            for name, parts in grouped.items()}


def transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def identity(x: Any) -> Any:
    return x


def swapped(index: Index) -> Index:
    """The region of a matrix that holds the transpose of region `index`."""
    return index[::-1]


def heads(index: slice, head_dim: int) -> slice:
    """The rows of whole heads `index.start` .. `index.stop` in an HF dimension of heads × head_dim."""
    return slice(index.start * head_dim, index.stop * head_dim)


def vector(hf_name: str, path: tuple[str, ...], size: int) -> HFTensor:
    """A 1-D tensor kept as it is (a norm's weight)."""
    return HFTensor(hf_name, path, (size,), identity, identity, identity)
