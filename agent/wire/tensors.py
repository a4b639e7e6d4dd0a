"""Tensors on the wire: dtype, shape and raw little-endian bytes (base64 in JSON).

A compact binary encoding instead of JSON lists of floats: exact, about a
third larger than the raw bytes, and checked for size before any array is
made. numpy is imported only where arrays are built, so the wire layer stays
light for the daemon.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from agent.wire.codec import B64Bytes, WireModel

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

DType = Literal["float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool"]

ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float64": 8,
    "float16": 2,
    "int64": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
MAX_RANK = 8
MAX_TENSOR_BYTES = 64 * 1024 * 1024


class Tensor(WireModel):
    """One named tensor: `data` holds prod(shape) items of `dtype`, little-endian, C order."""

    dtype: DType
    shape: tuple[int, ...] = Field(max_length=MAX_RANK)
    data: B64Bytes

    @model_validator(mode="after")
    def _size_matches_shape(self) -> Tensor:
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in shape {list(self.shape)}")
        expected = math.prod(self.shape) * ITEMSIZE[self.dtype]
        if expected > MAX_TENSOR_BYTES:
            raise ValueError(f"tensor of {expected} bytes exceeds {MAX_TENSOR_BYTES}")
        if len(self.data) != expected:
            raise ValueError(
                f"data has {len(self.data)} bytes, shape {list(self.shape)} of {self.dtype} "
                f"needs {expected}"
            )
        return self

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def to_numpy(self) -> npt.NDArray[np.generic]:
        """A read-only array over `data` (no copy)."""
        import numpy as np

        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(
            self.shape
        )

    @classmethod
    def from_numpy(cls, array: npt.NDArray[np.generic]) -> Tensor:
        import numpy as np

        name = str(array.dtype)
        if name not in ITEMSIZE:
            raise ValueError(f"dtype {name} cannot go on the wire; allowed: {sorted(ITEMSIZE)}")
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        return cls(dtype=name, shape=tuple(int(d) for d in array.shape), data=little.tobytes())  # type: ignore[arg-type]
