"""Safetensors files, read and written with the `safetensors` package (its numpy framework).

`SafetensorsFiles(files)` is the tensors of one or more files (an HF model's shards, a PEFT adapter) as a read-only
mapping of numpy arrays over `safetensors.safe_open` handles, which memory-map the files: nothing is read until a
tensor is used, and `read(name, index)` reads one region of a tensor (`get_slice`), which is how `hf.place_params`
builds each device's shard of a param without a host copy of the whole model. `write_safetensors` is
`safetensors.numpy.save_file`. bfloat16 needs no code of ours: the numpy framework of safetensors (0.8) reads BF16
as `ml_dtypes.bfloat16` arrays (the dtype JAX uses), once ml_dtypes has registered that dtype with numpy (imported
here for that), and writes them bit for bit.
"""

from collections.abc import Iterator, Mapping

import ml_dtypes  # noqa: F401 - registers "bfloat16" with numpy, the dtype name safetensors' numpy reader asks for
import numpy as np
import safetensors
import safetensors.numpy

from flaxalign import errors


class SafetensorsFiles(Mapping):
    """The tensors of safetensors `files` by name (a name in two files: the later file's), memory-mapped.

    `self[name]` is the whole tensor as a numpy array in the file's dtype, `read(name, index)` a region of it
    (`index`: a tuple of slices, numpy style), `shape(name)` / `dtype(name)` come from the header, and `metadata` is
    the files' `__metadata__` entries, merged. A file that is not a complete safetensors file (truncated, a header
    that does not parse) is a `CheckpointError` naming it, raised here; a tensor whose dtype numpy cannot hold (the
    float8 / float4 types) is one when it is read.
    """

    def __init__(self, files: list[str]):
        self._handles: dict[str, safetensors.safe_open] = {}
        self._where: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            try:
                handle = safetensors.safe_open(file, framework="numpy")
            except (safetensors.SafetensorError, OSError) as e:
                raise errors.CheckpointError(f"cannot read safetensors file {file!r}: {e}.") from e
            self._handles[file] = handle
            self.metadata.update(handle.metadata() or {})
            self._where.update(dict.fromkeys(handle.keys(), file))

    def _slice(self, name: str):
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype name ("F32", "BF16", ...)."""
        return self._slice(name).get_dtype()

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Tensor `name`, or with `index` only that region of it, read from the file into a new numpy array."""
        handle = self._handles[self._where[name]]
        try:
            return handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except (AttributeError, TypeError) as e:  # the numpy framework has no numpy dtype for it
            raise errors.CheckpointError(
                f"HF tensor {name!r} has unsupported safetensors dtype {self.dtype(name)} ({e}).") from e
        except safetensors.SafetensorError as e:
            raise errors.CheckpointError(f"cannot read safetensors file {self._where[name]!r}: {e}.") from e

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read(name)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def write_safetensors(file: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
                      ) -> None:
    """Writes numpy arrays (bfloat16 as `ml_dtypes.bfloat16`) with `safetensors.numpy.save_file`; the header's
    `__metadata__` is `metadata` plus "format": "pt", which transformers' loader asks for."""
    arrays = {}
    for name, value in tensors.items():
        value = np.asarray(value)
        arrays[name] = value if value.flags.c_contiguous else value.copy(order="C")  # save_file reads raw memory
    safetensors.numpy.save_file(arrays, file, metadata={"format": "pt", **(metadata or {})})
