"""Reading checkpoints from the internet without running anything they contain, and strict loading.

A torch checkpoint is a pickle, and unpickling may call any function the file names (os.system, eval, ...).
`load_checkpoint(path)` reads one in at most two passes, neither of which can run code from the file:

  1. torch.load(weights_only=True): tensors and plain containers only, through torch's own restricted
     unpickler.
  2. If that fails, the globals (classes and functions) the pickle names are listed without running
     anything (torch.serialization.get_unsafe_globals_in_checkpoint reads the opcodes). Each must be a key
     of `allow`, a map from a global's name to an inert stand-in; any other global is refused with an
     error naming it and the file. Then torch's restricted unpickler reads the file again, admitting the
     stand-ins under those names (torch.serialization.safe_globals) and nothing else.

The default `allow`, INERT_GLOBALS, admits what the released checkpoints this project reads hold besides
tensors:
  - omegaconf containers, e.g. the Hydra config that Lightning's save_hyperparameters pickles into DRAKES's
    pretrained.ckpt: DictConfig, ListConfig, their metadata and their value nodes become `Pickled`
    stand-ins, and `to_plain` turns them into dicts and lists. omegaconf need not be installed.
  - the names such a pickle uses as data: the types dict, list, int, float, str and bool (protocol 2
    writes __builtin__.dict, __builtin__.long, ...; torch maps them to builtins.*), typing.Any, and
    collections.defaultdict, read as a plain dict (torch's unpickler fills plain dicts only).
  - numpy arrays and scalars: gReLU >= 1.0.5 keeps its validation metrics as arrays in 'performance'.

`load_strict(module, state, source)` loads a state dict into a module after checking every key, shape and
dtype kind (nothing missing, nothing left over), listing the problems in one error.
"""
from __future__ import annotations

import os
import typing
import zipfile
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

try:
    from numpy._core import multiarray as _multiarray  # numpy >= 2
except ImportError:
    from numpy.core import multiarray as _multiarray  # numpy 1.x


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of the expected kind; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle names a global outside the admitted ones: refused, nothing was run."""


class Pickled:
    """An inert stand-in for an object of a class that a pickle names. It keeps the constructor arguments
    (of the NEWOBJ and REDUCE opcodes) and the state (of BUILD) as plain data, and runs nothing."""

    name = "?"  # the global this class stands for, 'module.qualname'

    def __new__(cls, *args: Any) -> "Pickled":
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any) -> None:
        pass  # REDUCE calls cls(*args): __new__ has kept them

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.name}>"


def stand_in(name: str) -> type:
    """A new `Pickled` subclass standing for the global `name` ('module.qualname')."""
    return type(name.rsplit(".", 1)[-1], (Pickled,), {"name": name, "__module__": __name__})


def _plain_dict(*args: Any) -> dict:
    """collections.defaultdict(factory), read as a plain dict: its factory is a callable, not data."""
    return {}


# omegaconf 2.x: its containers, their metadata, and the nodes that hold plain values (EnumNode and PathNode
# would bring an Enum class or pathlib along, and are not admitted)
OMEGACONF_CONTAINERS = ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig")
OMEGACONF_NODES = tuple(f"omegaconf.nodes.{kind}Node"
                        for kind in ("Any", "String", "Integer", "Float", "Boolean", "Bytes"))
OMEGACONF_METADATA = ("omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata")
OMEGACONF_GLOBALS: dict[str, Any] = {
    name: stand_in(name) for name in OMEGACONF_CONTAINERS + OMEGACONF_NODES + OMEGACONF_METADATA
}

NUMPY_GLOBALS: dict[str, Any] = {
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    "numpy._core.multiarray._reconstruct": _multiarray._reconstruct,
    "numpy._core.multiarray.scalar": _multiarray.scalar,
    "numpy.core.multiarray._reconstruct": _multiarray._reconstruct,  # the same, as numpy 1.x names them
    "numpy.core.multiarray.scalar": _multiarray.scalar,
    # BUILD restores a dtype's state only for an admitted type, and each dtype has its own class (numpy 2)
    **{f"numpy.dtypes.{name}": getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")},
}

INERT_GLOBALS: dict[str, Any] = {
    **OMEGACONF_GLOBALS,
    **NUMPY_GLOBALS,
    **{f"builtins.{t.__name__}": t for t in (dict, list, int, float, str, bool)},
    "typing.Any": typing.Any,
    "collections.defaultdict": _plain_dict,
}


def _reason(err: BaseException) -> str:
    """The informative line of a torch.load error (the rest of torch's weights_only message advises
    trusting the file, which is not ours to advise)."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1].strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def load_checkpoint(path: str | os.PathLike, allow: Optional[Mapping[str, Any]] = None,
                    mmap: bool = False) -> dict:
    """Read the torch checkpoint at `path`, tensors on the CPU, without running any code it contains.

    allow: global name -> inert stand-in, admitted in the second pass (default INERT_GLOBALS); a pickle
    that names any other global is refused (UnsafeCheckpointError). A missing file raises
    FileNotFoundError; a truncated, corrupt or non-torch file, or one whose top level is not a dict,
    CheckpointError. mmap: map a zip-format file's tensors instead of reading them, so that what is never
    used (optimizer states, an EMA) is never read; they stay backed by the file, so copy what you keep
    (load_strict does) before the file can be overwritten."""
    allow = INERT_GLOBALS if allow is None else allow
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    mmap = mmap and zipfile.is_zipfile(path)  # torch.save's format since torch 1.6: the legacy one cannot
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as first:
        try:
            named = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # reads opcodes, runs nothing
        except Exception as err:
            raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated, corrupt, or not "
                                  f"written by torch.save): {_reason(first)}") from err
        refused = sorted(name for name in named if name not in allow)
        if refused:
            raise UnsafeCheckpointError(
                f"{path}: refused, nothing was run: its pickle names {', '.join(refused)}, which could run "
                "code; admitted are tensors, plain containers and the inert names of safe_load.INERT_GLOBALS"
            ) from None
        if not named:  # the first pass failed for another reason than a global
            raise CheckpointError(f"{path}: cannot be read: {_reason(first)}") from first
        try:
            with torch.serialization.safe_globals([(obj, name) for name, obj in allow.items()]):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as err:
            raise CheckpointError(f"{path}: cannot be read with stand-ins for {', '.join(sorted(named))}: "
                                  f"{_reason(err)}") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict at the top level, found {type(obj).__name__}")
    return obj


def to_plain(obj: Any, _open: Optional[set[int]] = None) -> Any:
    """`obj` with omegaconf stand-ins replaced by what they hold: a DictConfig by a dict, a ListConfig by a
    list, a value node by its value (interpolations such as '${eval:...}' stay unresolved strings).
    Mappings, lists and tuples are converted recursively; anything else is returned as it is."""
    _open = set() if _open is None else _open  # the containers being converted: a cycle is an error
    if isinstance(obj, Pickled):
        state = obj.state if isinstance(obj.state, Mapping) else {}
        if obj.name in OMEGACONF_NODES:
            return state.get("_val")
        if obj.name not in OMEGACONF_CONTAINERS:
            return obj
        obj = state.get("_content")  # a dict or a list; or None, '???' (missing) or '${...}'
    if not isinstance(obj, (Mapping, list, tuple)):
        return obj
    if id(obj) in _open:
        raise CheckpointError("the pickled config contains itself")
    _open.add(id(obj))
    if isinstance(obj, Mapping):
        out = {key: to_plain(value, _open) for key, value in obj.items()}
    else:
        out = type(obj)(to_plain(value, _open) for value in obj)
    _open.discard(id(obj))
    return out


def load_strict(module: nn.Module, state: Mapping[str, Any], source: str) -> nn.Module:
    """Load `state` into `module`, cast to the module's dtypes. Every key of module.state_dict() must be
    present, a tensor of its exact shape and of the same kind (floating or not), and no other key; the
    problems (the first 12) are listed in one CheckpointError naming `source`, before anything is loaded.
    The module may be built on the meta device (no memory, no initialisation); either way it gets copies,
    never the tensors of `state` themselves (which may be file-backed, or another module's)."""
    want = module.state_dict()
    problems = [f"missing key '{key}' (shape {list(ref.shape)})" for key, ref in want.items()
                if key not in state]
    problems += [f"unexpected key '{key}'" for key in state if key not in want]
    for key, ref in want.items():
        t = state.get(key)
        if t is None:
            continue
        if not isinstance(t, Tensor):
            problems.append(f"'{key}' is a {type(t).__name__}, expected a tensor")
        elif t.is_floating_point() != ref.is_floating_point():
            problems.append(f"'{key}' is {t.dtype}, expected {ref.dtype}")
        elif t.shape != ref.shape:
            problems.append(f"'{key}': expected shape {list(ref.shape)}, found {list(t.shape)}")
    if problems:
        more = [f"... and {len(problems) - 12} more"] if len(problems) > 12 else []
        listing = "\n  ".join(problems[:12] + more)
        raise CheckpointError(f"{source}: does not match {type(module).__name__}:\n  {listing}")
    owned = {key: state[key].to(ref.dtype, copy=True) for key, ref in want.items()}
    module.load_state_dict(owned, strict=True, assign=any(t.is_meta for t in want.values()))
    return module
