"""The grid inside the user's own nnsight session (``superscopes.Grid``), and the user's own
``intervene`` function inside every pass of the grid: locally and under ``remote="local"``."""

from __future__ import annotations

import warnings

import pytest
import torch

import superscopes
from superscopes import Grid, Scope, ScopeError, ops, run

PROMPTS = ["Diana, Princess of Wales", "Back to the Future"]
REMOTES = [False, "local"]


def small_grid(**overrides) -> Scope:
    settings = dict(prompts=PROMPTS, sites=["resid_post"], layers=[1], alphas=[1, 4], max_new_tokens=3)
    return Scope(**{**settings, **overrides})


def ablate_mlp0(model):
    """A user's ablation (Llama layout): layer 0's MLP writes nothing."""
    model.model.layers[0].mlp.output[:] = 0


def run_ablated(model, scope: Scope):
    """The grid on a model whose layer-0 MLP is ablated by a plain torch hook (no nnsight)."""
    handle = model._module.model.layers[0].mlp.register_forward_hook(lambda module, inputs, output: output * 0)
    try:
        return run(model, scope, progress=False)
    finally:
        handle.remove()


def columns(frame, names=("output", "output_ids")):
    return frame[list(names)].to_dict("list")


@pytest.mark.parametrize("remote", REMOTES)
@pytest.mark.parametrize("output", ["generate", "topk"])
def test_grid_in_a_session_equals_a_plain_run(tiny_models, remote, output):
    """The user's own trace and the grid share one session; the grid's frame is run()'s."""
    model = tiny_models["llama"]
    scope = small_grid(output=output, top_k=3)
    grid = Grid(model, scope)
    with model.session(remote=remote):
        with model.trace("The Eiffel Tower is in"):
            hidden = model.model.layers[1].output[:, -1].save()
        outputs = grid.run()
    frame = grid.frame(outputs)
    assert len(frame) == len(grid) == 4
    plain = run(model, scope, progress=False)
    assert columns(frame) == columns(plain)
    assert list(frame.columns) == list(plain.columns)
    assert hidden.shape == (1, 64)  # the user's own value left the session too


@pytest.mark.parametrize("remote", REMOTES)
@pytest.mark.parametrize("output", ["generate", "topk"])
def test_an_ablation_in_the_session_equals_the_grid_on_the_ablated_model(tiny_models, remote, output):
    """``intervene`` reaches the grid's reads, shared prefixes and every generated token, so the
    grid with the user's ablation is the grid of a model ablated with a torch hook."""
    model = tiny_models["llama"]
    grid = Grid(model, small_grid(output=output, intervene=ablate_mlp0))
    with model.session(remote=remote):
        outputs = grid.run()
    frame = grid.frame(outputs)
    expected = run_ablated(model, small_grid(output=output))
    assert columns(frame) == columns(expected)
    assert columns(frame) != columns(run(model, small_grid(output=output), progress=False))  # the ablation matters


@pytest.mark.parametrize("remote", REMOTES)
def test_intervene_values_join_the_frame_per_cell(tiny_models, remote):
    """What ``intervene`` returns is one column, each cell its own batch row: here the residual
    entering layer 1 at the patched position, where the grid wrote alpha x the source vector
    (read at layer 1, written back at layer 0)."""
    model = tiny_models["llama"]

    def entering_layer_1(m):
        return {"written_norm": ops.activation(m, "resid_pre", 1)[:, -1].norm(dim=-1)}

    scope = small_grid(target_layers=[0], target="source", output="topk", alphas=[1, 2, 5], intervene=entering_layer_1)
    frame = run(model, scope, remote=remote, progress=False)
    with model.trace(PROMPTS):  # the source vectors: each prompt's last token at layer 1
        norms = ops.read(model, "resid_post", 1, -1).norm(dim=-1).save()
    expected = [norms[PROMPTS.index(s)].item() * a for s, a in zip(frame["source"], frame["alpha"])]
    assert frame["written_norm"].tolist() == pytest.approx(expected, rel=1e-4)


def test_intervene_that_returns_nonsense_is_named(tiny_models):
    model = tiny_models["llama"]
    for returned, message in [
        (lambda m: 3, "intervene must return None or a dict of tensors"),
        (lambda m: {"output": m.model.layers[0].output[:, -1]}, "'output' is one of the frame's own"),
        (lambda m: {"x": m.model.layers[0].output[0, -1, 0]}, r"one row per batch row \(4\), got \[\]"),
    ]:
        with pytest.raises(ScopeError, match=message):
            run(model, small_grid(output="topk", intervene=returned), progress=False)


@pytest.mark.parametrize("tracer", ["session", "trace"])
def test_run_inside_a_session_or_trace_says_to_use_a_grid(tiny_models, tracer):
    """Today this was a NameError or "'NoneType' object has no attribute 'event'"."""
    model = tiny_models["llama"]
    opened = model.session() if tracer == "session" else model.trace("Hello")
    with pytest.raises(ScopeError, match=r"grid = superscopes.Grid\(model, scope\)"):
        with opened:
            superscopes.run(model, small_grid(), progress=False)


def test_frame_takes_what_run_returned(tiny_models):
    grid = Grid(tiny_models["llama"], small_grid())
    with pytest.raises(ScopeError, match=r"outputs = grid.run\(\)"):
        grid.frame(None)


def test_what_a_remote_session_sends_of_a_grid_is_only_its_passes(tiny_models):
    shipped, (model, target_model, work) = Grid(tiny_models["llama"], small_grid(intervene=ablate_mlp0)).__reduce__()
    assert shipped.__name__ == "ShippedGrid" and model is target_model is tiny_models["llama"]
    assert work.settings.intervene is ablate_mlp0
    assert torch.is_tensor(work.patch_passes[0].alphas)


def test_python_cli_and_recipes_share_one_thread_default(tiny_models):
    """``run`` sets torch's threads to the CLI's and the recipes' default while it runs, and
    restores them after; ``threads=None`` keeps torch's own."""
    from recipes._common import parser as recipe_parser
    from superscopes.cli import build_parser
    from superscopes.parsing import DEFAULT_THREADS

    seen = []

    def record(model):
        seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(tiny_models["llama"], small_grid(output="topk", intervene=record), progress=False)
        run(tiny_models["llama"], small_grid(output="topk", intervene=record), progress=False, threads=None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert DEFAULT_THREADS == 1 and set(seen[:2]) == {DEFAULT_THREADS} and seen[-1] == 2
    assert build_parser().parse_args(["scope", "x"]).threads == DEFAULT_THREADS
    assert recipe_parser("x", "a recipe").parse_args([]).threads == DEFAULT_THREADS
    with pytest.raises(ScopeError, match="threads must be a positive integer"):
        run(tiny_models["llama"], small_grid(), progress=False, threads=0)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_generation_every_row_ends_early_returns_only_new_tokens(tokenizer, share_prefix):
    """When every row of a pass reaches the end token before max_new_tokens, the outputs are
    the new tokens only (not the tail of the prompt), with intervene's values kept."""
    from .conftest import build_tiny

    model = build_tiny("llama", tokenizer)
    scope = small_grid(prompts=PROMPTS[:1], alphas=[1], max_new_tokens=6, share_prefix=share_prefix)
    full = run(model, scope, progress=False)["output_ids"][0]
    model._module.generation_config.eos_token_id = full[1]  # every row now stops after two tokens
    scope.intervene = lambda m: {"norm": m.model.layers[1].output[:, -1].norm(dim=-1)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # intervene's step loop cut short by the end is by design, not news
        frame = run(model, scope, progress=False)
    assert frame["output_ids"][0] == full[:2] and frame["norm"][0] > 0
    grid = Grid(model, scope)
    assert grid.frame(grid.run())["output_ids"].tolist() == [full[:2]]  # run() outside a session: here and now


def test_intervene_runs_before_the_grids_reads_and_writes_at_the_same_module(tiny_models):
    """Its edit is part of the model the grid reads (v = the constant it writes) and the grid's
    write comes after it (the residual entering layer 1 is alpha x v, not its constant)."""

    def constant_layer_0(m):
        ops.activation(m, "resid_post", 0)[:] = 5.0
        return {"entering": ops.activation(m, "resid_pre", 1)[:, -1].norm(dim=-1)}

    scope = small_grid(layers=[0], target_layers=[0], target="source", output="topk", intervene=constant_layer_0)
    frame = run(tiny_models["llama"], scope, progress=False)
    assert frame["entering"].tolist() == pytest.approx([40.0 * a for a in frame["alpha"]])  # |5 x ones(64)| = 40
