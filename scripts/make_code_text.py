"""Rebuild the out-of-domain test text ``python/kakeya_py/data/python_stdlib.txt``.

The text is a fixed list of pure-Python modules of CPython 3.11's standard library (PSF
licence), one "article" per module, each introduced by a marker line
``# === module: NAME ===``. It is out of domain for a WikiText-tuned preset (code, not
encyclopaedic prose) and is used only as a *test* text: nothing is chosen on it.

    python3 scripts/make_code_text.py   # needs a CPython 3.11.x standard library

The SHA-256 of the result is pinned in ``kakeya_py.corpus.CODE_TEXT_SHA256``.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path

MODULES = (
    "argparse", "bisect", "calendar", "contextlib", "dataclasses", "difflib", "fractions",
    "functools", "heapq", "shlex", "statistics", "string", "textwrap",
)  # fmt: skip
OUT = Path(__file__).resolve().parents[1] / "python" / "kakeya_py" / "data" / "python_stdlib.txt"


def main() -> int:
    if sys.version_info[:2] != (3, 11):
        print(f"error: needs CPython 3.11's standard library, this is {sys.version.split()[0]}", file=sys.stderr)
        return 2
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in MODULES:
        src = (lib / f"{name}.py").read_text(encoding="utf-8").replace("\r\n", "\n")
        parts.append(f"# === module: {name} ===\n{src.rstrip()}\n")
    OUT.write_text("".join(parts), encoding="utf-8")
    print(f"{OUT}: {OUT.stat().st_size} bytes, sha256 {hashlib.sha256(OUT.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
