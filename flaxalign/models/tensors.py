"""HF tensor tables: one `HFTensor` per Hugging Face tensor, saying where it lives in flaxalign's params and how the
two layouts convert. Each model family states its table next to its module (`llama.global_tensors` /
`llama.layer_tensors`, `gemma.…`); `flaxalign.interop.hf` reads and writes checkpoints through the table of the
config's family (`models.families`). numpy only.

HF `nn.Linear.weight` is [out, in]; flaxalign kernels are [in, ...out] and stacked over a leading layer axis. HF
splits the q/k/v output features head-major (`view(B, T, heads, head_dim)`), which is exactly a reshape of the
transposed kernel to [D, heads, head_dim].
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
    (`read_flax` makes it)."""

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_region: Callable[[Index], Index]

    def read_flax(self, tensors: Any, name: str, index: Index) -> np.ndarray:
        """Region `index` (slices with int bounds, step 1) of the float32 flax-layout array of HF tensor `name` (this
        tensor, or one layer's), read from `tensors` (`tensors.read(name, hf_index)`, e.g. a `SafetensorsFiles`) as
        the region of the HF tensor that covers it."""
        piece = self.to_flax(np.asarray(tensors.read(name, self.hf_region(index)), np.float32))
        # a dimension read whole because the HF dimension holds whole heads (head_dim) is cut to `index` here
        piece = piece[tuple(slice(None) if n == s.stop - s.start else s for n, s in zip(piece.shape, index))]
        return np.ascontiguousarray(piece)


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
