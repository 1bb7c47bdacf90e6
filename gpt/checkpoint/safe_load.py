"""Reading a checkpoint without running code from it. A pickle names functions that unpickling calls, so a crafted
checkpoint is a program: each rank's own file and each file of DeepSpeed's engine checkpoint load with
torch.load(weights_only=True) (allowing only the numpy types of the RNG state, and the few DeepSpeed classes its
optimizer state holds), DCP's `.metadata`, which DCP reads with a plain pickle.load, through an unpickler that
allows only the classes DCP's metadata is made of, and the non-tensor items of DCP's shards (the optimizer's param
groups), which DCP's default planner loads with weights_only=False, through a planner that loads them as data. A
folder someone else owns is warned about before it is read."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import pwd
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from gpt.errors import UserError

log = logging.getLogger(__name__)

# numpy's RNG state (np.random.get_state()): a uint32 array
RANK_STATE_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]

# What DCP's metadata is made of: its own dataclasses and enums, and a few torch and standard types.
METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"), ("builtins", "set"),
                    ("builtins", "frozenset")}


# What DeepSpeed's ZeRO optimizer state pickles besides tensors and containers (module, class; imported when used)
DEEPSPEED_GLOBALS = (("deepspeed.utils.tensor_fragment", "fragment_address"),
                     ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                     ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                     ("deepspeed.runtime.zero.config", "ZeroStageEnum"))


class Refused(UserError, pickle.UnpicklingError):
    """A pickle that names a global a checkpoint has no use for."""


def load_rank_state(path: Path) -> dict[str, Any]:
    """A rank's own file (RNG streams, data position, grad scaler), loaded as data only."""
    return _load_data(path, RANK_STATE_GLOBALS, "a rank's state")


def _deepspeed_globals() -> list[Any]:
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_GLOBALS]


def load_deepspeed_file(path: str | Path, map_location: Any = None) -> Any:
    """One file of DeepSpeed's engine checkpoint, loaded as data only: the engine's checkpoint_engine.load."""
    return _load_data(Path(path), _deepspeed_globals(), "a DeepSpeed checkpoint", map_location)


@contextlib.contextmanager
def deepspeed_files_as_data(folder: Path) -> Iterator[None]:
    """Every torch.load inside, loading data only, as load_deepspeed_file does: for DeepSpeed's own readers
    (zero_to_fp32), which call torch.load(weights_only=False); torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides
    that, per call. A refused file raises Refused, naming `folder`."""
    with mock.patch.dict(os.environ, {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}), \
            torch.serialization.safe_globals(_deepspeed_globals()):
        try:
            yield
        except pickle.UnpicklingError as e:
            raise refusal(folder, "a DeepSpeed checkpoint", e) from None


def _load_data(path: Path, allowed: list[Any], holder: str, map_location: Any = None) -> Any:
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise refusal(path, holder, e) from None


def refusal(path: Path, holder: str, error: pickle.UnpicklingError) -> Refused:
    """torch.load(weights_only=True)'s refusal in one line that names the file and the global."""
    named = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", str(error))
    return Refused(f"{path} names {named.group(1) if named else 'a global'}, which {holder} does not hold: refused, "
                   "unpickling it could run code")


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name) if self.allowed(module, name) else None
        if found is None:
            raise Refused(f"{module}.{name} is not part of a checkpoint's metadata: refused, unpickling it could "
                          "run code")
        return found

    @staticmethod
    def allowed(module: str, name: str) -> bool:
        if (module, name) in METADATA_GLOBALS:
            return True
        if module in METADATA_MODULES:  # a class defined there (a dataclass or an enum), nothing else
            value = getattr(__import__(module, fromlist=[name]), name, None)
            return isinstance(value, type) and value.__module__ == module
        # torch.float32, torch.strided, torch.contiguous_format: values, not callables
        return module == "torch" and isinstance(getattr(torch, name, None),
                                                (torch.dtype, torch.layout, torch.memory_format))


class SafeReader(FileSystemReader):
    """DCP's file reader, whose metadata is read with MetadataUnpickler instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
            metadata = MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, Metadata):
            raise Refused(f"{self.path}: .metadata holds a {type(metadata).__name__}, not DCP's Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, whose non-tensor items (floats, tuples, bools of the optimizer's param groups) load with
    weights_only=True: DefaultLoadPlanner.load_bytes unpickles them with weights_only=False."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            item = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            shard = self.metadata.storage_data[read_item.storage_index].relative_path  # set up before any read
            raise refusal(self.folder / shard, f"DCP's item {read_item.dest_index.fqn}", e) from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner places it
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], item)
        else:
            self.state_dict[read_item.dest_index.fqn] = item


def load_dcp(state: dict[str, Any], folder: Path) -> None:
    """dcp.load, with the metadata and every non-tensor item read as data. A crafted item raises Refused: DCP
    gathers what each rank raised into one CheckpointException, whose refusal is taken out of it."""
    try:
        dcp.load(state, storage_reader=SafeReader(folder), planner=SafePlanner(folder))
    except CheckpointException as e:
        refused = next((error for error, _ in e.failures.values() if isinstance(error, Refused)), None)
        if refused is None:
            raise
        raise Refused(f"checkpoint {folder}: {refused}") from None


def saved_keys(folder: Path) -> set[str]:
    """The names DCP's metadata in `folder` lists (`model.wte.weight`, ...), read as data."""
    return set(SafeReader(folder).read_metadata().state_dict_metadata)


def check_metadata(folder: Path) -> None:
    """Read `folder`'s DCP metadata as data before DCP does (its own error would be a wall of every rank's
    traceback); a crafted one raises Refused, naming the file."""
    try:
        SafeReader(folder).read_metadata()
    except Refused as e:
        raise Refused(f"checkpoint {folder}: {folder / '.metadata'} names {e}") from None


def warn_if_foreign(path: Path) -> None:
    """Warn when a checkpoint this process is told to read (resume=PATH, gpt.generate PATH) is owned by another
    user."""
    try:
        owner = path.stat().st_uid
    except OSError:
        return
    if owner != os.getuid():
        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = f"uid {owner}"
        log.warning("checkpoint %s belongs to %s, not to you: it loads as data only, but check that it is the one "
                    "you mean to trust", path, name)
