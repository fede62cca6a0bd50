"""Where edgequant keeps its caches: imported sources, intermediates, tools, eval text."""

import os
from pathlib import Path


def cache_home() -> Path:
    """`$EDGEQUANT_HOME`, else `$XDG_CACHE_HOME/edgequant`, else `~/.cache/edgequant`."""
    explicit = os.environ.get("EDGEQUANT_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "edgequant"


def cache_dir(*parts: str) -> Path:
    path = cache_home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
