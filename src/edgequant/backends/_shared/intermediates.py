"""Float intermediates (the source as a float GGUF, as a float OpenVINO IR, ...): made once per
source fingerprint, cached, and reused by every precision of that format."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgequant.atomic import atomic_dir
from edgequant.locks import building
from edgequant.paths import cache_dir
from edgequant.progress import step


def cached_intermediate(source, kind: str, marker: str, build: Callable[[Path], None], what: str) -> Path:
    """The folder `intermediates/<fingerprint>-<kind>`: when `marker` (a file in it) is missing,
    `build(tmp)` fills a temporary folder that is then renamed into place."""
    folder = cache_dir("intermediates") / f"{source.fingerprint[:16]}-{kind}"
    if (folder / marker).is_file():
        return folder
    with building(folder, what):
        if not (folder / marker).is_file():  # another process may have built it while this one waited
            with step(f"{what} (cached)"), atomic_dir(folder, replace=True) as tmp:
                build(tmp)
    return folder
