"""Explicit registries for passes and backends, plus plugin loading through entry points.

Built-ins are registered by name in ``passes/__init__.py`` and ``backends/__init__.py``.
Third-party code registers through the entry-point groups ``dmpq_compile.passes`` and
``dmpq_compile.backends`` (each entry point names a class). A plugin that fails to import or
is of the wrong type is reported as :class:`PluginError`, never skipped silently.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger(__name__)

PASS_GROUP = "dmpq_compile.passes"
BACKEND_GROUP = "dmpq_compile.backends"


class PluginError(RuntimeError):
    """A plugin could not be loaded; the message names the entry point and distribution."""


class Registry:
    """name -> class, with entry-point plugins loaded once on first lookup."""

    def __init__(self, what: str, group: str, base_attr: str) -> None:
        self.what, self.group, self.base_attr = what, group, base_attr
        self._items: dict[str, Any] = {}
        self._origin: dict[str, str] = {}
        self._plugins_loaded = False

    def register(self, cls: Any, origin: str = "built-in") -> Any:
        name = getattr(cls, "name", "")
        if not name:
            raise PluginError(f"{self.what} class {cls!r} has no 'name'")
        if name in self._items and self._items[name] is not cls:
            raise PluginError(f"{self.what} {name!r} from {origin} clashes with the one from {self._origin[name]}")
        self._items[name] = cls
        self._origin[name] = origin
        return cls

    def load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            dist = getattr(ep.dist, "name", "?") if ep.dist else "?"
            try:
                cls = ep.load()
            except Exception as e:
                raise PluginError(f"{self.what} plugin {ep.name!r} ({ep.value}, from {dist}) failed to load: "
                                  f"{type(e).__name__}: {e}") from e
            if not hasattr(cls, self.base_attr):
                raise PluginError(f"{self.what} plugin {ep.name!r} ({ep.value}) is not a {self.what} class")
            if getattr(cls, "name", None) != ep.name:
                raise PluginError(f"{self.what} plugin entry point {ep.name!r} points at a class named "
                                  f"{getattr(cls, 'name', None)!r}; the two must agree")
            self.register(cls, origin=f"plugin {dist}")
            log.info("loaded %s plugin %s from %s", self.what, ep.name, dist)

    def get(self, name: str) -> Any:
        self.load_plugins()
        if name not in self._items:
            raise KeyError(f"unknown {self.what} {name!r}; available: {', '.join(sorted(self._items))}")
        return self._items[name]

    def items(self) -> list[tuple[str, Any, str]]:
        self.load_plugins()
        return [(n, self._items[n], self._origin[n]) for n in sorted(self._items)]


PASSES = Registry("pass", PASS_GROUP, "call")
BACKENDS = Registry("backend", BACKEND_GROUP, "emit")
