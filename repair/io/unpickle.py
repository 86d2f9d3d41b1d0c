"""The restricted unpickler: loads Dassl/CoOp ``torch.save`` checkpoints without running their code.

``torch.load(weights_only=True)`` refuses checkpoints that pickle optimizers, schedulers or
numpy scalars next to the weights, which Dassl-style trainers routinely do. Those files come
here instead: a pure-Python unpickler whose every code-reaching opcode (GLOBAL, REDUCE, NEWOBJ,
INST/OBJ, BUILD) goes through an allow-list. Anything not allow-listed is replaced by an inert
placeholder that holds nothing and refuses to be called, so the weights still load and no
pickled code ever runs. Storage sizes are charged against the file size before torch allocates.
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
import types
from typing import Any, Callable

import torch

class _Refused(Exception):
    """Raised inside unpickling when the pickle asks us to call something not allow-listed."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _Malformed(Exception):
    """Raised inside unpickling for opcode sequences no torch.save ever writes."""


class _Inert:
    """Base of stand-ins for classes we refuse to import; an instance holds only the state its pickle
    gave it (``_state``, as BUILD would have set it: for a ``torch.nn.Module`` its ``__dict__`` with
    ``_parameters``, ``_buffers``, ``_modules`` and plain attributes), never handed to any code."""

    __slots__ = ("_state",)


def inert_state(obj: Any) -> dict[str, Any] | None:
    """The attribute dict a placeholder instance was given by its pickle, or None."""
    state = getattr(obj, "_state", None) if isinstance(obj, _Inert) and not isinstance(obj, type) else None
    if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
        state = state[0]  # (dict state, slot state), as pickle passes it for classes with __slots__
    return state if isinstance(state, dict) else None


class _PlaceholderMeta(type):
    """Calling a placeholder class would mean running its constructor: refuse instead."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _Refused(cls._origin)


def _placeholder(module: str, name: str) -> type:
    namespace = {
        "__slots__": (),
        "_origin": f"{module}.{name}",
        "_data_only": (module, name) in _DATA_ONLY,
    }
    return _PlaceholderMeta("Placeholder", (_Inert,), namespace)


# Constructors of plain numpy data (scalars such as a saved best accuracy, arrays, dtypes):
# a REDUCE on them yields an inert object *without* calling numpy, so such checkpoints
# still load; the values are dropped like any other non-tensor leaf.
_DATA_ONLY = frozenset(
    (package, name)
    for package in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("scalar", "_reconstruct")
) | {("numpy", "dtype"), ("numpy", "ndarray")}


def _describe_callable(obj: Any) -> str:
    if isinstance(obj, _PlaceholderMeta):
        return obj._origin
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return f"an object of type {type(obj).__name__}"


def _inert_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Replaces copyreg._reconstructor: rebuilds placeholder instances without any __init__."""
    if isinstance(cls, _PlaceholderMeta):
        return object.__new__(cls)
    raise _Refused(f"copyreg._reconstructor({_describe_callable(cls)})")


def _empty_bytes(*args: Any) -> bytes:
    """Replaces builtins.bytes, which protocol-2 pickles call with no argument for b''."""
    if args:
        raise _Malformed("unexpected builtins.bytes arguments")
    return b""


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Replaces _codecs.encode, which protocol-2 pickles use to store bytes objects."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise _Malformed("unexpected _codecs.encode arguments")
    return text.encode("latin-1")


_CONTAINER_TYPES: tuple[type, ...] = (
    collections.OrderedDict,
    collections.defaultdict,
    dict,
    list,
    tuple,
    set,
    frozenset,
    slice,
    torch.Size,
)
_PLAIN_ARG_TYPES = frozenset(
    {list, tuple, dict, set, frozenset, str, bytes, int, float, bool, type(None)}
    | {collections.OrderedDict, collections.defaultdict}
)
_TENSOR_REBUILDERS: tuple[Callable[..., Any], ...] = (
    torch._utils._rebuild_tensor,
    torch._utils._rebuild_tensor_v2,
    torch._utils._rebuild_tensor_v3,
    torch._utils._rebuild_parameter,
    torch._utils._rebuild_parameter_with_state,
)


def _check_plain_args(func: Any, args: tuple[Any, ...]) -> None:
    """Container constructors iterate their argument; never let them iterate a tensor."""
    for arg in args:
        if type(arg) in _PLAIN_ARG_TYPES or isinstance(arg, _PlaceholderMeta):
            continue
        if any(arg is cls for cls in _CONTAINER_TYPES):
            continue
        raise _Malformed(
            f"unexpected argument of type {type(arg).__name__} to {_describe_callable(func)}"
        )


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a pickle may name; everything else becomes an inert placeholder."""
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("copyreg", "_reconstructor"): _inert_reconstructor,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): _empty_bytes,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "UntypedStorage"): torch.UntypedStorage,
    }
    for kind in (dict, list, tuple, set, frozenset, slice, complex):
        table[("builtins", kind.__name__)] = kind
    for func in _TENSOR_REBUILDERS:
        table[("torch._utils", func.__name__)] = func
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            table[("torch", name)] = value
    return table


_ALLOWED_GLOBALS = _allowed_globals()
_CALLABLE_IDS = {
    id(obj): obj
    for obj in (
        *_CONTAINER_TYPES,
        *_TENSOR_REBUILDERS,
        torch.device,
        complex,
        _inert_reconstructor,
        _latin1_encode,
        _empty_bytes,
    )
}
_PLAIN_ARG_CALLABLES = (*_CONTAINER_TYPES, torch.device, complex)


def _call_allowed(func: Any, args: Any) -> Any:
    """REDUCE: the one place a pickle can make us call something, so it is gated here."""
    if type(args) is not tuple:
        raise _Malformed("REDUCE arguments are not a tuple")
    if isinstance(func, _PlaceholderMeta):
        if func._data_only:
            return object.__new__(func)
        raise _Refused(func._origin)
    if _CALLABLE_IDS.get(id(func)) is not func:
        if callable(func):
            raise _Refused(_describe_callable(func))
        raise _Malformed(f"REDUCE on a non-callable {type(func).__name__}")
    if any(func is plain for plain in _PLAIN_ARG_CALLABLES):
        _check_plain_args(func, args)
    return func(*args)


def _new_instance(cls: Any, args: Any, kwargs: Any) -> Any:
    """NEWOBJ: cls.__new__ runs no __init__, so placeholders become inert objects."""
    if type(args) is not tuple or type(kwargs) is not dict:
        raise _Malformed("object construction with malformed arguments")
    if isinstance(cls, _PlaceholderMeta):
        return object.__new__(cls)
    if any(cls is kind for kind in _CONTAINER_TYPES) and not kwargs:
        _check_plain_args(cls, args)
        return cls.__new__(cls, *args)
    if callable(cls):
        raise _Refused(_describe_callable(cls))
    raise _Malformed(f"cannot construct an object from {type(cls).__name__}")


def _apply_build(inst: Any, state: Any) -> None:
    """BUILD: a placeholder keeps its state as data (never handed to ``__setstate__``); containers drop it."""
    if isinstance(inst, _Inert) and not isinstance(inst, type):
        if getattr(inst, "_state", None) is None:
            inst._state = state
        return
    if type(inst) in (dict, collections.OrderedDict, collections.defaultdict, list, set):
        return  # e.g. the `_metadata` attribute of a module state_dict: not needed here
    raise _Malformed(f"BUILD on an object of type {type(inst).__name__}")


_DICT_TYPES: tuple[type, ...] = (dict, collections.OrderedDict, collections.defaultdict)


def _is_storage_tag(tag: Any) -> bool:
    return type(tag) in (str, bytes) and tag in ("storage", b"storage")


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Pure-Python unpickler whose every code-reaching opcode goes through an allow-list."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    byte_budget = 0  # set per file: total storage bytes may not exceed the file size

    def __init__(self, file: Any, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._placeholders: dict[tuple[str, str], type] = {}
        self._storage_keys: set[Any] = set()
        self._storage_total = 0
        self._torch_persistent_load: Callable[[Any], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        """Look names up in a fixed table: nothing is ever imported on a pickle's behalf."""
        if self.proto < 3 and self.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[key]
        if key not in self._placeholders:
            self._placeholders[key] = _placeholder(module, name)
        return self._placeholders[key]

    @property
    def persistent_load(self) -> Callable[[Any], Any]:  # type: ignore[override]
        return self._bounded_persistent_load

    @persistent_load.setter
    def persistent_load(self, func: Callable[[Any], Any]) -> None:
        # torch assigns its storage loader here; we wrap it to bound allocations.
        self._torch_persistent_load = func

    def _bounded_persistent_load(self, saved_id: Any) -> Any:
        if self._torch_persistent_load is None:
            raise _Malformed("persistent id outside a torch checkpoint")
        if isinstance(saved_id, tuple) and saved_id and _is_storage_tag(saved_id[0]):
            self._charge_storage(saved_id)
        return self._torch_persistent_load(saved_id)

    def _charge_storage(self, saved_id: tuple[Any, ...]) -> None:
        """A storage cannot be larger than the file holding it; refuse before torch allocates."""
        if len(saved_id) < 5 or type(saved_id[4]) is not int or saved_id[4] < 0:
            raise _Malformed("malformed storage record")
        storage_type, key, numel = saved_id[1], saved_id[2], saved_id[4]
        if storage_type is torch.UntypedStorage:
            dtype = torch.uint8
        else:
            dtype = getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or type(key) not in (str, bytes, int):
            raise _Malformed("storage record without a dtype or key")
        if key in self._storage_keys:
            return
        self._storage_keys.add(key)
        self._storage_total += numel * torch._utils._element_size(dtype)
        if self._storage_total > self.byte_budget:
            raise _Malformed("storages claim more bytes than the file holds")

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = _call_allowed(self.stack[-1], args)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_new_instance(cls, args, {}))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_new_instance(cls, args, kwargs))

    def _load_inst(self) -> None:
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        cls = self.find_class(module, name)
        self.append(_call_allowed(cls, tuple(self.pop_mark())))

    def _load_obj(self) -> None:
        # INST/OBJ mean "call this with these arguments", so they go through the REDUCE gate.
        items = self.pop_mark()
        if not items:
            raise _Malformed("OBJ without a class")
        self.append(_call_allowed(items[0], tuple(items[1:])))

    def _load_build(self) -> None:
        state = self.stack.pop()
        _apply_build(self.stack[-1], state)

    def _target(self, kinds: tuple[type, ...], opcode: str) -> Any:
        """Only real containers get items; inert stand-ins (dict/list subclasses) swallow them."""
        target = self.stack[-1]
        if type(target) in kinds:
            return target
        if isinstance(target, _Inert) and not isinstance(target, type):
            return None
        raise _Malformed(f"{opcode} on an object of type {type(target).__name__}")

    def _load_append(self) -> None:
        value = self.stack.pop()
        target = self._target((list,), "APPEND")
        if target is not None:
            target.append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        target = self._target((list,), "APPENDS")
        if target is not None:
            target.extend(items)

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        target = self._target(_DICT_TYPES, "SETITEM")
        if target is not None:
            target[key] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise _Malformed("SETITEMS with an odd number of items")
        target = self._target(_DICT_TYPES, "SETITEMS")
        for index in range(0, len(items), 2) if target is not None else ():
            target[items[index]] = items[index + 1]

    def _load_additems(self) -> None:
        items = self.pop_mark()
        target = self._target((set,), "ADDITEMS")
        if target is not None:
            target.update(items)

    def _load_unsupported(self) -> None:
        raise _Malformed("out-of-band buffers are not used by torch.save")

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.INST[0]] = _load_inst
    dispatch[pickle.OBJ[0]] = _load_obj
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.APPEND[0]] = _load_append
    dispatch[pickle.APPENDS[0]] = _load_appends
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.BYTEARRAY8[0]] = _load_unsupported
    dispatch[pickle.NEXT_BUFFER[0]] = _load_unsupported
    dispatch[pickle.READONLY_BUFFER[0]] = _load_unsupported


def _restricted_pickle_module(byte_budget: int) -> types.ModuleType:
    """torch.load wants a module with Unpickler/load; give it one bound to this file's size."""
    unpickler = type("Unpickler", (_RestrictedUnpickler,), {"byte_budget": byte_budget})
    module = types.ModuleType("mergetune_restricted_pickle")
    module.Unpickler = unpickler  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]

    def load(file: Any, **kwargs: Any) -> Any:
        return unpickler(file, **kwargs).load()

    module.load = load  # type: ignore[attr-defined]
    return module
