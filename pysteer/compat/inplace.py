"""Accelerate a steering library in place: its own calls run through pysteer's hooks and tables.

``pysteer.compat.accelerate("repeng")`` (or the library module itself) replaces, for as long as the
returned handle lives, the few library methods that install steering (repeng
``ControlModel.set_raw_control``, steering-vectors ``SteeringVector.patch_activations``) with versions
that convert the call (``pysteer.compat.<library>``) and steer through ``pysteer.steer``. User code
does not change. The replacement is on the library's classes, because that is where user code
calls them; ``handle.remove()`` (or leaving its ``with`` block) puts the library's own functions
back and hands any steering still live back to the library's own path, so the model computes the
same before, during and after.

Three rules hold for every library:

- a call pysteer cannot express exactly (an operator, layer type, token-index form or
  architecture it has no form for) runs the library's own code, with a one-time warning naming
  the reason; never a different result;
- a strength change writes the steering table in place: the hooks stay, so a model compiled by
  ``torch.compile`` (or ``pysteer.generate``'s decode step) does not recompile;
- the library's classes are checked against the fields and parameters pysteer knows before
  anything is replaced: an unknown one (a newer or older release) is an error naming the field
  and the library version.

The libraries are imported here only when asked for (they pin ``transformers<5`` and live in
their own virtualenvs); ``import pysteer`` never imports them.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import types
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

ADAPTERS = {  # library import name -> the pysteer module that accelerates it (its ``Accelerator``)
    "repeng": "pysteer.compat.repeng",
    "steering_vectors": "pysteer.compat.steering_vectors",
    "pyvene": "pysteer.compat.pyvene",
    "pyreft": "pysteer.compat.pyvene",
}
ALIASES = {"pyreft": "pyvene"}  # pyreft's ReftModel is pyvene's IntervenableModel: accelerating one is both

_WARNED: set[str] = set()
_ACTIVE: dict[str, Acceleration] = {}


class UnknownLibraryVersion(ValueError):
    """The library's classes have a field or parameter pysteer does not know."""


class AccelerationFallback(RuntimeWarning):
    """A library call pysteer cannot express ran through the library's own code."""


def warn_fallback(library: str, reason: str) -> None:
    """Warn once per distinct reason that a call of ``library`` runs on the library's own path."""
    message = f"pysteer.compat.accelerate({library}): using {library}'s own path: {reason}"
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, AccelerationFallback, stacklevel=3)


def library_version(module: types.ModuleType) -> str:
    """The installed distribution's version (``__version__`` where the package sets one)."""
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version(module.__name__.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_fields(library: str, version: str, cls: type, known: Sequence[str]) -> None:
    """Raise ``UnknownLibraryVersion`` unless ``cls`` is a dataclass whose fields are exactly ``known``."""
    if not dataclasses.is_dataclass(cls):
        raise UnknownLibraryVersion(
            f"pysteer.compat.accelerate: {library} {version}: {cls.__name__} is not a dataclass "
            f"(pysteer knows it as one with fields {', '.join(known)})"
        )
    _check_names(library, version, f"{cls.__name__} field", [f.name for f in dataclasses.fields(cls)], known)


def check_parameters(library: str, version: str, function, known: Sequence[str]) -> None:
    """Raise ``UnknownLibraryVersion`` unless ``function``'s parameters are exactly ``known``."""
    names = list(inspect.signature(function).parameters)
    _check_names(library, version, f"{function.__qualname__} parameter", names, known)


def _check_names(library: str, version: str, what: str, names: Iterable[str], known: Sequence[str]) -> None:
    names = list(names)
    for name in names:
        if name not in known:
            raise UnknownLibraryVersion(
                f"pysteer.compat.accelerate: {library} {version}: {what} {name!r} is unknown to pysteer "
                f"(it knows {', '.join(known)}); its meaning cannot be converted, so nothing was accelerated"
            )
    for name in known:
        if name not in names:
            raise UnknownLibraryVersion(
                f"pysteer.compat.accelerate: {library} {version}: {what} {name!r} is missing "
                f"(pysteer expects {', '.join(known)}); nothing was accelerated"
            )


@dataclass
class Replacement:
    """``owner.name = function`` while accelerated; the original is kept to call and to restore."""

    owner: type
    name: str
    function: object
    original: object = None


class Acceleration:
    """A library accelerated in place; a context manager, or call ``remove()``.

    Attributes:
        library: the library's import name (``"repeng"``, ``"steering_vectors"``).
        version: its installed version.
        accelerator: the library's adapter (``pysteer.compat.<library>.Accelerator``): what it
            replaced and the steering it holds.
    """

    def __init__(self, library: str, version: str, accelerator, replacements: list[Replacement]):
        self.library = library
        self.version = version
        self.accelerator = accelerator
        self.replacements = replacements
        self.removed = False

    def _install(self) -> None:
        for r in self.replacements:
            r.original = r.owner.__dict__[r.name]
            setattr(r.owner, r.name, r.function)

    @contextmanager
    def paused(self) -> Iterator[Acceleration]:
        """Inside the block the library's calls run its own code; steering pysteer already holds
        stays where it is (to compare both paths in one process, on two models)."""
        self._require_live("paused")
        for r in self.replacements:
            setattr(r.owner, r.name, r.original)
        try:
            yield self
        finally:
            for r in self.replacements:
                setattr(r.owner, r.name, r.function)

    def _require_live(self, what: str) -> None:
        if self.removed:
            raise RuntimeError(f"Acceleration.{what}: the acceleration of {self.library} was removed")

    def remove(self) -> None:
        """Hand live steering back to the library's own path and restore its functions."""
        if self.removed:
            return
        try:
            self.accelerator.release()
        finally:
            for r in reversed(self.replacements):
                setattr(r.owner, r.name, r.original)
            self.removed = True
            _ACTIVE.pop(self.library, None)

    def __enter__(self) -> Acceleration:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"Acceleration({self.library} {self.version}, {state})"


def _library_module(lib) -> types.ModuleType:
    if isinstance(lib, types.ModuleType):
        return lib
    if isinstance(lib, str):
        name = lib.replace("-", "_")
        if name not in ADAPTERS:
            raise ValueError(
                f"pysteer.compat.accelerate: no in-place accelerator for {lib!r}; known: {', '.join(ADAPTERS)}"
            )
        return importlib.import_module(name)
    raise TypeError(
        f"pysteer.compat.accelerate: expected a library module or its name, got {type(lib).__name__}"
    )


def accelerate(lib) -> Acceleration:
    """Make ``lib``'s own steering calls run through pysteer, unchanged user code and all.

    Args:
        lib: the library module (``import repeng; accelerate(repeng)``) or its name
            (``"repeng"``, ``"steering_vectors"`` / ``"steering-vectors"``, ``"pyvene"``, ``"pyreft"``).

    Returns:
        An ``Acceleration``; use it as a context manager or call ``remove()``.

    Raises:
        ValueError: a library pysteer has no accelerator for, or one already accelerated.
        UnknownLibraryVersion: the library's classes have a field or parameter pysteer does not
            know (raised before anything is replaced).
    """
    module = _library_module(lib)
    name = module.__name__.split(".")[0]
    if name in ALIASES:
        name = ALIASES[name]
        module = importlib.import_module(name)
    if name not in ADAPTERS:
        raise ValueError(
            f"pysteer.compat.accelerate: no in-place accelerator for {name!r}; known: {', '.join(ADAPTERS)}"
        )
    if name in _ACTIVE:
        raise ValueError(
            f"pysteer.compat.accelerate: {name} is already accelerated ({_ACTIVE[name]!r}); remove that first"
        )
    version = library_version(module)
    accelerator = importlib.import_module(ADAPTERS[name]).Accelerator(module, version)  # checks fields first
    handle = Acceleration(name, version, accelerator, accelerator.replacements())
    handle._install()
    accelerator.originals = {r.name: r.original for r in handle.replacements}
    _ACTIVE[name] = handle
    return handle


class SteeringPool:
    """pysteer handles an accelerator keeps on models, one per set of sites, reused across calls.

    A library re-registers its hooks at every strength change; here a released handle parks at the
    identity (``x * 1 + 0``: its hooks stay, its table rows hold no steering) and the next call
    steering the same sites of the same model writes its values into that handle's rows, in place.
    The hook set a compiled graph guards on never changes, so it never recompiles.
    """

    def __init__(self) -> None:
        self._parked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {sites: [handle]}
        self._handles: list = []

    def acquire(self, model, interventions: list):
        """A dynamic handle steering ``interventions`` on ``model``: a parked one with the same
        sites rewritten in place, else a new one."""
        from ..steering import steer

        key = tuple(sorted(iv.site_name for iv in interventions))
        parked = self._parked.setdefault(model, {}).get(key)
        if parked:
            handle = parked.pop()
            handle.update(interventions)
            return handle
        handle = steer(model, interventions, mode="dynamic")
        self._handles.append(handle)
        return handle

    def park(self, handle) -> None:
        """Release ``handle``: identity rows, hooks kept, ready for the next call on its sites."""
        if handle.removed:
            return
        ivs = handle.configs[handle.config_names[0]]
        handle.update(identity_of(ivs))
        model = handle.model_ref()
        if model is not None:
            key = tuple(sorted(iv.site_name for iv in ivs))
            self._parked.setdefault(model, {}).setdefault(key, []).append(handle)

    def clear(self) -> None:
        """Remove every handle of the pool from its model (bit-exact unsteered again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._parked = weakref.WeakKeyDictionary()


def identity_of(interventions: list) -> list:
    """``VectorAdd`` interventions at the same sites adding nothing (``x * 1 + 0``): a parked handle's rows."""
    from ..interventions import VectorAdd

    return [
        VectorAdd(iv.site_name, torch.zeros_like(torch.as_tensor(iv.vector)), alpha=0.0)
        for iv in interventions
    ]
