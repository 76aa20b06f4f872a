"""Inputs do what they say: layer/alpha/site syntax, whole-token matching, --out checks, --help."""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import pytest
import torch

from recipes import RECIPES
from superscopes import Scope, ScopeError
from superscopes.cli import main
from superscopes.parsing import HelpFormatter, parse_layers, parse_names
from superscopes.prompts import TokenNotFoundError, find_token


@pytest.mark.parametrize(
    "text,layers",
    [("1-7", [1, 2, 3, 4, 5, 6, 7]), ("1,3,5", [1, 3, 5]), ("all", "all"), ("1-3, 7", [1, 2, 3, 7]), ("4", [4])],
)
def test_one_layer_syntax(text, layers):
    assert parse_layers(text) == layers


@pytest.mark.parametrize(
    "text,message",
    [
        ("3-1", "the range '3-1' is reversed; write 1-3"),
        ("1,,3", "'' is not a layer or range"),
        ("x", "'x' is not a layer"),
    ],
)
def test_bad_layers_are_named(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_layers(text)


def test_sites_strip_spaces():
    assert parse_names("mlp_out, resid_post") == ["mlp_out", "resid_post"]


def test_the_placeholder_is_a_whole_token(tokenizer):
    """The x patched is the first word, not the x inside "Explain"."""
    assert find_token(tokenizer, "x is a complex idea. Explain", "x", last_occurrence=True) == 0


def test_a_sub_piece_of_a_word_is_an_error_naming_the_word(tokenizer):
    with pytest.raises(
        TokenNotFoundError,
        match="token 'Wales' is only part of 'Walesa' in the prompt 'Lech Walesa'; give a whole word or token",
    ):
        find_token(tokenizer, "Lech Walesa", "Wales")
    assert find_token(tokenizer, "Red Hot Chili Peppers", "ppers") == 5  # a whole token ending the word is fine


def scope_argv(out, *extra: str) -> list[str]:
    return [
        "scope",
        "Diana, Princess of Wales",
        "--token",
        "Wales",
        "--sites",
        "mlp_out",
        "--layers",
        "1",
        "--max-new-tokens",
        "2",
        "--out",
        str(out),
        *extra,
    ]


def test_negative_alphas_and_spaced_sites_parse(tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert main([*scope_argv(out, "--alphas", "-3,6"), "--sites", "mlp_out, resid_post"]) == 0
    assert "vector written at target token ' x' (position 29)" in capsys.readouterr().out
    frame = pd.read_csv(out)
    assert sorted(set(frame["alpha"])) == [-3.0, 6.0] and set(frame["site"]) == {"mlp_out", "resid_post"}


@pytest.mark.parametrize(
    "name,message", [("t.xlsx", "extension '.xlsx'; use one of .csv, .parquet"), ("missing/dir/t.csv", None)]
)
def test_out_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, name, message):
    import superscopes

    monkeypatch.setattr(superscopes, "load", lambda *a, **k: pytest.fail("loaded the model before checking --out"))
    if message is None:  # a folder that cannot be created
        (tmp_path / "missing").write_text("a file, not a folder")
        message = "is not writable"
    assert main(scope_argv(tmp_path / name)) == 2
    assert message in capsys.readouterr().err


def test_an_existing_output_of_another_grid_needs_force(tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert main(scope_argv(out, "--alphas", "1")) == 0
    assert main(scope_argv(out, "--alphas", "1")) == 0  # the same grid: rewritten
    assert main(scope_argv(out, "--alphas", "6")) == 2
    assert "holds another grid (alpha: file [1.0], now [6.0])" in capsys.readouterr().err
    assert set(pd.read_csv(out)["alpha"]) == {1.0}
    assert main(scope_argv(out, "--alphas", "6", "--force")) == 0
    assert set(pd.read_csv(out)["alpha"]) == {6.0}


def test_an_existing_file_that_is_not_a_table_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "t.csv"
    out.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff binary")
    assert main(scope_argv(out)) == 2
    assert f"cannot read '{out}' as a table" in capsys.readouterr().err
    assert out.read_bytes().startswith(b"\x89PNG")


def test_scope_help_shows_defaults_and_every_choice(capsys):
    with pytest.raises(SystemExit):
        main(["scope", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "{scale,cfg,norm,affine,random,latent}" in text
        and "(default: 1-7)" in text
        and "(default: 1,3,6,9,12,15)" in text
    )
    assert "resid_pre, attn_out, mlp_in, mlp_out, resid_post" in text and "(default: smollm2-135m)" in text


def test_recipe_help_prints_the_recipes_help(capsys):
    with pytest.raises(SystemExit):
        main(["recipe", "superscopes_hidden_states", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "python -m superscopes.recipes.superscopes_hidden_states" in text
        and "--max-new-tokens" in text
        and "(default: smollm2-135m)" in text
    )


# ---------------------------------------------------------------- the grid's validation (no forward pass)


@pytest.fixture(scope="module")
def smollm2_plan(smollm2):
    from superscopes.scope import plan

    return lambda **kwargs: plan(smollm2, Scope("Diana, Princess of Wales", **kwargs))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(sites=[]), "no sites given"),
        (dict(alphas=[]), "no alphas given"),
        (dict(transforms=[]), "no transforms given"),
        (dict(target_layers=[]), "no target_layers given"),
        (dict(output="topk", top_k=0), "top_k 0 must be a whole number in 1-49152"),
        (dict(output="topk", top_k=49153), "top_k 49153 must be a whole number in 1-49152"),
        (dict(do_sample=True, temperature=0), "temperature 0 must be a finite number above 0"),
        (dict(do_sample=True, temperature=float("nan")), "temperature nan must be a finite number above 0"),
        (dict(max_new_tokens=2.5), "max_new_tokens 2.5 must be a whole number, at least 1"),
        (dict(max_new_tokens=0), "max_new_tokens 0 must be a whole number, at least 1"),
        (dict(alphas=[1, 1e39]), r"alpha 1e\+39 overflows the model's dtype"),
        (
            dict(transforms=["affine"], affine_weight=torch.eye(3)),
            r"affine_weight must be a tensor of shape \[576, 576\], got \(3, 3\)",
        ),
        (
            dict(transforms=["affine"], affine_weight=torch.full((576, 576), float("inf"))),
            "affine_weight has non-finite values",
        ),
        (
            dict(transforms=["affine"], affine_weight=torch.eye(576), affine_bias=torch.zeros(5)),
            r"affine_bias must be a tensor of shape \[576\]",
        ),
    ],
)
def test_bad_settings_are_named_before_any_forward_pass(smollm2_plan, kwargs, message):
    with pytest.raises(ScopeError, match=message):
        smollm2_plan(**kwargs)


def test_a_huge_grid_fails_fast_without_allocating(smollm2_plan):
    start = time.process_time()
    with pytest.raises(ScopeError, match="over max_cells"):
        smollm2_plan(do_sample=True, samples=10**9)
    assert time.process_time() - start < 5


def test_a_prompt_longer_than_the_context_is_refused(smollm2):
    from superscopes.scope import plan

    with pytest.raises(ScopeError, match="over smollm2-135m's context of 8192 tokens"):
        plan(smollm2, Scope("Diana " * 8200))
    with pytest.raises(ScopeError, match=r"\(\+10 generated\): over smollm2-135m's context"):
        plan(smollm2, Scope("Diana", target="x " * 8185))


def test_integer_like_layers_work(smollm2_plan):
    cells = smollm2_plan(layers=np.arange(1, 3), target_layers=[np.int64(0)], sites=["mlp_out"], alphas=[1]).cells
    assert [(c.layer, c.target_layer) for c in cells] == [(1, 0), (2, 0)]
    assert all(type(c.layer) is int for c in cells)
    assert len(smollm2_plan(layers=np.int64(4), sites=["mlp_out"], alphas=[1]).cells) == 1
    with pytest.raises(ScopeError, match="layer 2.5 is out of range"):
        smollm2_plan(layers=2.5)
    assert len(smollm2_plan(layers=torch.arange(2), sites=["mlp_out"], alphas=[1]).cells) == 2
    assert [c.alpha for c in smollm2_plan(layers=[1], sites=["mlp_out"], alphas=np.arange(1, 3)).cells] == [1.0, 2.0]


def test_an_amplified_vector_that_overflows_is_refused():
    from superscopes.scope import refuse_overflow

    vectors = torch.tensor([[1.0, -300.0]])
    entry, norm = vectors.abs().max().item(), vectors.norm(dim=-1).max().item()
    refuse_overflow(entry, norm, [1, 200], torch.float16)
    with pytest.raises(
        ScopeError, match=r"alpha 300 times the read vectors \(largest entry 300\) overflows torch.float16"
    ):
        refuse_overflow(entry, norm, [1, 300], torch.float16)


def test_affine_transform_from_the_command_line(tmp_path, capsys):
    """--transform affine with an identity map reads out what scale does; without a map it is an error."""
    torch.save({"weight": torch.eye(576), "bias": torch.zeros(576)}, tmp_path / "map.pt")
    outputs = {}
    for transform, extra in (("scale", []), ("affine", ["--affine-map", str(tmp_path / "map.pt")])):
        out = tmp_path / f"{transform}.csv"
        assert main([*scope_argv(out, "--alphas", "6"), "--transform", transform, *extra]) == 0
        outputs[transform] = pd.read_csv(out, keep_default_na=False)["output"].tolist()
    assert outputs["affine"] == outputs["scale"]
    assert main([*scope_argv(tmp_path / "x.csv"), "--transform", "affine"]) == 2
    assert "--transform affine and --affine-map FILE go together" in capsys.readouterr().err


def test_latent_transform_from_the_command_line(tmp_path, capsys):
    """--transform latent --latent N amplifies that latent of the embedded SAE (resid_post 15):
    alpha 1 is the plain readout; without --latent it is an error before the model loads."""
    outputs = {}
    for transform, extra in (("scale", []), ("latent", ["--latent", "7"])):
        out = tmp_path / f"{transform}.csv"
        argv = [*scope_argv(out, "--alphas", "1"), "--sites", "resid_post", "--layers", "15", "--transform", transform]
        assert main([*argv, *extra]) == 0
        outputs[transform] = pd.read_csv(out, keep_default_na=False)["output"].tolist()
    assert outputs["latent"] == outputs["scale"]
    assert main([*scope_argv(tmp_path / "x.csv"), "--transform", "latent"]) == 2
    assert "--transform latent and --latent N go together" in capsys.readouterr().err


def _parsers(parser: argparse.ArgumentParser, name: str):
    """``parser`` and every sub-command parser below it, with a readable name."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {verb}")


def test_every_help_shows_every_default():
    """Every option with a default says it in --help: the CLI, its module verbs (corpus,
    inverse, sae), the explorer and every recipe."""
    import importlib

    from superscopes import cli
    from superscopes.app import server

    roots = [
        ("superscopes", cli.build_parser()),
        ("superscopes app", server.add_arguments(argparse.ArgumentParser(formatter_class=HelpFormatter))),
    ]
    roots += [
        (f"superscopes {verb}", importlib.import_module(f"superscopes.{verb}").build_parser())
        for verb in cli.MODULE_VERBS
    ]
    roots += [(f"recipe {name}", importlib.import_module(f"recipes.{name}").build_parser()) for name in RECIPES]
    missing = []
    for root, parser in roots:
        for name, sub in _parsers(parser, root):
            formatter = sub._get_formatter()
            for action in sub._actions:
                if action.default in (None, False, "", argparse.SUPPRESS) or not action.option_strings:
                    continue
                if "default" not in (formatter._get_help_string(action) or "").lower():
                    missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing
