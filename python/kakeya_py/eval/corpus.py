"""Text for fitting, choosing and reporting: WikiText-2 in three fixed parts, and code.

The main corpus is the raw WikiText-2 test split (``wiki.test.raw``, SHA-256 checked). An
article starts at a line `` = Title = `` (one ``=`` on each side); the file holds 62
of them (two further lines that start with `` = `` are table legends, not titles).

**Three parts** (article ``i``, 0-based, file order), fixed by :data:`TEST_ARTICLES`:

- ``calibration``: ``i % 4 == 3`` (15 articles, ~93k SmolLM2 tokens): fits (Σ_q,
  centroids) and the search of ``kakeya tune``.
- ``validation``: the other 22 articles that any committed report before the protocol
  (December 2026) evaluated on (~99k tokens): every choice among candidates (a tune's
  selection, a preset, a layer ranking).
- ``test``: the 25 articles no committed report had touched (~110k tokens): the numbers
  we publish. Nothing is chosen on it.

The test articles were found once by listing every ``text_usage`` record under
``reports/`` and ``calibration/`` at that commit; they are pinned here so the split
depends on nothing but the file. Jobs record the part and articles they used; a policy
records its ``provenance`` and :func:`check_disjoint` refuses an overlap.

A second, out-of-domain text is code (CPython 3.11 standard-library modules, one article
each, SHA-256 checked; ``scripts/make_code_text.py`` rebuilds both files). It has two parts in
two files with disjoint modules, which :func:`load_code_text` reads one at a time:
``test`` (``data/python_stdlib.txt``, 13 modules: headline numbers only) and ``validation``
(``data/python_stdlib_validation.txt``, 13 other modules: choices that must also hold on
code). It has no calibration part: nothing is fitted on code.

**Text.** CRLF line endings are normalised to ``\\n``; each article's text is its
lines, title included, each followed by ``\\n``. Each article is tokenized on its own
(no special tokens) and a part's token stream is the concatenation of its articles in
file order.

**Passages.** A passage is a window of ``ctx + n_eval + 1`` consecutive tokens of a
part's stream: ``ctx`` context tokens, then ``n_eval`` evaluated positions whose
targets are the following tokens. The stream holds ``M = len // window`` disjoint
windows; ``n`` passages take windows ``floor(j * M / n)`` for ``j < n`` (spread over
the whole part, deterministic, never overlapping). Each passage records the articles
it spans and its token and character offsets.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WIKITEXT_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
WIKITEXT_NAME = "wikitext-2-raw-v1/test"
#: Default location, relative to the project root (and to the working directory).
WIKITEXT_DEFAULT = Path("..") / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
WIKITEXT_ENV = "KAKEYA_WIKITEXT"

CALIBRATION_MODULUS = 4
CALIBRATION_REMAINDER = 3
#: WikiText-2 articles no committed report had evaluated on when the protocol was set.
TEST_ARTICLES = (1, 4, 9, 10, 12, 13, 17, 20, 21, 25, 28, 29, 32, 34, 38, 44, 45, 48, 49, 52, 53, 54, 58, 60, 61)
PARTS = ("calibration", "validation", "test")
SPLIT_RULE = (
    f"article_index % {CALIBRATION_MODULUS} == {CALIBRATION_REMAINDER} -> calibration; "
    f"index in {list(TEST_ARTICLES)} -> test; else validation"
)

WIKITEXT_ARTICLES = 62


def wikitext_usage(part: str, role: str | None = None) -> dict[str, Any]:
    """The usage record of a whole WikiText-2 part, without reading the file (presets' provenance)."""
    articles = tuple(Article(i, "", "") for i in range(WIKITEXT_ARTICLES))
    rec = Corpus(WIKITEXT_NAME, "", WIKITEXT_SHA256, articles).split().usage(part)
    return rec if role is None else {"role": role, **rec}


CODE_TEXT_SHA256 = "2e7af867ca12eef8409f1549e5438e4ecc27ba83d5ce83c0a1659276cbaee773"
CODE_TEXT_NAME = "python-stdlib-3.11"
CODE_TEXT_PATH = Path(__file__).resolve().parents[1] / "data" / "python_stdlib.txt"


@dataclass(frozen=True)
class CodeText:
    name: str
    path: Path
    sha256: str


#: The parts of the code text, one file each (module doc).
CODE_TEXTS = {
    "test": CodeText(CODE_TEXT_NAME, CODE_TEXT_PATH, CODE_TEXT_SHA256),
    "validation": CodeText(
        CODE_TEXT_NAME + "-validation",
        CODE_TEXT_PATH.with_name("python_stdlib_validation.txt"),
        "4b91d4eb23479de6f2fff86bb30a2742c2d59f53f037ae9be4dfd92202accf31",
    ),
}
_MODULE_MARKER = re.compile(r"# === module: (\S+) ===")
#: Built-in texts for ``--text``: WikiText-2 (three parts) and the out-of-domain code (validation, test).
TEXTS = ("wikitext", "code")

_TITLE = re.compile(r" = [^=].* = ")


class CorpusError(ValueError):
    """The text is missing, corrupt, or too short for the request."""


class CorpusOverlapError(CorpusError):
    """Calibration and evaluation text share articles."""


@dataclass(frozen=True)
class Article:
    index: int
    title: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """A text source split into articles."""

    name: str
    source: str
    sha256: str
    articles: tuple[Article, ...]
    #: "parts" (the WikiText split), "single" (one file: it is every part, the job's record
    #: names the file's hash), "test" or "validation" (one part of the out-of-domain text)
    layout: str = "parts"

    def split(self) -> CorpusSplit:
        """The fixed article-level split into calibration / validation / test (module doc)."""
        idx = tuple(a.index for a in self.articles)
        if self.layout == "single":
            return CorpusSplit(self.name, self.sha256, "single document: every part", idx, idx, idx)
        if self.layout == "test":
            return CorpusSplit(self.name, self.sha256, "out-of-domain text: test only", (), (), idx)
        if self.layout == "validation":
            return CorpusSplit(self.name, self.sha256, "out-of-domain text: validation only", (), idx, ())
        cal = tuple(i for i in idx if i % CALIBRATION_MODULUS == CALIBRATION_REMAINDER)
        test = tuple(i for i in idx if i not in cal and i in TEST_ARTICLES)
        val = tuple(i for i in idx if i not in cal and i not in test)
        return CorpusSplit(self.name, self.sha256, SPLIT_RULE, cal, val, test)

    def part(self, name: str) -> list[Article]:
        """Articles of one part (:data:`PARTS`), in file order."""
        if name not in PARTS:
            raise CorpusError(f"part must be one of {', '.join(PARTS)}; got {name!r}")
        wanted = set(getattr(self.split(), name))
        if not wanted:
            raise CorpusError(f"{self.name} has no {name} part ({self.split().rule})")
        return [a for a in self.articles if a.index in wanted]


@dataclass(frozen=True)
class CorpusSplit:
    corpus: str
    sha256: str
    rule: str
    calibration: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in PARTS:
            d[name] = list(getattr(self, name))
        return d

    def usage(self, part: str, articles: Iterable[int] | None = None) -> dict[str, Any]:
        """A record of the text one job used, for its JSON and for :func:`check_disjoint`."""
        if part not in PARTS:
            raise CorpusError(f"part must be one of {', '.join(PARTS)}; got {part!r}")
        used = sorted(set(getattr(self, part) if articles is None else articles))
        return {
            "corpus": self.corpus,
            "sha256": self.sha256,
            "part": part,
            "rule": self.rule,
            "articles": used,
        }


def check_disjoint(first: Mapping[str, Any], second: Mapping[str, Any]) -> None:
    """Raise :class:`CorpusOverlapError` if two usage records share articles of the same text.

    Records are dicts with ``sha256`` and ``articles`` (as written by :meth:`CorpusSplit.usage`);
    texts with different hashes cannot overlap by this check.
    """
    for rec in (first, second):
        if "sha256" not in rec or "articles" not in rec:
            raise CorpusError(f"text usage record needs 'sha256' and 'articles', got keys {sorted(rec)}")
    if first["sha256"] != second["sha256"]:
        return
    shared = sorted(set(first["articles"]) & set(second["articles"]))
    if shared:
        raise CorpusOverlapError(
            f"{first.get('part', 'first')} and {second.get('part', 'second')} text overlap on "
            f"{len(shared)} article(s) of {first.get('corpus', first['sha256'][:12])}: {shared[:20]}"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def articles_from_text(text: str) -> tuple[Article, ...]:
    """Split WikiText-style text (``\\n`` line ends) into articles at `` = Title = `` lines.

    Blank lines are dropped (the raw file has none inside articles; the ``datasets`` copy
    separates every line by one).
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    starts = [i for i, line in enumerate(lines) if _TITLE.fullmatch(line)]
    if not starts:
        raise CorpusError("no article title lines ' = Title = ' found")
    out = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        body = "".join(line + "\n" for line in lines[start:end] if line)  # blank lines dropped
        out.append(Article(k, lines[start].strip(" =").strip(), body))
    return tuple(out)


def default_wikitext_path() -> Path:
    """``$KAKEYA_WIKITEXT``, else ``../shared/...`` next to the project root, else from the cwd."""
    env = os.environ.get(WIKITEXT_ENV)
    if env:
        return Path(env).expanduser()
    root = Path(__file__).resolve().parents[3]
    for base in (root, Path.cwd()):
        candidate = (base / WIKITEXT_DEFAULT).resolve()
        if candidate.is_file():
            return candidate
    return (root / WIKITEXT_DEFAULT).resolve()


def load_wikitext(path: str | os.PathLike | None = None, *, allow_download: bool = True) -> Corpus:
    """Load WikiText-2 raw test from ``path`` (default :func:`default_wikitext_path`).

    The SHA-256 must match :data:`WIKITEXT_SHA256`. If the file is missing and the
    ``datasets`` package is importable, the same split is fetched from the Hub instead
    (recorded as such; its line layout differs, so its hash and tokens differ).
    """
    p = Path(path).expanduser() if path is not None else default_wikitext_path()
    if not p.is_file():
        if allow_download:
            fetched = _wikitext_from_datasets()
            if fetched is not None:
                return fetched
        raise CorpusError(
            f"WikiText-2 not found at {p}; pass --wikitext PATH or set {WIKITEXT_ENV} "
            f"(expected wiki.test.raw with SHA-256 {WIKITEXT_SHA256})"
        )
    raw = p.read_bytes()
    digest = _sha256(raw)
    if digest != WIKITEXT_SHA256:
        raise CorpusError(f"{p} has SHA-256 {digest}, expected {WIKITEXT_SHA256} (WikiText-2 raw test)")
    text = raw.decode("utf-8").replace("\r\n", "\n")
    return Corpus(WIKITEXT_NAME, str(p), digest, articles_from_text(text))


def _wikitext_from_datasets() -> Corpus | None:
    try:
        import datasets  # noqa: F401  (optional, never installed by kakeya)
    except ImportError:
        return None
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception:  # offline, or the Hub refuses: report the missing file instead
        return None
    text = "".join(ds["text"])
    return Corpus(
        WIKITEXT_NAME + " (datasets)",
        "datasets:wikitext/wikitext-2-raw-v1/test",
        _sha256(text.encode()),
        articles_from_text(text),
    )


def load_text_file(path: str | os.PathLike) -> Corpus:
    """Any UTF-8 text file as a one-article corpus (all of it is evaluation text)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CorpusError(f"text file {p} not found")
    raw = p.read_bytes()
    text = raw.decode("utf-8").replace("\r\n", "\n")
    return Corpus(f"file:{p.name}", str(p.resolve()), _sha256(raw), (Article(0, p.name, text),), "single")


def load_code_text(path: str | os.PathLike | None = None, part: str = "test") -> Corpus:
    """One part of the out-of-domain code text: 13 Python standard-library modules (module doc)."""
    if part not in CODE_TEXTS:
        raise CorpusError(f"the code text has parts {' and '.join(CODE_TEXTS)}, not {part!r}")
    spec = CODE_TEXTS[part]
    p = Path(path) if path is not None else spec.path
    if not p.is_file():
        raise CorpusError(f"code text not found at {p}; rebuild it with scripts/make_code_text.py")
    raw = p.read_bytes()
    digest = _sha256(raw)
    if digest != spec.sha256:
        raise CorpusError(f"{p} has SHA-256 {digest}, expected {spec.sha256} ({spec.name})")
    lines = raw.decode("utf-8").split("\n")
    starts = [i for i, line in enumerate(lines) if _MODULE_MARKER.fullmatch(line)]
    articles = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        body = "".join(line + "\n" for line in lines[start:end] if line)
        articles.append(Article(k, _MODULE_MARKER.fullmatch(lines[start]).group(1), body))
    return Corpus(spec.name, str(p), digest, tuple(articles), part)


def load_corpus(
    text_file: str | None = None, wikitext: str | None = None, text: str = "wikitext", part: str = "test"
) -> Corpus:
    """``--text-file`` if given, else the built-in ``text`` (:data:`TEXTS`): WikiText-2
    (``--wikitext``, env, default path) or the out-of-domain code text's file for ``part``."""
    if text_file:
        return load_text_file(text_file)
    if text not in TEXTS:
        raise CorpusError(f"text must be one of {', '.join(TEXTS)}; got {text!r}")
    return load_code_text(part=part) if text == "code" else load_wikitext(wikitext)


@dataclass(frozen=True)
class TokenStream:
    """Tokens of a list of articles, concatenated, with each article's token/char range."""

    ids: tuple[int, ...]
    articles: tuple[Article, ...]
    token_starts: tuple[int, ...]  # first token of each article; len(articles) + 1 entries
    char_starts: tuple[int, ...]  # first char of each article in the concatenated text
    char_offsets: tuple[int, ...] | None  # start char of every token (fast tokenizers only)

    def article_range(self, start: int, end: int) -> list[int]:
        """Positions (into ``articles``) of the articles overlapping tokens ``[start, end)``."""
        return [
            k
            for k in range(len(self.articles))
            if self.token_starts[k] < end and self.token_starts[k + 1] > start
        ]


def tokenize_articles(tokenizer, articles: Iterable[Article]) -> TokenStream:
    """Tokenize each article separately (no special tokens) and concatenate."""
    articles = tuple(articles)
    ids: list[int] = []
    token_starts, char_starts, offsets = [], [], []
    fast = bool(getattr(tokenizer, "is_fast", False))
    char_pos = 0
    for art in articles:
        token_starts.append(len(ids))
        char_starts.append(char_pos)
        enc = tokenizer(art.text, add_special_tokens=False, return_offsets_mapping=fast)
        ids.extend(enc["input_ids"])
        if fast:
            offsets.extend(char_pos + s for s, _ in enc["offset_mapping"])
        char_pos += len(art.text)
    token_starts.append(len(ids))
    char_starts.append(char_pos)
    return TokenStream(
        tuple(ids), articles, tuple(token_starts), tuple(char_starts), tuple(offsets) if fast else None
    )


@dataclass(frozen=True)
class Passage:
    """One evaluation window: ``ctx`` context tokens, ``n_eval`` evaluated positions, +1 target."""

    index: int
    window: int  # index of the window in the evaluation stream
    ctx: int
    n_eval: int
    token_ids: tuple[int, ...] = field(repr=False)
    token_start: int
    token_end: int
    char_start: int | None
    char_end: int | None
    articles: tuple[dict[str, Any], ...]

    def provenance(self) -> dict[str, Any]:
        d = asdict(self)
        del d["token_ids"]
        d["articles"] = list(self.articles)
        return d


def make_passages(stream: TokenStream, n: int, ctx: int, n_eval: int) -> list[Passage]:
    """Cut ``n`` deterministic, disjoint windows of ``ctx + n_eval + 1`` tokens (module doc)."""
    if n < 1 or ctx < 1 or n_eval < 1:
        raise CorpusError(f"passages, ctx and n_eval must be >= 1, got {n}, {ctx}, {n_eval}")
    width = ctx + n_eval + 1
    available = len(stream.ids) // width
    if n > available:
        raise CorpusError(
            f"{n} passages of {width} tokens requested but the text has {len(stream.ids)} "
            f"tokens ({available} windows)"
        )
    out = []
    for j in range(n):
        w = (j * available) // n
        start, end = w * width, (w + 1) * width
        arts = tuple(
            {
                "index": stream.articles[k].index,
                "title": stream.articles[k].title,
                "token_offset": max(0, start - stream.token_starts[k]),
            }
            for k in stream.article_range(start, end)
        )
        if stream.char_offsets is not None:
            c0 = stream.char_offsets[start]
            c1 = stream.char_offsets[end] if end < len(stream.char_offsets) else stream.char_starts[-1]
        else:
            c0 = c1 = None
        out.append(Passage(j, w, ctx, n_eval, stream.ids[start:end], start, end, c0, c1, arts))
    return out


def part_passages(corpus: Corpus, tokenizer, part: str, n: int, ctx: int, n_eval: int) -> list[Passage]:
    """Passages from one part of ``corpus``."""
    return make_passages(tokenize_articles(tokenizer, corpus.part(part)), n, ctx, n_eval)


def calibration_tokens(corpus: Corpus, tokenizer, max_tokens: int | None = None) -> TokenStream:
    """Token stream of the calibration part (for issue 5), optionally truncated."""
    stream = tokenize_articles(tokenizer, corpus.part("calibration"))
    if not stream.articles:
        raise CorpusError(f"corpus {corpus.name} has no calibration part")
    if max_tokens is not None and len(stream.ids) > max_tokens:
        keep = [k for k in range(len(stream.articles)) if stream.token_starts[k] < max_tokens]
        stream = TokenStream(
            stream.ids[:max_tokens],
            tuple(stream.articles[k] for k in keep),
            tuple(stream.token_starts[k] for k in keep) + (max_tokens,),
            tuple(stream.char_starts[k] for k in keep) + (stream.char_starts[len(keep)],),
            stream.char_offsets[:max_tokens] if stream.char_offsets is not None else None,
        )
    return stream
