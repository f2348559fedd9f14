"""The installed version of probekit (a module of its own, so that any module may read it)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("probekit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
