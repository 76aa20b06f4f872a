"""What the factual and multi-hop recipes share: the Patchscopes factual data, Li et al.'s
input-only prompt and success test, the unpatched model's greedy text through the graph,
conditions run once each (one ``superscopes.run`` per condition, resumable), and the
prompt-level comparison tables (``superscopes.metrics.compare_all``).

Li et al. (2025), millicentli/verb_faithfulness:

- rows (``src/utils/eval_utils.py``, ``get_feature_extraction_datasets``): every row of a
  factual TSV whose ``prompt_source`` is present and holds no newline (plus two row filters
  for star_constellation and object_superclass); no knowledge or crop filter;
- prompt (``PredictionDataset.__getitem__``): the chat ``[user: "", assistant: <snippet>,
  user: "Complete the sentence: " + prompt_target.replace("x", "").strip()]`` (models whose
  name holds "llama" drop the empty first turn), rendered by the model's chat template with
  the generation prompt and tokenised without added special tokens;
- generation (``src/predict_zeroshot.py``): 20 greedy new tokens, decoded without special tokens;
- success (``notebooks/view_prompt_baseline.ipynb``, ``check_correct``):
  ``answer.lower() in completion.lower()``, no whitespace normalisation.

Deviations, named: a model without a chat template (Gemma-3-270m base) gets the snippet and
the instruction as plain text (``<snippet>\\n\\nComplete the sentence: <question>``); the TSVs' literal
``\\u00ed`` escapes are turned into characters first (Li's code compares the escaped text, which
no output can contain).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import pandas as pd

from superscopes import metrics
from superscopes.corpus import PATCHSCOPES_DATA

from ._common import Run

FACTUAL = PATCHSCOPES_DATA / "factual"
LI_PREFIX = "Complete the sentence: "
LI_NEW_TOKENS = 20
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def unescape(text: str) -> str:
    """Some TSV fields hold literal ``\\u00ed`` escapes (``Bras\\u00edlia``): turn them into characters."""
    return _ESCAPE.sub(lambda m: chr(int(m[1], 16)), str(text))


def question(template: str, subject: str) -> str:
    """The plain question: the template's placeholder (its last ``x``) replaced by the subject."""
    cut = template.rfind("x")
    return template[:cut] + subject + template[cut + 1 :]


def mentions(output: str, obj: str) -> bool:
    """Li et al.'s ``check_correct`` (also the Patchscopes paper's rule): the object appears in the
    output, case-insensitive, whitespace as it is."""
    return str(obj).lower() in str(output).lower()


def judged(frame: pd.DataFrame, obj: str = "object", token: str = "subject") -> pd.DataFrame:
    """``echo`` (the output only repeats ``token``: ``metrics.is_echo``) and ``success`` (the object is
    mentioned and the output is no echo). These targets hold no few-shot examples to copy."""
    echo = [metrics.is_echo(o, t) for o, t in zip(frame["output"], frame[token])]
    hit = [mentions(o, b) for o, b in zip(frame["output"], frame[obj])]
    return frame.assign(echo=echo, success=[h and not e for h, e in zip(hit, echo)])


def li_rows(task: str, limit_subjects: int | None = None, n_samples: int | None = None) -> pd.DataFrame:
    """Li et al.'s rows of one task: ``task, subject, object, template, snippet`` (unfiltered;
    ``limit_subjects``: only the first N subjects, file order, for a quick run; ``n_samples``: N
    rows drawn as Li's ``--n_samples`` draws them, ``sample(n, random_state=42)`` after the filters)."""
    frame = pd.read_csv(FACTUAL / f"{task}.tsv", sep="\t", index_col=0)
    frame = frame[frame["prompt_source"].notna()]
    frame = frame[~frame["prompt_source"].str.contains("\n")]
    if task == "star_constellation":
        frame = frame[~frame["prompt_source"].str.contains("service")]
    if n_samples is not None and 0 < n_samples < len(frame):
        frame = frame.sample(n=n_samples, replace=False, random_state=42)
    frame = frame[["subject", "object", "prompt_target", "prompt_source"]].astype(str).map(unescape)
    frame.columns = ["subject", "object", "template", "snippet"]
    if limit_subjects is not None:
        frame = frame[frame["subject"].isin(list(dict.fromkeys(frame["subject"]))[:limit_subjects])]
    return frame.assign(task=task).reset_index(drop=True)[["task", "subject", "object", "template", "snippet"]]


def input_only_prompt(tokenizer, snippet: str, template: str) -> str:
    """Li et al.'s input-only prompt as text whose tokenisation (with the tokenizer's own special
    tokens) equals theirs (the chat template's, without added special tokens)."""
    ask = LI_PREFIX + template.replace("x", "").strip()
    if not tokenizer.chat_template:
        return f"{snippet}\n\n{ask}"
    turns = [{"role": "assistant", "content": snippet}, {"role": "user", "content": ask}]
    if "llama" not in str(tokenizer.name_or_path).lower():
        turns.insert(0, {"role": "user", "content": ""})
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]  # the tokenizer adds it again
    return text


def load_task(task: str, limit_subjects: int | None = None) -> pd.DataFrame:
    """Rows ``task, subject, object, template, question, snippet, source`` of one factual TSV.

    ``source`` is the snippet cut after the subject's first mention; rows whose snippet does
    not contain the subject verbatim (or starts with it) are dropped, and (subject, source)
    pairs are unique. ``limit_subjects``: keep the first N subjects (file order)."""
    frame = pd.read_csv(FACTUAL / f"{task}.tsv", sep="\t", index_col=0, keep_default_na=False)
    frame = frame[["subject", "object", "prompt_target", "prompt_source"]].map(unescape)
    if limit_subjects is not None:
        frame = frame[frame["subject"].isin(list(dict.fromkeys(frame["subject"]))[:limit_subjects])]
    rows = []
    for subject, obj, template, snippet in frame.itertuples(index=False):
        start = snippet.find(subject)
        if start > 0 and snippet[:start].strip():
            rows.append(
                (task, subject, obj, template, question(template, subject), snippet, snippet[: start + len(subject)])
            )
    out = pd.DataFrame(rows, columns=["task", "subject", "object", "template", "question", "snippet", "source"])
    return out.drop_duplicates(["subject", "source"]).reset_index(drop=True)


def crop_is_exact(tokenizer, snippet: str, subject: str, source: str) -> bool:
    """True when the cropped source's last token is the snippet's last subject token with the
    same token ids before it, so both give the model the same hidden state there. False too
    where the subject ends inside a token of the snippet (Qwen's ' Chile'+'an' in 'Chilean')."""
    from superscopes.prompts import TokenNotFoundError, find_token

    cropped = tokenizer(source)["input_ids"]
    full = tokenizer(snippet)["input_ids"]
    if full[: len(cropped)] != cropped:
        return False
    try:
        return find_token(tokenizer, snippet, subject) == len(cropped) - 1
    except TokenNotFoundError:
        return False


def chosen_tasks(args, default: list[str], quick: list[str]) -> list[str]:
    """``--tasks`` (else ``quick`` or ``default``), each checked against the data's tasks."""
    tasks = args.tasks.split(",") if args.tasks else (quick if args.quick else default)
    unknown = [t for t in tasks if not (FACTUAL / f"{t}.tsv").exists()]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {sorted(p.stem for p in FACTUAL.glob('*.tsv'))}")
    return tasks


def greedy(run: Run, model, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The unpatched model's greedy continuations, through the graph (transform ``none``:
    nothing is written), so decoding is the patched cells' decoding."""
    import superscopes

    unique = list(dict.fromkeys(prompts))
    if not unique:
        return []
    scope = superscopes.Scope(
        unique,
        sites=["resid_post"],
        layers=[0],
        alphas=[1],
        transforms=["none"],
        target="source",
        target_layers=[0],
        max_new_tokens=max_new_tokens,
        batch_size=run.args.batch_size,
    )
    outputs = dict(zip(*run.scope(model, scope)[["source", "output"]].T.values))
    return [outputs[p] for p in prompts]


def knowledge(run: Run, model, rows: pd.DataFrame, max_new_tokens: int) -> pd.DataFrame:
    """One row per (task, subject): the plain question, the model's answer, ``known``."""
    subjects = rows.drop_duplicates(["task", "subject"])[["task", "subject", "object", "question"]]
    answers = greedy(run, model, list(subjects["question"]), max_new_tokens)
    known = [mentions(a, o) for a, o in zip(answers, subjects["object"])]
    return subjects.assign(answer=answers, known=known).reset_index(drop=True)


def conditions(
    run: Run,
    filename: str,
    specs: dict[str, Callable[[], pd.DataFrame]],
    judge: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
    **settings,
) -> pd.DataFrame:
    """Each condition's frame (``specs[name]()``: one ``superscopes.run``), judged by ``judge`` and
    stored as it finishes under a ``condition`` column; a rerun with the same settings skips
    finished conditions."""
    store = run.store(filename, ["condition"], **settings)
    for name in run.pending(store, list(specs), key=lambda name: [name]):
        frame = specs[name]()
        frame = frame.drop(columns=[c for c in ("output_ids",) if c in frame]).assign(condition=name)
        store.append(judge(frame) if judge else frame)
    frame = store.load()
    missing = set(specs) - set(frame["condition"]) if len(frame) else set(specs)
    if missing:
        raise SystemExit(f"{store.path} lacks condition(s) {sorted(missing)}; rerun to finish it")
    return frame


def other_sources(labels: list, seed: int) -> list[int]:
    """For each item, the index of another item (seeded) whose label differs from its own, or of
    any other item when none differs (itself only when alone): the shuffled-source controls'
    assignment, so that a control source never carries the right answer by construction."""
    rng, n = random.Random(seed), len(labels)
    out = []
    for i in range(n):
        others = [j for j in range(n) if j != i and labels[j] != labels[i]] or [j for j in range(n) if j != i] or [i]
        out.append(rng.choice(others))
    return out


def comparisons(run: Run, scores: pd.DataFrame, pairs: list[tuple[str, str]], filename: str) -> pd.DataFrame:
    """``metrics.compare_all`` of ``scores`` (one row per prompt), written to ``filename``."""
    table = metrics.compare_all(scores, pairs, seed=run.args.seed)
    table.to_csv(run.out / filename, index=False)
    return table
