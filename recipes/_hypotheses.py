"""The hypotheses InverseScope tests on the Patchscopes factual snippets, as features f(x) of an
input x (a snippet read up to and including one token), for recipes/inverse_scope.py:

- ``country``: the token ends the name of a country (country names: the subjects of the
  three country_* relations);
- ``same_subject``: x's text up to the token contains the query's subject string;
- ``subject_end``: the token is the last token of its own snippet's subject mention;
- ``same_relation``: x's snippet comes from the query's relation (a topical hypothesis);
- ``same_token``: x's token is the query's token (a lexical control);
- ``same_prediction``: the model's greedy next token after x is the one it predicts after the
  query (what the layers compute from the whole prefix, not what the token is).

A generated input has no source snippet, so only ``GENERATOR_HYPOTHESES`` are asked of it.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from superscopes.corpus import PATCHSCOPES_DATA

HYPOTHESES = ("country", "same_subject", "subject_end", "same_relation", "same_token", "same_prediction")
GENERATOR_HYPOTHESES = ("country", "same_subject", "same_token", "same_prediction")


def countries() -> list[str]:
    """Country names: the subjects of the country_* relations of the Patchscopes factual data."""
    names = set()
    for path in sorted((PATCHSCOPES_DATA / "factual").glob("country_*.tsv")):
        names |= set(pd.read_csv(path, sep="\t", index_col=0)["subject"].astype(str))
    return sorted(names, key=len, reverse=True)


def _mention(name: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(name) + r"(?!\w)")


def mention_ends(tokenizer, text: str, names: list[str]) -> set[int]:
    """Indices of tokens that end a whole-word mention of any of ``names`` in ``text``."""
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    ends = set()
    for name in names:
        for match in _mention(name).finditer(text):
            overlapping = [i for i, (s, e) in enumerate(offsets) if e > s and s < match.end() and e > match.start()]
            if overlapping:
                ends.add(overlapping[-1])
    return ends


def subject_queries(tokenizer, snippets: pd.DataFrame, n: int) -> list[tuple[str, str, str, int]]:
    """The first ``n`` snippets whose subject is mentioned as a whole word (after the first
    token): ``(text, subject, relation, index of the mention's last token)``."""
    queries = []
    for row in snippets.itertuples():
        ends = sorted(mention_ends(tokenizer, row.text, [row.subject]))
        if ends and ends[0] > 0:
            queries.append((row.text, row.subject, row.relation, ends[0]))
        if len(queries) == n:
            break
    return queries


class Inputs:
    """Inputs (snippet, token) as one table, with the features the hypotheses need;
    ``predictions``: the model's greedy next-token id after each input."""

    def __init__(
        self,
        tokenizer,
        frame: pd.DataFrame,
        pairs: list[tuple[int, int]],
        country_names: list[str],
        predictions: np.ndarray,
    ):
        if len(predictions) != len(pairs):
            raise ValueError(f"{len(predictions)} predictions for {len(pairs)} inputs")
        self.pairs, self.prediction = pairs, np.asarray(predictions)
        texts, subjects = frame["text"].tolist(), frame["subject"].tolist()
        encodings = [tokenizer(t, return_offsets_mapping=True) for t in texts]
        country_ends = [mention_ends(tokenizer, t, country_names) for t in texts]
        subject_ends = [mention_ends(tokenizer, t, [s]) for t, s in zip(texts, subjects)]
        self.token = np.array([tokenizer.decode([encodings[p]["input_ids"][i]]) for p, i in pairs], dtype=object)
        self.prefix = [texts[p][: encodings[p]["offset_mapping"][i][1]] for p, i in pairs]
        self.country = np.array([i in country_ends[p] for p, i in pairs])
        self.subject_end = np.array([i in subject_ends[p] for p, i in pairs])
        self.relation = np.array([frame["relation"].iloc[p] for p, _ in pairs])

    def contains(self, subject: str, rows: np.ndarray) -> np.ndarray:
        pattern = _mention(subject)
        return np.array([bool(pattern.search(self.prefix[r])) for r in rows])

    def ceilings(self, query: Inputs, queries: list[tuple], k: int) -> list[dict[str, float]]:
        """Per query, the most any k of these inputs can agree with it on each hypothesis that
        holds for it: min(1, inputs for which the hypothesis holds / k)."""
        every = np.arange(len(self.pairs))
        return [
            {
                h: min(1.0, float(np.sum(f == f_query)) / k)
                for h, (f_query, f) in self.features(query, qi, q[1], q[2], every).items()
                if f_query
            }
            for qi, q in enumerate(queries)
        ]

    def features(self, query: Inputs, qi: int, subject: str, relation: str, rows: np.ndarray) -> dict:
        """hypothesis -> (f(x_original) of query ``qi``, f over these inputs' ``rows``)."""
        return {
            "country": (bool(query.country[qi]), self.country[rows]),
            "same_subject": (True, self.contains(subject, rows)),
            "subject_end": (bool(query.subject_end[qi]), self.subject_end[rows]),
            "same_relation": (True, self.relation[rows] == relation),
            "same_token": (True, self.token[rows] == query.token[qi]),
            "same_prediction": (True, self.prediction[rows] == query.prediction[qi]),
        }


def generated_features(tokenizer, text: str, subject: str, country_names: list[str], prediction: int) -> dict:
    """f(x) of a generated input for each of GENERATOR_HYPOTHESES, from its text and the model's
    greedy next-token id after it (``prediction``)."""
    ids = tokenizer(text)["input_ids"]
    return {
        "country": len(ids) - 1 in mention_ends(tokenizer, text, country_names),
        "same_subject": bool(_mention(subject).search(text)),
        "same_token": tokenizer.decode(ids[-1:]),
        "same_prediction": prediction,
    }
