"""The ``superscopes`` command line: scope, judge, models (and the recipe / remote / app verbs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from superscopes.models import DEFAULT_MODEL


def parse_layers(text: str) -> list[int] | str:
    """``all``, ``3``, ``1-7`` or ``1,3,5-7``."""
    if text == "all":
        return "all"
    layers: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            layers += list(range(int(low), int(high) + 1)) if high else [int(low)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers {text!r}: use 'all', '3', '1-7' or '1,3,5-7'") from None
    return layers


def parse_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def parse_target_layers(text: str) -> list[int | str]:
    try:
        return [x if x == "same" else int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"target layer {text!r}: use 0, same, an integer, or a comma list") from None


def save_table(frame: pd.DataFrame, path: str | Path) -> None:
    """CSV or Parquet by extension; list columns (token ids) stay lists in Parquet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)


def read_table(path: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise ValueError(f"cannot read {path!r} as a table: {error}") from None


def _print_readout(frame: pd.DataFrame) -> None:
    columns = ["token", "site", "layer", "target_layer", "transform", "alpha"]
    if "similarity" in frame.columns:
        columns += ["similarity", "best"]
    shown = frame[columns + ["output"]].copy()
    shown["output"] = shown["output"].map(lambda s: repr(s)[1:-1][:80])
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 82):
        print(shown.to_string(index=False))


def cmd_scope(args: argparse.Namespace) -> None:
    import superscopes
    from superscopes import judge

    model = superscopes.load(args.model, remote=args.remote)
    scope = superscopes.Scope(
        args.prompt, token=args.token, position=args.position, all_tokens=args.all_tokens,
        sites=args.sites.split(","), layers=args.layers, alphas=args.alphas, transforms=[args.transform],
        target=args.target, target_layers=args.target_layer, max_new_tokens=args.max_new_tokens,
        do_sample=args.seed is not None and args.sample, seed=args.seed, batch_size=args.batch_size,
    )  # fmt: skip
    frame = superscopes.run(model, scope, remote=args.remote)
    if args.judge:
        frame = judge.score(frame)
        winners = judge.best(frame, ["token", "site", "layer", "target_layer"])
        key = ["token", "site", "layer", "target_layer", "alpha"]
        marked = set(map(tuple, winners[key].itertuples(index=False)))
        frame["best"] = ["*" if tuple(r) in marked else "" for r in frame[key].itertuples(index=False)]
    _print_readout(frame)
    if args.out:
        save_table(frame, args.out)
        print(f"wrote {len(frame)} rows to {args.out}", file=sys.stderr)


def cmd_judge(args: argparse.Namespace) -> None:
    from superscopes import judge

    frame = judge.score(read_table(args.file), args.source_col, args.output_col)
    if args.group_cols:
        winners = judge.best(frame, args.group_cols.split(","), args.threshold)
        with pd.option_context("display.max_rows", None, "display.width", 200):
            print(winners[[*args.group_cols.split(","), "similarity", "success"]].to_string(index=False))
        print(f"{int(winners['success'].sum())}/{len(winners)} groups above {args.threshold}")
    if args.out:
        save_table(frame, args.out)
        print(f"wrote {len(frame)} rows to {args.out}", file=sys.stderr)


def cmd_models(args: argparse.Namespace) -> None:
    from superscopes.models import list_models

    print(pd.DataFrame(list_models())[["name", "cached", "source", "licence", "path"]].to_string(index=False))


def cmd_remote_status(args: argparse.Namespace) -> None:
    from superscopes.models import resolve_remote_id
    from superscopes.remote import status_report

    rows = status_report(resolve_remote_id(args.model) if args.model else None)
    for check, ok, sentence in rows:
        print(f"{'ok ' if ok else 'NO '} {check:8} {sentence}")
    if not all(ok for _, ok, _ in rows):
        raise RuntimeError("the remote set-up is not ready (see the lines marked NO)")


def cmd_recipe(args: argparse.Namespace) -> None:
    import importlib

    from recipes import RECIPES

    if args.name not in RECIPES:
        raise ValueError(f"unknown recipe {args.name!r}; recipes: {', '.join(RECIPES)}")
    importlib.import_module(f"recipes.{args.name}").main(args.recipe_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="superscopes", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    scope = verbs.add_parser("scope", help="amplify and patch one prompt's activations, print the readouts")
    scope.add_argument("prompt")
    where = scope.add_mutually_exclusive_group()
    where.add_argument("--token", help="substring of the prompt; its first match's last token (default: last token)")
    where.add_argument("--position", type=int, help="token index (BOS counts; negative from the end)")
    where.add_argument("--all-tokens", action="store_true")
    scope.add_argument("--sites", default="mlp_out,resid_post", help="comma list of resid_pre,attn_out,mlp_in,mlp_out,resid_post")
    scope.add_argument("--layers", type=parse_layers, default=parse_layers("1-7"))
    scope.add_argument("--alphas", type=parse_floats, default=[1, 3, 6, 9, 12, 15])
    scope.add_argument("--transform", default="scale", choices=["scale", "cfg", "norm"])
    scope.add_argument("--target-layer", type=parse_target_layers, default=[0], help="0, same, INT or a comma list")
    scope.add_argument("--target", default="entity", help="'entity', 'identity', or a template containing x")
    scope.add_argument("--max-new-tokens", type=int, default=10)
    scope.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF repo id or local directory")
    scope.add_argument("--remote", action="store_true", help="run on NDIF (NDIF_HOST, NDIF_API_KEY)")
    scope.add_argument("--judge", action="store_true", help="add MiniLM similarity and mark the best alpha")
    scope.add_argument("--seed", type=int, help="seed for sampled generation (with --sample)")
    scope.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (needs --seed)")
    scope.add_argument("--batch-size", type=int, default=64, help="patched rows per forward pass")
    scope.add_argument("--out", help="write the table (.csv or .parquet)")
    scope.set_defaults(func=cmd_scope)

    judge = verbs.add_parser("judge", help="add a MiniLM similarity column to a table")
    judge.add_argument("file")
    judge.add_argument("--source-col", required=True)
    judge.add_argument("--output-col", required=True)
    judge.add_argument("--group-cols", help="comma list: print each group's best similarity and success")
    judge.add_argument("--threshold", type=float, default=0.3)
    judge.add_argument("--out")
    judge.set_defaults(func=cmd_judge)

    models = verbs.add_parser("models", help="list the embedded models and their cache state")
    models.set_defaults(func=cmd_models)

    app = verbs.add_parser("app", help="the Superscopes explorer: a web page on 127.0.0.1")
    from superscopes.app.server import add_arguments, cmd_app

    add_arguments(app)
    app.set_defaults(func=cmd_app)

    remote = verbs.add_parser("remote", help="NDIF: check the server, versions, key and model")
    remote_verbs = remote.add_subparsers(dest="remote_verb", required=True)
    status = remote_verbs.add_parser("status", help="is the server reachable, compatible, the model deployed?")
    status.add_argument("model", nargs="?", help="embedded name, repo id or served directory")
    status.set_defaults(func=cmd_remote_status)

    recipe = verbs.add_parser("recipe", help="run a paper experiment: superscopes recipe NAME [--quick] ...",
                              add_help=False)  # fmt: skip
    recipe.add_argument("name")
    recipe.add_argument("recipe_args", nargs=argparse.REMAINDER)
    recipe.set_defaults(func=cmd_recipe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "sample", False) and args.seed is None:
        print("superscopes: error: --sample needs --seed (sampled readouts must be reproducible)", file=sys.stderr)
        return 2
    try:
        status = args.func(args)
    except (ValueError, KeyError, RuntimeError) as error:
        from superscopes.remote import redact

        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"superscopes: error: {redact(str(message))}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
