"""Plugins: modules outside probekit that register components (a probe kind, an exit policy, a
fine-tuning variant, a suite step...) in probekit's registries, each in one place.

A plugin is loaded, before the CLI builds its options, from the ``PROBEKIT_PLUGINS`` environment
variable (comma-separated module names), from the ``probekit.plugins`` entry-point group of
installed packages, or from a suite file's ``plugins = [...]`` key. Loading is importing the
module: its registrations are its import-time effect, by design.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from importlib.metadata import entry_points

from probekit.errors import ParamError

ENV = "PROBEKIT_PLUGINS"
GROUP = "probekit.plugins"
_loaded: set[str] = set()


def load_plugins(modules: Iterable[str] | None = None) -> list[str]:
    """Import ``modules`` (default: those named by ``$PROBEKIT_PLUGINS`` and the entry points); each once."""
    if modules is None:
        names = [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]
        names += [ep.value for ep in entry_points(group=GROUP)]
    else:
        names = list(modules)
    for name in names:
        if name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ParamError("plugins", f"cannot import plugin module {name!r}: {e}") from None
        _loaded.add(name)
    return names
