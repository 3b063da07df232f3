"""Converted models kept by content hash, so the same network is converted once however often it is timed.

Converting is what costs: ONNX Runtime's INT8 quantization takes 3-6 s for a whole MobileNetV3 and ExecuTorch's
lowering 70-155 s (a single block 3-8 s), while a NetAdapt run times the seed beside every iteration's network
and every chunk of table entries beside the same anchors. A module object is rebuilt between timings (a
table keeps a few, a run rebuilds the seed), so the key is what the module computes, not its identity: the
module's structure (its repr), every parameter and buffer, the input shape, and whatever else the conversion
depends on (precision, calibration inputs, the converter's version).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable, Generic, Iterable, Optional, TypeVar

import numpy as np
from torch import nn

KEPT = 24  # a Large ExecuTorch program is ~22 MB: two dozen stay well under a gigabyte


def module_digest(module: nn.Module, input_shape: tuple[int, ...], *extra: object) -> str:
    """sha256 of what `module` computes on `input_shape` (structure, weights, buffers) and `extra`."""
    h = hashlib.sha256()
    h.update(repr(module).encode())
    h.update(repr(tuple(int(d) for d in input_shape)).encode())
    for name, tensor in list(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(repr(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for item in extra:
        h.update(repr(item).encode())
    return h.hexdigest()


def arrays_digest(arrays: Iterable[np.ndarray]) -> str:
    """sha256 of a sequence of arrays (calibration inputs): the same inputs, the same digest."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(repr((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def bytes_digest(data: bytes, *extra: object) -> str:
    h = hashlib.sha256(data)
    for item in extra:
        h.update(repr(item).encode())
    return h.hexdigest()


T = TypeVar("T")


class ProgramCache(Generic[T]):
    """The last `kept` converted models by key (least recently used goes first); `hits` counts reuses."""

    def __init__(self, kept: int = KEPT) -> None:
        self.kept = kept
        self.hits = 0
        self.converted = 0
        self._items: "OrderedDict[str, T]" = OrderedDict()

    def get(self, key: str, convert: Callable[[], T]) -> T:
        data: Optional[T] = self._items.pop(key, None)
        if data is None:
            data = convert()
            self.converted += 1
        else:
            self.hits += 1
        self._items[key] = data
        while len(self._items) > self.kept:
            self._items.popitem(last=False)
        return data

    def clear(self) -> None:
        self._items.clear()
