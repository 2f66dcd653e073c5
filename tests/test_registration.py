"""Built-in backends and commands that fail to import are reported, never skipped."""

from __future__ import annotations

import pytest

from dmpq_compile import backends, cli
from dmpq_compile.registry import PluginError


def test_a_broken_builtin_backend_is_reported(monkeypatch):
    monkeypatch.setitem(backends.BUILTIN_BACKENDS, "ghost", "dmpq_compile.backends.ghost:GhostBackend")
    with pytest.raises(PluginError, match="built-in backend 'ghost'.*failed to load"):
        backends.available_backends()


def test_a_missing_command_module_is_not_hidden(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "ghost"))
    with pytest.raises(ModuleNotFoundError, match="ghost"):
        cli.build_parser()


def test_builtins_load():
    assert {"ort-cpu", "trt-a100"} <= {name for name, _, _ in backends.available_backends()}
    assert "compile" in cli.build_parser().format_help()
