"""Superscopes' hidden-state examples: plain and amplified block outputs patched into layer 0.

The authors' notebook (GalNivs/Superscopes, code/hidden_states_amplification.ipynb, tests 1-3) reads
the hidden state (block output, HF ``hidden_states[l+1]``) of an example's token of Llama-2-13b-chat,
first plain at a range of layers, then times alpha at the layers just before the one where it becomes
readable, always written over the residual output of layer 0 (``patchscope_interpret``'s default) at
"x" of the entity-description prompt; 10 new tokens:

- "Alexander the Great" / "Great": plain layers 4-7; amplified layers 4-5, alpha 2-6 (``range(2, 7)``);
- "Red Hot Chili Peppers" / "ppers": plain layers 2-4; amplified layer 3, alpha 1.3, 1.5, 1.7, 1.9 (run
  twice in the notebook, with different texts: its generation was sampled);
- "Florence and the Machine" / "Machine": plain layers 9-11; amplified layers 7-9, alpha 3-21
  (``range(3, 24, 3)``).

Counted as in ``superscopes_mlp_outputs`` (readouts that name the entity and are not echoes, with the
MiniLM judge beside them). Deviations: SmolLM2 at the notebook's layer indices (not depth-mapped);
greedy decoding where the notebook sampled with Llama-2-chat's generation config.
"""

from __future__ import annotations

import functools

from ._common import Run, recipe_main
from .superscopes_mlp_outputs import Readout, build_parser, run_examples

NAME = "superscopes_hidden_states"
DESCRIPTION = __doc__.splitlines()[0]

HIDDEN = ("resid_post",)


def notebook_pair(source: str, token: str, plain: range, amplified: range, alphas) -> list[Readout]:
    """A test of hidden_states_amplification.ipynb: plain, then amplified, both into layer 0."""
    return [
        Readout(source, token, "plain", HIDDEN, tuple(plain), (1,), 0),
        Readout(source, token, "amplified", HIDDEN, tuple(amplified), tuple(alphas), 0),
    ]


READOUTS = [
    *notebook_pair("Alexander the Great", "Great", range(4, 8), range(4, 6), range(2, 7)),
    *notebook_pair("Red Hot Chili Peppers", "ppers", range(2, 5), range(3, 4), (1.3, 1.5, 1.7, 1.9)),
    *notebook_pair("Florence and the Machine", "Machine", range(9, 12), range(7, 10), range(3, 24, 3)),
]
PAPER = (
    "Llama-2-13b-chat, read by eye, no count: amplified hidden states read 'Ancient Greek king' / 'The "
    "Macedonian king' ('Great', layers 4-5, α 3), 'The band' / 'Rock band' ('ppers', layer 3, α 1.5), 'is a "
    "British rock band' ('Machine', layer 9, α 12), one layer or more before the plain readout does"
)


def experiment(run: Run) -> None:
    run_examples(run, READOUTS, "Superscopes hidden-state examples", PAPER)


main = recipe_main(NAME, functools.partial(build_parser, NAME, DESCRIPTION), experiment)

if __name__ == "__main__":
    main()
