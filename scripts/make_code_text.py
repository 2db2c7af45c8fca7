"""Rebuild the out-of-domain code texts under ``python/kakeya_py/data/``.

Each text is a fixed list of pure-Python modules of CPython 3.11's standard library (PSF
licence), one "article" per module, each introduced by a marker line
``# === module: NAME ===``. They are out of domain for a WikiText-tuned preset (code, not
encyclopaedic prose). Two disjoint module lists make two parts:

- ``python_stdlib.txt``: the *test* part (headline numbers only; nothing is chosen on it);
- ``python_stdlib_validation.txt``: the *validation* part (choices that must hold under the
  domain shift are made on it).

    python3 scripts/make_code_text.py   # needs a CPython 3.11.x standard library

The SHA-256 of each result is pinned in ``kakeya_py.eval.corpus.CODE_TEXTS``.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "python" / "kakeya_py" / "data"
TEXTS = {
    "python_stdlib.txt": (
        "argparse", "bisect", "calendar", "contextlib", "dataclasses", "difflib", "fractions",
        "functools", "heapq", "shlex", "statistics", "string", "textwrap",
    ),
    "python_stdlib_validation.txt": (
        "ast", "base64", "configparser", "copy", "csv", "enum", "graphlib", "ipaddress",
        "pprint", "queue", "random", "tempfile", "uuid",
    ),
}  # fmt: skip


def main() -> int:
    if sys.version_info[:2] != (3, 11):
        print(f"error: needs CPython 3.11's standard library, this is {sys.version.split()[0]}", file=sys.stderr)
        return 2
    lib = Path(sysconfig.get_paths()["stdlib"])
    for file, modules in TEXTS.items():
        parts = []
        for name in modules:
            src = (lib / f"{name}.py").read_text(encoding="utf-8").replace("\r\n", "\n")
            parts.append(f"# === module: {name} ===\n{src.rstrip()}\n")
        out = DATA / file
        out.write_text("".join(parts), encoding="utf-8")
        print(f"{out}: {out.stat().st_size} bytes, sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
