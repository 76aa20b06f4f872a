"""``judge``: each readout's similarity to the source prompt it should describe, by the
sentence-embedding judge (``superscopes.judge``; all-MiniLM-L6-v2 by default), and whether it
merely echoes the source token or the target prompt's examples (then it never counts as a hit)."""

from __future__ import annotations

from superscopes.readouts.base import Readout


class JudgeScores(Readout):
    name = "judge"
    columns = ("similarity", "echo")
    stage = "frame"
    description = "the judge's cosine similarity of the output to the source prompt, and the echo flag"

    def __init__(self, judge=None):
        self.judge = judge  # a superscopes.judge.Judge; None: the default judge, loaded when first needed

    def annotate(self, model, target_model, scope, frame, remote, vectors) -> dict[str, list]:
        from superscopes import judge

        # A cell patched into its own source prompt has target "source": echoes are of that prompt.
        own = frame.assign(target=frame["target"].where(frame["target"] != "source", frame["source"]))
        scored = judge.score(own, judge=self.judge)
        return {"similarity": scored["similarity"].tolist(), "echo": scored["echo"].tolist()}
