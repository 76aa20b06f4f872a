"""The offline corpus: parsing each source, packing passages, the stable split, the fallback."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from superscopes import corpus


def test_passages_pack_short_documents_and_cut_long_ones():
    docs = ["a b c", "d e", "f g h i j k l m", "n"]
    assert list(corpus.passages(iter(docs), words=4)) == ["a b c\nd e", "f g h i", "j k l m", "n"]
    assert all(len(p.split()) <= 8 for p in corpus.passages(iter(["w " * 50]), words=8))


def test_split_is_a_stable_hash_of_the_text():
    texts = [f"passage number {i}" for i in range(2000)]
    splits = [corpus.split_of(t) for t in texts]
    assert splits == [corpus.split_of(t) for t in reversed(texts)][::-1]  # order does not matter
    assert 0.005 < splits.count("heldout") / len(texts) < 0.04  # HELDOUT_PERCENT = 2


def test_fallback_and_errors(tmp_path):
    train, held = corpus.load("train", tmp_path, fallback=True), corpus.load("heldout", tmp_path, fallback=True)
    assert train and held and not set(train) & set(held)
    with pytest.raises(FileNotFoundError, match="python -m superscopes.corpus build"):
        corpus.load("train", tmp_path)
    with pytest.raises(ValueError, match="split 'test' is unknown; choose from train, heldout"):
        corpus.load("test", tmp_path)
    with pytest.raises(ValueError, match="corpus source 'wiki' is unknown; choose from gcide, wordnet, fortunes"):
        next(corpus.documents("wiki"))


def test_gcide_entries_lose_their_markup(tmp_path):
    entry = (
        "Democracy \\De*moc\"ra*cy\\, n.; pl. {Democracies}. [F. d['e]mocratie, fr. Gr. dhmokrati`a.]\n"
        "   1. Government by the people. --Milton.\n      [1913 Webster]\n"
    )
    data = entry.encode()
    (tmp_path / "gcide.dict.dz").write_bytes(gzip.compress(data))
    b64 = lambda n: corpus._B64[n // 64] + corpus._B64[n % 64]  # noqa: E731
    (tmp_path / "gcide.index").write_text(f"00-database-url\tA\tB\nDemocracy\t{b64(0)}\t{b64(len(data))}\n")
    assert list(corpus._gcide(tmp_path / "gcide.dict.dz")) == [
        "Democracy, n.; pl. Democracies. 1. Government by the people."
    ]


def test_wordnet_lines_become_lemmas_and_glosses(tmp_path):
    header = "  1 This software and database is being provided to you\n"
    line = '00406612 04 n 02 fold 0 folding 0 005 @ 00404403 n 0000 | the act of folding; "he gave the napkins a double fold"  \n'
    for part in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"data.{part}").write_text(header + (line if part == "noun" else ""))
    assert list(corpus._wordnet(tmp_path)) == ['fold, folding: the act of folding; "he gave the napkins a double fold"']


@pytest.mark.skipif(not Path(corpus.SOURCES["fortunes"]["path"]).exists(), reason="fortunes-min is not installed")
def test_build_writes_splits_and_a_manifest(tmp_path):
    manifest = corpus.build(tmp_path, sources=("fortunes",), words=40)
    lines = {s: (tmp_path / f"{s}.jsonl").read_text().splitlines() for s in corpus.SPLITS}
    assert manifest["passages"]["train"]["fortunes"] == len(lines["train"]) > 50
    assert all(corpus.split_of(json.loads(line)["text"]) == "train" for line in lines["train"])
    assert json.loads((tmp_path / "manifest.json").read_text())["sources"]["fortunes"]["licence"].startswith("BSD")
    assert corpus.load("heldout", tmp_path) == [json.loads(line)["text"] for line in lines["heldout"]]


def test_the_patchscopes_snippets_are_a_named_corpus(tmp_path):
    snippets = corpus.patchscopes_snippets(0)
    assert len(snippets) > 10_000 and snippets["text"].is_unique
    assert set(snippets["relation"]) >= {"country_currency", "star_constellation"}
    assert snippets["relation"].head(14).nunique() == 14  # round-robin over the 14 relations
    assert corpus.texts("patchscopes", limit=5) == snippets["text"].head(5).tolist()
    lines = tmp_path / "texts.txt"
    lines.write_text("one text\n\n  another  \n")
    assert corpus.texts(str(lines)) == ["one text", "another"]
    with pytest.raises(ValueError, match="'wikipedia'.*'patchscopes' or 'debian'"):
        corpus.texts("wikipedia")


def test_dataset_files_are_read_through_datasets(tmp_path):
    import pandas as pd

    pd.DataFrame({"text": ["first text", "", "third text"], "n": [1, 2, 3]}).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n{"body": "three"}\n')
    assert corpus.texts(str(tmp_path / "a.parquet")) == ["first text", "third text"]  # empty texts dropped
    assert corpus.texts(str(tmp_path / "b.jsonl"), column="body", limit=2) == ["one", "two"]  # streamed
    with pytest.raises(ValueError, match="no column 'text'; its columns: body"):
        corpus.texts(str(tmp_path / "b.jsonl"))


def test_hub_datasets_go_through_load_dataset(monkeypatch):
    import datasets

    asked = {}

    def load_dataset(**where):
        asked.update(where)
        return datasets.Dataset.from_dict({"text": ["x y", "z w", "v u"]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert corpus.texts("hf:someone/pile-10k", "validation", limit=2) == ["x y", "z w"]
    assert asked == {"path": "someone/pile-10k", "split": "validation", "streaming": True}
