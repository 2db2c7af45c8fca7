"""WikiText-2 loading, the article-level split, passages and overlap refusal."""

from __future__ import annotations

import re

import pytest
from kakeya_py.eval import corpus as C

WIKI = C.default_wikitext_path()
needs_wikitext = pytest.mark.skipif(not WIKI.is_file(), reason=f"WikiText-2 not found at {WIKI}")


class WordTokenizer:
    """Deterministic whitespace tokenizer with offsets (a 'fast' tokenizer for the corpus code)."""

    is_fast = True

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        spans = [m.span() for m in re.finditer(r"\S+", text)]
        ids = [sum(map(ord, text[a:b])) % 997 for a, b in spans]
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out


def toy_corpus(n_articles: int = 8, words: int = 50) -> C.Corpus:
    text = "".join(
        f" = Title {i} = \n" + " ".join(f"a{i}w{j}" for j in range(words)) + " \n" for i in range(n_articles)
    )
    return C.Corpus("toy", "memory", "0" * 64, C.articles_from_text(text))


def test_articles_from_text_splits_on_level_one_titles():
    text = " = A = \n body a \n = = Section = = \n more \n = B = \n body b \n = Legend, not a title \n"
    arts = C.articles_from_text(text)
    assert [a.title for a in arts] == ["A", "B"]
    assert arts[0].text == " = A = \n body a \n = = Section = = \n more \n"
    assert arts[1].text.endswith(" = Legend, not a title \n")


def test_split_rule_is_by_article_index():
    split = toy_corpus(8).split()
    assert split.calibration == (3, 7)
    assert split.test == (1, 4)  # the pinned test articles below 8
    assert split.validation == (0, 2, 5, 6)
    parts = [set(getattr(split, name)) for name in C.PARTS]
    assert sum(map(len, parts)) == 8 and set().union(*parts) == set(range(8))


def test_unknown_part_is_an_error():
    with pytest.raises(C.CorpusError, match="calibration, validation, test"):
        toy_corpus(8).part("evaluation")


def test_test_articles_are_untouched_by_every_pre_protocol_report():
    """The pinned test part holds no article any earlier committed report evaluated on: the
    reports that predate the protocol record their articles under ``part: evaluation``."""
    import json

    root = C.Path(__file__).resolve().parents[1] / "reports"
    touched: set[int] = set()

    def walk(o):
        if isinstance(o, dict):
            if o.get("part") == "evaluation" and o.get("corpus") == C.WIKITEXT_NAME:
                touched.update(o.get("articles", []))
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    for f in root.rglob("*.json"):
        walk(json.loads(f.read_text()))
    assert len(touched) >= 20  # the old reports are there to check against
    assert touched.isdisjoint(C.TEST_ARTICLES)


def test_passages_are_deterministic_disjoint_and_traceable():
    corpus = toy_corpus(8)
    tok = WordTokenizer()
    stream = C.tokenize_articles(tok, corpus.part("validation"))
    a = C.make_passages(stream, 4, ctx=20, n_eval=9)
    b = C.make_passages(C.tokenize_articles(tok, corpus.part("validation")), 4, ctx=20, n_eval=9)
    assert a == b
    assert all(len(p.token_ids) == 30 for p in a)
    spans = [(p.token_start, p.token_end) for p in a]
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False))
    # 4 validation articles x 54 words = 216 tokens -> 7 windows of 30; 4 spread over them
    assert [p.window for p in a] == [0, 1, 3, 5]
    text = "".join(x.text for x in corpus.part("validation"))
    for p in a:
        assert tok(text[p.char_start : p.char_end])["input_ids"] == list(p.token_ids)
        assert all(art["index"] in (0, 2, 5, 6) for art in p.articles)
    first = a[0].articles[0]
    assert first["index"] == 0 and first["title"] == "Title 0" and first["token_offset"] == 0


def test_too_many_passages_is_an_error():
    stream = C.tokenize_articles(WordTokenizer(), toy_corpus(2).part("validation"))
    with pytest.raises(C.CorpusError, match="windows"):
        C.make_passages(stream, 10, ctx=50, n_eval=10)


def test_check_disjoint_refuses_overlap():
    split = toy_corpus(8).split()
    cal = split.usage("calibration")
    ev = split.usage("test", [1, 4])
    C.check_disjoint(cal, ev)
    with pytest.raises(C.CorpusOverlapError, match=r"overlap on 1 article.*\[3\]"):
        C.check_disjoint(cal, split.usage("validation", [2, 3]))
    other_text = dict(cal, sha256="f" * 64)
    C.check_disjoint(other_text, split.usage("validation", [3]))
    with pytest.raises(C.CorpusError, match="sha256"):
        C.check_disjoint({"articles": [1]}, ev)


def test_text_file_is_one_article_and_every_part(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"one two\r\nthree\r\n")
    corpus = C.load_text_file(f)
    assert len(corpus.articles) == 1 and corpus.articles[0].text == "one two\nthree\n"
    assert all(corpus.part(name) == list(corpus.articles) for name in C.PARTS)


def test_code_text_is_test_only_and_hash_checked(tmp_path):
    code = C.load_code_text()
    assert code.sha256 == C.CODE_TEXT_SHA256 and len(code.articles) == 13
    assert code.articles[0].title == "argparse" and code.articles[0].text.startswith("# === module: argparse")
    for name in ("calibration", "validation"):
        with pytest.raises(C.CorpusError, match=f"no {name} part"):
            code.part(name)
    assert code.part("test") == list(code.articles)
    bad = tmp_path / "code.txt"
    bad.write_bytes(C.CODE_TEXT_PATH.read_bytes() + b"x")
    with pytest.raises(C.CorpusError, match="SHA-256"):
        C.load_code_text(bad)


def test_code_validation_part_is_other_modules_and_validation_only():
    val, test = C.load_code_text(part="validation"), C.load_corpus(text="code")
    assert val.sha256 != test.sha256 and len(val.articles) == 13
    assert not {a.title for a in val.articles} & {a.title for a in test.articles}
    assert C.load_corpus(text="code", part="validation").sha256 == val.sha256
    assert val.part("validation") == list(val.articles)
    with pytest.raises(C.CorpusError, match="no test part"):
        val.part("test")
    with pytest.raises(C.CorpusError, match="parts test and validation, not 'calibration'"):
        C.load_code_text(part="calibration")


@needs_wikitext
def test_wikitext_loads_with_62_articles():
    corpus = C.load_wikitext(WIKI)
    assert corpus.sha256 == C.WIKITEXT_SHA256
    assert len(corpus.articles) == 62
    assert corpus.articles[0].title == "Robert Boulter"
    assert "\r" not in corpus.articles[0].text
    split = corpus.split()
    assert (len(split.calibration), len(split.validation), len(split.test)) == (15, 22, 25)
    assert C.wikitext_usage("test")["articles"] == list(split.test)


@needs_wikitext
def test_wikitext_hash_mismatch_is_refused(tmp_path):
    bad = tmp_path / "wiki.test.raw"
    bad.write_bytes(WIKI.read_bytes()[:-1])
    with pytest.raises(C.CorpusError, match="SHA-256"):
        C.load_wikitext(bad)


def test_missing_wikitext_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv(C.WIKITEXT_ENV, str(tmp_path / "absent.raw"))
    with pytest.raises(C.CorpusError, match="--wikitext"):
        C.load_wikitext(allow_download=False)


@needs_wikitext
def test_env_variable_overrides_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv(C.WIKITEXT_ENV, str(WIKI))
    assert C.default_wikitext_path() == WIKI
