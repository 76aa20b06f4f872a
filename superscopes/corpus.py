"""Offline English text: a corpus built from Debian packages (SAE training, InverseScope, any
recipe) and the Patchscopes snippets shipped with the package.

The Hugging Face hub is out of reach here, so the text comes from three Debian packages
(``apt-get install -y dict-gcide wordnet-base fortunes-min``), chosen for being plain,
varied English with clear licences:

- ``gcide``: definitions from the GNU Collaborative International Dictionary of English
  (package ``dict-gcide``, /usr/share/dictd/gcide.dict.dz; Webster's 1913 plus WordNet and
  volunteers). Licence: GPL-2.0-or-later. The bulk of the corpus (~200k entries):
  definitions, usage notes and literary quotations, i.e. many topics and registers.
- ``wordnet``: synset glosses with their example sentences (package ``wordnet-base``,
  /usr/share/wordnet/data.*). Licence: WordNet 3.0 licence (Princeton; permissive, keep
  the notice). Modern, short, plain definitions and everyday example sentences.
- ``fortunes``: the ``fortunes``, ``literature`` and ``riddles`` files (package
  ``fortunes-min``, /usr/share/games/fortunes). Licence: BSD (fortune-mod). Small, but
  conversational and narrative text, which dictionaries lack.

No text from these packages is committed: ``python -m superscopes.corpus build`` reads the
installed packages and writes ``train.jsonl`` and ``heldout.jsonl`` (one passage per line:
``{"source", "text"}``) plus ``manifest.json`` (counts, provenance, licences) under
``--out`` (default ``$SUPERSCOPES_CACHE/corpus``). Passages are documents packed or cut to
about ``--words`` words, so batches of them need little padding. The held-out split is a
stable hash of each passage's text (not of its position), so it stays the same when a
source grows or the passages are reordered. ``FALLBACK`` is a tiny built-in corpus written
for this module (no third-party text) that tests use when the packages are not installed.

``patchscopes_snippets`` is the second named corpus: the ``prompt_source`` snippets of the
Patchscopes factual data (``superscopes/data/patchscopes``, Apache-2.0, see its NOTICE), real
sentences that mention an entity, which the lens recipes sample positions from. ``texts``
reads either corpus, or a file, by name.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from superscopes.models import cache_dir
from superscopes.parsing import CommandParser

SOURCES: dict[str, dict[str, str]] = {
    "gcide": {
        "package": "dict-gcide",
        "path": "/usr/share/dictd/gcide.dict.dz",
        "licence": "GPL-2.0-or-later (GNU Collaborative International Dictionary of English 0.48)",
    },
    "wordnet": {
        "package": "wordnet-base",
        "path": "/usr/share/wordnet",
        "licence": "WordNet 3.0 licence (Princeton University; permissive, notice retained)",
    },
    "fortunes": {
        "package": "fortunes-min",
        "path": "/usr/share/games/fortunes",
        "licence": "BSD (fortune-mod)",
    },
}
PATCHSCOPES_DATA = Path(__file__).parent / "data" / "patchscopes"
CORPORA = ("patchscopes", "debian")
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 2

FALLBACK: tuple[str, ...] = (
    "The river runs past the old mill and into the lake below the town.",
    "A violin is a string instrument played with a bow; it has four strings tuned in fifths.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "She opened the window because the kitchen was hot after baking bread all morning.",
    "Photosynthesis is the process by which green plants turn light, water and carbon dioxide into sugar.",
    "The committee will meet on Tuesday to vote on the new budget for the school.",
    "Dogs bark, cats meow, and cows moo; each animal has its own sound.",
    "In winter the lake freezes, and children skate on it after school.",
    "A doctor examined the patient, wrote a prescription and asked him to rest for a week.",
    "The number seven follows six and comes before eight.",
    "He paid for the coffee with a five dollar note and left the change as a tip.",
    "Mountains are high, rivers are long, and deserts are dry and hot.",
    "The train to London leaves at nine and arrives shortly before noon.",
    "Gold is a soft yellow metal that does not rust and is used in jewellery and coins.",
    "Her grandmother told stories about the war, the farm and the long journey across the sea.",
    "To bake a cake, mix flour, sugar, eggs and butter, then bake it in a hot oven.",
    "The telescope showed the rings of Saturn and four of the moons of Jupiter.",
    "A lawyer argued the case before the judge, and the jury returned a verdict of not guilty.",
    "Birds build nests in spring and lay eggs that hatch after a few weeks.",
    "The computer stores its data on a disk and runs programs in its memory.",
) * 4


def _stable_percent(text: str) -> int:
    return zlib.crc32(text.encode()) % 100


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------- sources


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _gcide(path: Path) -> Iterator[str]:
    """One document per dictionary entry: headword, then its definitions, with the markup
    (pronunciations, etymologies in brackets, source tags, cross-reference braces) removed."""
    data = gzip.open(path).read()  # a dictzip file is a gzip file
    seen = set()
    for line in open(path.with_suffix("").with_suffix(".index"), encoding="utf-8"):
        head, offset, length = line.rstrip("\n").split("\t")[:3]
        if head.startswith("00-database") or offset in seen:
            continue
        seen.add(offset)
        start = sum(_B64.index(c) * 64**i for i, c in enumerate(reversed(offset)))
        size = sum(_B64.index(c) * 64**i for i, c in enumerate(reversed(length)))
        entry = data[start : start + size].decode("utf-8", "replace")
        entry = re.sub(r"\\[^\\]*\\", "", entry)  # pronunciation
        for _ in range(3):  # nested brackets: etymologies quote other words in brackets
            entry = re.sub(r"\[[^\[\]]*\]", "", entry)
        entry = re.sub(r"\([^()]*[*\"`][^()]*\)", "", entry)  # respelled pronunciations
        entry = re.sub(r"--\s*[A-Z][\w. ]{0,40}\.", "", entry)  # "--Milton." citations
        entry = entry.replace("{", "").replace("}", "")
        text = re.sub(r"\s+([,;.])", r"\1", _clean(entry))  # "Apple , n." once the pronunciation is gone
        if len(text.split()) >= 6:
            yield text


def _wordnet(path: Path) -> Iterator[str]:
    """One document per synset: "lemma, lemma: gloss; "example"" from data.noun/verb/adj/adv."""
    for part in ("noun", "verb", "adj", "adv"):
        for line in open(path / f"data.{part}", encoding="utf-8", errors="replace"):
            if line.startswith("  ") or "|" not in line:  # the licence header
                continue
            fields, gloss = line.split("|", 1)
            fields = fields.split()
            n_words = int(fields[3], 16)
            lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            lemmas = [re.sub(r"\(\w+\)$", "", lemma) for lemma in lemmas]
            yield _clean(f"{', '.join(lemmas)}: {gloss}")


def _fortunes(path: Path) -> Iterator[str]:
    for name in ("fortunes", "literature", "riddles"):
        text = (path / name).read_text(encoding="utf-8", errors="replace")
        for piece in re.split(r"^%$", text, flags=re.M):
            piece = _clean(piece)
            if piece:
                yield piece


_READERS = {"gcide": _gcide, "wordnet": _wordnet, "fortunes": _fortunes}


def documents(source: str) -> Iterator[str]:
    """The documents of one installed source (see ``SOURCES``)."""
    if source not in SOURCES:
        raise ValueError(f"corpus source {source!r} is unknown; choose from {', '.join(SOURCES)}")
    path = Path(SOURCES[source]["path"])
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: install the Debian package ({SOURCES[source]['package']}), e.g. "
            f"apt-get install -y {' '.join(s['package'] for s in SOURCES.values())}"
        )
    yield from _READERS[source](path)


def passages(texts: Iterator[str], words: int) -> Iterator[str]:
    """Documents packed (short ones joined by newlines) or cut (long ones, at word
    boundaries) into passages of about ``words`` words."""
    buffer: list[str] = []
    size = 0
    for text in texts:
        pieces = text.split(" ")
        while len(pieces) > words:  # a long document: cut it
            yield " ".join(pieces[:words])
            pieces = pieces[words:]
        buffer.append(" ".join(pieces))
        size += len(pieces)
        if size >= words:
            yield "\n".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield "\n".join(buffer)


def split_of(text: str) -> str:
    """``heldout`` for a stable ``HELDOUT_PERCENT`` of passages (by a hash of the text), else ``train``."""
    return "heldout" if _stable_percent(text) < HELDOUT_PERCENT else "train"


def build(out: str | Path | None = None, sources: tuple[str, ...] = tuple(SOURCES), words: int = 80) -> dict:
    """Write ``train.jsonl``, ``heldout.jsonl`` and ``manifest.json`` under ``out``.

    Passages of all sources are interleaved in a stable hash order, so any prefix of the
    training file (a token budget) is a mix of every source."""
    out = Path(out) if out else cache_dir() / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    records = [(source, text) for source in sources for text in passages(documents(source), words)]
    records.sort(key=lambda r: zlib.crc32(f"{r[0]}|{r[1]}".encode()))
    counts = {split: {s: 0 for s in sources} for split in SPLITS}
    words_total = {split: 0 for split in SPLITS}
    files = {split: open(out / f"{split}.jsonl", "w", encoding="utf-8") for split in SPLITS}
    for source, text in records:
        split = split_of(text)
        files[split].write(json.dumps({"source": source, "text": text}) + "\n")
        counts[split][source] += 1
        words_total[split] += len(text.split())
    for f in files.values():
        f.close()
    manifest = {
        "words_per_passage": words,
        "heldout_percent": HELDOUT_PERCENT,
        "passages": counts,
        "words": words_total,
        "sources": {s: SOURCES[s] for s in sources},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load(split: str = "train", path: str | Path | None = None, fallback: bool = False) -> list[str]:
    """The passages of ``split`` from a built corpus (default ``$SUPERSCOPES_CACHE/corpus``).

    ``fallback=True``: the built-in ``FALLBACK`` sentences (split the same way) when no corpus
    is built, e.g. in tests."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; choose from {', '.join(SPLITS)}")
    file = (Path(path) if path else cache_dir() / "corpus") / f"{split}.jsonl"
    if not file.exists():
        if fallback:
            # The fallback is tiny: alternate rather than hash, so both splits have text.
            return [t for i, t in enumerate(FALLBACK) if (i % 10 == 9) == (split == "heldout")]
        raise FileNotFoundError(f"no corpus at {file}: build it with `python -m superscopes.corpus build`")
    with open(file, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@functools.lru_cache(maxsize=1)
def _all_snippets() -> pd.DataFrame:
    frames = []
    for path in sorted((PATCHSCOPES_DATA / "factual").glob("*.tsv")):
        # Only the two columns used (the files hold long generation columns too).
        frame = pd.read_csv(path, sep="\t", usecols=["subject", "prompt_source"], dtype=str, keep_default_na=False)
        text = frame["prompt_source"].str.strip()
        frames.append(pd.DataFrame({"text": text, "subject": frame["subject"], "relation": path.stem}))
    return pd.concat(frames, ignore_index=True)


def patchscopes_snippets(seed: int = 0, min_words: int = 4) -> pd.DataFrame:
    """Every distinct ``prompt_source`` snippet of the factual Patchscopes data, with its
    ``subject`` and ``relation`` (file name), shuffled with ``seed`` and ordered round-robin
    over relations (so the first n rows mix all relations evenly)."""
    snippets = _all_snippets().copy()
    snippets = snippets[snippets["text"].str.split().str.len() >= min_words]
    snippets = snippets.drop_duplicates("text").sample(frac=1.0, random_state=seed)
    snippets["rank"] = snippets.groupby("relation").cumcount()
    rng = np.random.default_rng(seed)
    snippets["tie"] = rng.random(len(snippets))
    return snippets.sort_values(["rank", "tie"]).drop(columns=["rank", "tie"]).reset_index(drop=True)


# Files read through ``datasets`` (memory-mapped Arrow, any size), by suffix.
DATASET_FILES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def texts(source: str, split: str = "train", limit: int | None = None, column: str = "text") -> list[str]:
    """Texts of a named corpus, a dataset or a file.

    - ``patchscopes``: ``patchscopes_snippets(0)`` (it has no splits);
    - ``debian``: ``load(split)``, the corpus built from Debian packages;
    - ``hf:NAME``: the ``column`` of a Hugging Face hub dataset's ``split``, read with
      ``datasets.load_dataset`` (streamed when ``limit`` is set, so a 10k-text sample of a large
      corpus downloads only those texts);
    - a ``.csv``, ``.json``, ``.jsonl`` or ``.parquet`` file: its ``column``, through ``datasets``;
    - any other file: one text a line."""
    if source == "patchscopes":
        found = patchscopes_snippets(0)["text"].astype(str).tolist()
    elif source == "debian":
        found = load(split)
    elif source.startswith("hf:"):
        found = _dataset_column(source, column, limit, path=source[3:], split=split)
    elif Path(source).is_file() and Path(source).suffix in DATASET_FILES:
        found = _dataset_column(
            source, column, limit, path=DATASET_FILES[Path(source).suffix], data_files=source, split="train"
        )
    elif Path(source).is_file():
        found = [line.strip() for line in Path(source).read_text().splitlines() if line.strip()]
    else:
        raise ValueError(
            f"corpus {source!r}: use {' or '.join(map(repr, CORPORA))}, hf:NAME (a hub dataset), "
            f"a {'/'.join(DATASET_FILES)} file or a file with one text a line"
        )
    return found[:limit] if limit else found


def _dataset_column(source: str, column: str, limit: int | None, **where) -> list[str]:
    import datasets

    dataset = datasets.load_dataset(**where, streaming=limit is not None)
    names = dataset.column_names or list(next(iter(dataset)))  # a stream may not know its columns up front
    if column not in names:
        raise ValueError(f"corpus {source!r} has no column {column!r}; its columns: {', '.join(names)}")
    rows = dataset.take(limit) if limit is not None else dataset
    return [str(row[column]) for row in rows if row[column] and str(row[column]).strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m superscopes.corpus", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build the corpus from the installed Debian packages")
    build.add_argument("--out", help="output folder (default: $SUPERSCOPES_CACHE/corpus)")
    build.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}")
    build.add_argument("--words", type=int, default=80, help="words per passage")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    manifest = build(args.out, tuple(s for s in args.sources.split(",") if s), args.words)
    print(json.dumps({k: manifest[k] for k in ("passages", "words")}, indent=2))


if __name__ == "__main__":
    main()
