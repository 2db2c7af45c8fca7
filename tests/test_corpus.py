"""WikiText-2 loading, the article-level split, passages and overlap refusal."""

from __future__ import annotations

import re

import pytest
from kakeya_py import corpus as C

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
    assert split.evaluation == (0, 1, 2, 4, 5, 6)
    assert set(split.calibration).isdisjoint(split.evaluation)


def test_passages_are_deterministic_disjoint_and_traceable():
    corpus = toy_corpus(8)
    tok = WordTokenizer()
    stream = C.tokenize_articles(tok, corpus.part("evaluation"))
    a = C.make_passages(stream, 4, ctx=20, n_eval=9)
    b = C.make_passages(C.tokenize_articles(tok, corpus.part("evaluation")), 4, ctx=20, n_eval=9)
    assert a == b
    assert all(len(p.token_ids) == 30 for p in a)
    spans = [(p.token_start, p.token_end) for p in a]
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False))
    # 6 evaluation articles x 54 words = 324 tokens -> 10 windows of 30; 4 spread over them
    assert [p.window for p in a] == [0, 2, 5, 7]
    text = "".join(x.text for x in corpus.part("evaluation"))
    for p in a:
        assert tok(text[p.char_start : p.char_end])["input_ids"] == list(p.token_ids)
        assert all(art["index"] % 4 != 3 for art in p.articles)
    first = a[0].articles[0]
    assert first["index"] == 0 and first["title"] == "Title 0" and first["token_offset"] == 0


def test_too_many_passages_is_an_error():
    stream = C.tokenize_articles(WordTokenizer(), toy_corpus(2).part("evaluation"))
    with pytest.raises(C.CorpusError, match="windows"):
        C.make_passages(stream, 10, ctx=50, n_eval=10)


def test_check_disjoint_refuses_overlap():
    split = toy_corpus(8).split()
    cal = split.usage("calibration")
    ev = split.usage("evaluation", [0, 1, 2])
    C.check_disjoint(cal, ev)
    with pytest.raises(C.CorpusOverlapError, match=r"overlap on 1 article.*\[3\]"):
        C.check_disjoint(cal, split.usage("evaluation", [2, 3]))
    other_text = dict(cal, sha256="f" * 64)
    C.check_disjoint(other_text, split.usage("evaluation", [3]))
    with pytest.raises(C.CorpusError, match="sha256"):
        C.check_disjoint({"articles": [1]}, ev)


def test_text_file_is_one_evaluation_article(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"one two\r\nthree\r\n")
    corpus = C.load_text_file(f)
    assert len(corpus.articles) == 1 and corpus.articles[0].text == "one two\nthree\n"
    assert corpus.split().calibration == () and corpus.part("evaluation") == list(corpus.articles)


@needs_wikitext
def test_wikitext_loads_with_62_articles():
    corpus = C.load_wikitext(WIKI)
    assert corpus.sha256 == C.WIKITEXT_SHA256
    assert len(corpus.articles) == 62
    assert corpus.articles[0].title == "Robert Boulter"
    assert "\r" not in corpus.articles[0].text
    split = corpus.split()
    assert len(split.calibration) == 15 and len(split.evaluation) == 47


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
