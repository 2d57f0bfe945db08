"""Source adapters: one public dataset per file, registered by name.

An adapter only finds files and says what they are (a list of `Case`); it never reads voxels. The
phantom suite writes the same official layouts, so these adapters are the only way data comes in.
"""
from __future__ import annotations

from datamodules.sources.base import SOURCES, DataLayoutError, SourceAdapter, get_source, register_source

# Importing the modules fills the registry through their decorators.
from datamodules.sources import covid19_20, ctseg, mosmed  # noqa: E402,F401  isort: skip

__all__ = ["SOURCES", "DataLayoutError", "SourceAdapter", "get_source", "register_source"]
