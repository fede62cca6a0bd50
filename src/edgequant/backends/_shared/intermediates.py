"""Float intermediates (the source as a float GGUF, as a float OpenVINO IR, ...): made once per
source fingerprint, cached, and reused by every precision of that format."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgequant.atomic import atomic_dir
from edgequant.locks import build_once
from edgequant.paths import cache_dir
from edgequant.progress import step


def cached_intermediate(source, kind: str, marker: str, build: Callable[[Path], None], what: str) -> Path:
    """The folder `intermediates/<fingerprint>-<kind>`: when `marker` (a file in it) is missing,
    `build(tmp)` fills a temporary folder that is then renamed into place."""
    folder = cache_dir("intermediates") / f"{source.fingerprint[:16]}-{kind}"

    def build_in_place() -> None:
        with step(f"{what} (cached)"), atomic_dir(folder, replace=True) as tmp:
            build(tmp)

    build_once(folder, folder / marker, what, build_in_place)
    return folder
