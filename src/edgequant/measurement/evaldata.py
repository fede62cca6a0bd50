"""Evaluation and calibration text from installed packages, never from the network.

Default evaluation text: the English Wikipedia prose in gensim's test data, extracted from wiki
markup once and cached as plain text. Default calibration text: gensim's `lee_background.cor`
news prose, kept apart from the evaluation text so calibrated methods are not scored on what
they were tuned on.
"""

from __future__ import annotations

import bz2
import re
from pathlib import Path

from edgequant.atomic import write_text_atomic
from edgequant.errors import EdgequantError
from edgequant.paths import cache_dir

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CALIBRATION_FILE = "lee_background.cor"
_MIN_PARAGRAPH_CHARS = 200  # shorter lines are mostly headings, list stubs or markup leftovers


def gensim_test_data() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise EdgequantError("gensim is not installed; it ships the default evaluation text",
                             "`pip install gensim==4.4.0` (part of the torch extra), or pass --data FILE")
    return Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"


def default_eval_text() -> str:
    cached = cache_dir("data") / "enwiki-prose.txt"
    if not cached.is_file():
        write_text_atomic(cached, _extract_wiki_prose(gensim_test_data() / WIKI_DUMP))
    return cached.read_text()


def default_calibration_text() -> str:
    return (gensim_test_data() / CALIBRATION_FILE).read_text()


def read_text_file(path: str | Path) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise EdgequantError(f"no such text file: {path}", "pass --data with a UTF-8 plain text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgequantError(f"{path} is not UTF-8 text", "convert it to UTF-8 plain text") from None


def _extract_wiki_prose(dump: Path) -> str:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    paragraphs = []
    with bz2.open(dump) as fh:
        for _title, text, _page_id in extract_pages(fh):
            if not text or text.lstrip().upper().startswith("#REDIRECT"):
                continue
            paragraphs.extend(_prose_paragraphs(filter_wiki(text)))
    return "\n\n".join(paragraphs) + "\n"


def _prose_paragraphs(text: str) -> list[str]:
    text = re.sub(r"'{2,}", "", text)  # bold and italic quote marks
    found = []
    for line in text.splitlines():
        line = re.sub(r"\s+", " ", line).strip()
        if len(line) >= _MIN_PARAGRAPH_CHARS and not line.startswith(("|", "{", "!", "=")):
            found.append(line)
    return found
