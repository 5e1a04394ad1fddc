"""The plugin guide (docs/plugins.md) and the example distributions it prints (docs/examples/), compared file by file
by the tests so that the two cannot drift apart."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "plugins.md"
EXAMPLES = ROOT / "docs" / "examples"
_SKIPPED = {"__pycache__", "build", "dist", ".pytest_cache"}


def printed_files(marker):
    """{path: text} of the files the guide prints: each code block after a `<!-- MARKER: PATH -->` line (and one line
    of prose), `marker` being "file" (dpnet-swish) or "example file" (dpnet-resmlp)."""
    pattern = rf"<!-- {re.escape(marker)}: (\S+) -->\n[^\n]*\n\n(`{{3,}}|~{{3,}})[^\n]*\n(.*?)\n\2\n"
    return {path: body + "\n" for path, _, body in re.findall(pattern, GUIDE.read_text(), re.S)}


def example_files(example):
    """{path relative to docs/examples: text} of every file of the example distribution folder `example` (built and
    cached files left out)."""
    return {str(p.relative_to(EXAMPLES)): p.read_text() for p in sorted(Path(example).rglob("*"))
            if p.is_file() and not _SKIPPED & set(p.parts) and ".egg-info" not in str(p)}
