"""Reading and writing safetensors one tensor at a time.

The ``safetensors`` library saves a whole dictionary of tensors at once and reads through a memory
map, so merging a shard with it holds the whole shard in memory (and counts the mapped file in the
process's RSS). Merging layer by layer only needs the file format, which is simple: an 8-byte
little-endian header length, a JSON header giving each tensor's dtype, shape and byte range, then
the raw little-endian bytes. Here tensors are read with ``readinto`` into a buffer of their own,
and the writer lays out the header from the tensors' specifications first and then streams the
bytes, so peak memory is one tensor, whatever the shard size.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ExportError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

#: A header larger than this is not a safetensors file (the library uses the same bound).
MAX_HEADER = 100 * 1024 * 1024

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships wheels for is little-endian
    raise ImportError("safetensors streaming needs a little-endian machine")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsReader:
    """Random access to the tensors of one ``.safetensors`` file without mapping it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = open(self.path, "rb")
        try:
            raw = self._fh.read(8)
            if len(raw) != 8:
                raise ExportError("not a safetensors file (too short)", where=str(self.path))
            (size,) = struct.unpack("<Q", raw)
            if size > MAX_HEADER:
                raise ExportError("not a safetensors file (header too large)", where=str(self.path))
            header = json.loads(self._fh.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._fh.close()
            raise ExportError("not a safetensors file (unreadable header)", where=str(self.path)) from None
        except BaseException:
            self._fh.close()
            raise
        self.data_start = 8 + size
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict[str, Any]] = header
        for name, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                self._fh.close()
                raise ExportError(f"tensor {name} has an unsupported dtype {entry.get('dtype')!r}", where=str(self.path))

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    def names(self) -> list[str]:
        """Tensor names in file order (by offset), which keeps reads sequential."""
        return sorted(self._entries, key=lambda n: self._entries[n]["data_offsets"][0])

    def spec(self, name: str) -> TensorSpec:
        entry = self._entries[name]
        return TensorSpec(name, DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"]))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def read(self, name: str) -> torch.Tensor:
        spec = self.spec(name)
        begin, end = self._entries[name]["data_offsets"]
        if end - begin != spec.nbytes:
            raise ExportError(f"tensor {name} has a byte range that does not match its shape", where=str(self.path))
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        buf = bytearray(spec.nbytes)
        self._fh.seek(self.data_start + begin)
        got = self._fh.readinto(buf)
        if got != spec.nbytes:
            raise ExportError(f"the file ends inside tensor {name} (truncated download?)", where=str(self.path))
        return torch.frombuffer(buf, dtype=spec.dtype).reshape(spec.shape)


class SafetensorsWriter:
    """Writes a file whose tensors are known up front, one tensor at a time, in the given order."""

    def __init__(self, path: str | Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = list(specs)
        self._next = 0
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for spec in self._specs:
            header[spec.name] = {"dtype": NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"unexpected tensor {name}: all tensors are written")
        spec = self._specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"expected {spec}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        if spec.nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._fh.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.close()
        if self._next != len(self._specs):
            missing = [s.name for s in self._specs[self._next:]]
            raise ValueError(f"{self.path.name}: {len(missing)} tensors were not written ({missing[0]}, ...)")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()
