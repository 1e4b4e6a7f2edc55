"""Small explicit registries for the pluggable concepts (strategies, client trainers).

A scenario names a plug-in either by a registered name (``"fedavg"``) or by an import path
(``"mypkg.module:MyStrategy"``) or a file path (``"scripts/my_strategy.py:MyStrategy"``).
Unknown names raise :class:`KeyError` subclasses listing the known ones.

Typed parameters. A plug-in class may declare its parameters as a frozen dataclass in a class
attribute ``Params`` (fields in snake_case with type annotations and defaults, value checks in
``__post_init__`` raising ``ValueError`` that starts with the kebab-case key); an
:class:`OpenParams` subclass also takes the options of a part it chooses (a DP strategy's
mechanism). The scenario
loader then maps the section's kebab-case keys onto those fields, checks each value's type
against the annotation and builds ``Params`` (its checks run), all before the run starts; see
:func:`params_class`, :func:`parameter_names` and :func:`resolve_params`. Either way the plug-in
is constructed with the section's parameters as keyword arguments (``cls(**params)``; a trainer
``cls(model, **params)``). A class without ``Params`` is checked against its constructor's
signature instead.

The core package never imports ``strategies/`` or ``clients/`` at module level: the built-in
plug-ins register themselves when their package is imported, and a registry imports that package
lazily, by name, the first time it is asked for something (plug-in discovery, not a layering
violation: the core depends only on the ``Strategy`` / ``ClientTrainer`` contracts).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")
P = TypeVar("P")
OP = TypeVar("OP", bound="OpenParams")


class UnknownPluginError(KeyError):
    """A name that is neither registered nor a loadable import path."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> class registry with lazy discovery of the built-in plug-in package.

    Parameters
    ----------
    kind:
        What is registered, for error messages (``"strategy"``).
    builtin_package:
        Package imported on first lookup so that its ``register(...)`` calls run.
    """

    def __init__(self, kind: str, builtin_package: str | None = None) -> None:
        self.kind = kind
        self._builtin_package = builtin_package
        self._items: dict[str, T] = {}
        self._discovered = False

    def _discover(self) -> None:
        if not self._discovered and self._builtin_package is not None:
            self._discovered = True
            importlib.import_module(self._builtin_package)

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def _add(item: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not item:
                raise ValueError(f"{self.kind} {name!r} is already registered to {existing!r}")
            self._items[name] = item
            return item

        if obj is None:
            return _add
        return _add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plug-in registered for a session or a test); unknown names are ignored."""
        self._items.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._discover()
        return sorted(self._items)

    def get(self, name: str, *, base_dir: Path | None = None) -> T:
        """Resolve a registered name, ``module:attr`` import path, or ``file.py:attr`` path."""
        self._discover()
        if name in self._items:
            return self._items[name]
        if ":" in name:
            return _load_path(name, self.kind, base_dir)
        from fedsim.errors import closest_match

        known = ", ".join(self.names()) or "(none)"
        guess = closest_match(name, self.names())
        hint = f" (did you mean {guess!r}?)" if guess is not None else ""
        raise UnknownPluginError(
            f"unknown {self.kind} {name!r}{hint}; known: {known}, or an import path 'package.module:Class'"
        )


@dataclasses.dataclass(frozen=True)
class OpenParams:
    """Typed parameters that also take the options of a part that one of them chooses.

    A DP strategy's ``Params`` names its mechanism (``mechanism = "blt"``) and takes that
    mechanism's options as keys of the same section (``buffers = 3``) without listing them: keys
    that are not fields are collected into :attr:`options`, :meth:`option_hints` gives the keys
    (and their annotated types) it may take, and the subclass checks them in ``__post_init__``
    (an option of another choice left at its default is allowed; see
    :mod:`fedsim.privacy.mechanisms`). Build one from flat keywords with :meth:`from_keywords`
    (:func:`resolve_params` does).
    """

    options: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    @classmethod
    def option_hints(cls, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``{key: annotated type}`` of the options these parameters may take (every choice's, and
        that of the choice ``values`` make, when given)."""
        return {}

    @classmethod
    def field_names(cls) -> set[str]:
        """The parameters that are fields (``options`` itself is not a key)."""
        return {f.name for f in dataclasses.fields(cls) if f.init and f.name != "options"}

    @classmethod
    def from_keywords(cls: type[OP], kwargs: Mapping[str, Any]) -> OP:
        """The fields from ``kwargs``' field names, the rest as :attr:`options`."""
        if "options" in kwargs:
            raise TypeError(f"{cls.__name__}: give the options as keywords, not as 'options'")
        names = cls.field_names()  # type: ignore[attr-defined]
        own = {k: v for k, v in kwargs.items() if k in names}
        extra = {k: v for k, v in kwargs.items() if k not in names}
        return cls(**own, options=extra)



def params_class(plugin: Any) -> type | None:
    """The plug-in's typed parameters: its ``Params`` attribute when that is a dataclass, else ``None``."""
    params = getattr(plugin, "Params", None)
    if isinstance(params, type) and dataclasses.is_dataclass(params):
        return params
    return None


def parameter_names(plugin: Any, skip: tuple[str, ...] = ("self",)) -> set[str] | None:
    """The snake_case parameter names a plug-in class accepts; ``None`` when it takes any keyword.

    With a ``Params`` dataclass: its fields (and, for :class:`OpenParams`, every option it may
    take). Without: the constructor's parameters other than
    ``skip`` (a trainer's ``model`` too), ``None`` if it has ``**kwargs``.
    """
    typed = params_class(plugin)
    if typed is not None and issubclass(typed, OpenParams):
        return typed.field_names() | set(typed.option_hints())
    if typed is not None:
        return {f.name for f in dataclasses.fields(typed)}
    sig = inspect.signature(plugin.__init__)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if n not in skip and p.kind is not inspect.Parameter.VAR_POSITIONAL}


def resolve_params(params_cls: type[P], params: P | None, kwargs: Mapping[str, Any]) -> P:
    """A plug-in constructor's parameters: ``params`` as given, or ``params_cls(**kwargs)``.

    For constructors ``__init__(self, params=None, /, **kwargs)`` that accept either a ready
    ``Params`` object or its fields as keyword arguments (the scenario's way), not both.
    """
    if params is None:
        if isinstance(params_cls, type) and issubclass(params_cls, OpenParams):
            return params_cls.from_keywords(kwargs)  # type: ignore[return-value]
        return params_cls(**kwargs)
    if kwargs:
        raise TypeError(f"give a {params_cls.__name__} or keyword arguments, not both")
    if not isinstance(params, params_cls):
        raise TypeError(f"expected {params_cls.__name__}, got {type(params).__name__}")
    return params


def _load_path(spec: str, kind: str, base_dir: Path | None) -> object:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UnknownPluginError(f"{kind} {spec!r} is not of the form 'package.module:Class'")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
                path = base_dir / path  # relative to the scenario file first, then the cwd
            if not path.exists():
                raise UnknownPluginError(f"{kind} file {target!r} does not exist")
            mod_name = f"_fedsim_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(mod_name)
            if module is None:
                file_spec = importlib.util.spec_from_file_location(mod_name, path)
                assert file_spec is not None and file_spec.loader is not None
                module = importlib.util.module_from_spec(file_spec)
                sys.modules[mod_name] = module
                file_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as exc:
        raise UnknownPluginError(f"cannot import {kind} module {target!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UnknownPluginError(f"{kind} module {target!r} has no attribute {attr!r}") from None
