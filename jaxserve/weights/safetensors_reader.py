"""Read tensors one at a time from single or sharded safetensors files, without torch."""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint is missing something, or holds something we refuse to read."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _check_shard_name(file: object, directory: str) -> None:
    """A shard listed in the index must be a relative path inside the checkpoint directory."""
    if not isinstance(file, str) or not file:
        raise CheckpointError(f"{INDEX_FILE} of {directory} lists a shard that is not a file "
                              f"name: {file!r}")
    parts = file.replace("\\", "/").split("/")
    if os.path.isabs(file) or file.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise CheckpointError(
            f"{INDEX_FILE} of {directory} lists shard {file!r} outside the checkpoint "
            "directory; shards must be relative paths inside it"
        )


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsCheckpoint:
    """Index of the tensors in a directory's safetensors files; reads each on demand."""

    def __init__(self, directory: str):
        self.directory = directory
        self.tensors: dict[str, TensorInfo] = {}
        self._maps: dict[str, mmap.mmap] = {}
        for file in self._shard_files():
            path = os.path.join(directory, file)
            if not os.path.isfile(path):
                raise CheckpointError(f"missing shard {file!r} listed in {INDEX_FILE} of {directory}")
            header, data_start = _read_header(path)
            for name, meta in header.items():
                begin, end = meta["data_offsets"]
                self.tensors[name] = TensorInfo(
                    file, meta["dtype"], tuple(meta["shape"]), data_start + begin, data_start + end
                )

    def _shard_files(self) -> list[str]:
        index = os.path.join(self.directory, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                files = set(json.load(f)["weight_map"].values())
            for file in files:
                _check_shard_name(file, self.directory)
            return sorted(files)
        files = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors"))
        if files:
            return files
        pickled = [f for f in os.listdir(self.directory) if f.endswith((".bin", ".pt", ".pth"))]
        if pickled:
            raise CheckpointError(
                f"{self.directory} holds only pickled weights ({', '.join(sorted(pickled))}); "
                "jaxserve never unpickles checkpoints. Convert them to safetensors first "
                "(e.g. save_pretrained(..., safe_serialization=True))."
            )
        raise CheckpointError(f"no *.safetensors weights in {self.directory}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        """The tensor as a numpy array backed by the file's memory map (no copy yet)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} in {info.file} has unsupported dtype {info.dtype}")
        buf = self._maps.get(info.file)
        if buf is None:
            with open(os.path.join(self.directory, info.file), "rb") as f:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[info.file] = buf
        dtype = np.dtype(_DTYPES[info.dtype])
        count = int(np.prod(info.shape)) if info.shape else 1
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=info.begin)
        return arr.reshape(info.shape)

    def close(self) -> None:
        self._maps.clear()  # the arrays keep their maps alive while referenced
