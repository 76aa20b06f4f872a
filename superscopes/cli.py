"""The ``superscopes`` command line: scope, judge, models (and the recipe / remote / app verbs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from superscopes import ops
from superscopes.models import DEFAULT_MODEL
from superscopes.parsing import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_THREADS,
    LAYER_SYNTAX,
    USER_ERRORS,
    CommandParser,
    error_line,
    join_negative_values,
    parse_floats,
    parse_layers,
    parse_names,
    parse_target_layers,
)
from superscopes.prompts import TEMPLATES
from superscopes.results import check_table_path, read_table, save_table
from superscopes.sites import SITE_NAMES

if TYPE_CHECKING:
    from superscopes.models import Model

__all__ = ["build_parser", "main", "parse_floats", "parse_layers", "parse_target_layers", "read_table", "save_table"]


def _check_out(path: str | None, force: bool) -> None:
    """Before any model load or forward pass: a writable table path, not silently replaced."""
    if path is None:
        return
    check_table_path(path)
    if Path(path).exists() and not force and Path(path).stat().st_size > 0:
        read_table(path)  # a file that is not a table is never overwritten without --force


def _grid_differences(existing: pd.DataFrame, planned: dict[str, list]) -> list[str]:
    """Columns whose values in an existing output differ from the planned grid's."""
    differs = []
    for column, values in planned.items():
        old = set(existing[column]) if column in existing.columns else set()
        if old != set(values):
            differs.append(f"{column}: file {sorted(old, key=str)}, now {sorted(set(values), key=str)}")
    return differs


def _print_readout(frame: pd.DataFrame, extra: list[str] = ()) -> None:
    """The readouts, one line per cell; ``extra``: further readouts' columns, shortened."""
    columns = ["token", "site", "layer", "target_layer", "transform", "alpha"]
    columns += [c for c in ("similarity", "echo", "best") if c in frame.columns]  # an echo is never the best
    extra = [c for c in extra if c not in columns]
    shown = frame[columns + ["output", *extra]].copy()
    shown["output"] = shown["output"].map(lambda s: repr(s)[1:-1][:80])
    for column in extra:
        shown[column] = shown[column].map(lambda v: str(v)[:40])
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 82):
        print(shown.to_string(index=False))


def _affine_map(path: str | None, transform: str) -> dict:
    if (transform == "affine") != (path is not None):
        raise ValueError("--transform affine and --affine-map FILE go together")
    if path is None:
        return {}
    from superscopes.files import load_torch

    saved = load_torch(path)
    if not isinstance(saved, dict) or "weight" not in saved:
        raise ValueError(f"--affine-map {path!r} must be a torch file of a dict with 'weight' (and 'bias')")
    return {"affine_weight": saved["weight"], "affine_bias": saved.get("bias")}


def _sae_latent(args: argparse.Namespace, model: Model, chosen: dict) -> dict:
    """``--transform latent --latent N [--sae PATH]``: the model's embedded SAE by default.
    With ``--readout sae`` too (``chosen``: ``_readouts``), ``--sae`` is the SAE that readout decomposes with."""
    if args.latent is None and not (args.sae and "sae" in chosen["readouts"]):
        return {}
    from superscopes import readouts, sae

    loaded = sae.load(args.sae or args.model, model=model)
    if args.sae:
        readouts.register(readouts.SAEDecomposition(loaded))
    return {} if args.latent is None else {"sae_latent": (loaded, args.latent)}


def _readouts(groups: list[list[str]] | None) -> dict:
    """``--readout NAME`` (repeatable, or a comma list) as ``Scope`` settings: at most one primary
    readout (``output``, default ``generate``), the rest ``readouts``. Checked before the model loads."""
    from superscopes import readouts

    names = list(dict.fromkeys(name for group in groups or [] for name in group))
    for name in names:
        if name not in readouts.REGISTRY:
            raise ValueError(f"--readout {name!r} is not a readout; choose from {', '.join(readouts.REGISTRY)}")
    primary = [name for name in names if readouts.REGISTRY[name].primary]
    if len(primary) > 1:
        choices = ", ".join(r.name for r in readouts.REGISTRY.values() if r.primary)
        raise ValueError(f"--readout {' and '.join(primary)}: give at most one of {choices} (the output readout)")
    return {"output": primary[0] if primary else "generate", "readouts": [n for n in names if n not in primary]}


def cmd_scope(args: argparse.Namespace) -> None:
    _check_out(args.out, args.force)
    chosen = _readouts(args.readout)
    if args.judge and "judge" not in chosen["readouts"]:
        chosen["readouts"].append("judge")
    affine = _affine_map(args.affine_map, args.transform)
    if (args.transform == "latent") != (args.latent is not None):  # before the model loads
        raise ValueError("--transform latent and --latent N go together")
    import superscopes
    from superscopes import judge
    from superscopes.models import model_name
    from superscopes.sites import num_layers

    model = superscopes.load(args.model, remote=args.remote)
    latent = _sae_latent(args, model, chosen)
    scope = superscopes.Scope(
        args.prompt,
        token=args.token,
        position=args.position,
        all_tokens=args.all_tokens,
        sites=args.sites,
        layers=args.layers,
        alphas=args.alphas,
        transforms=[args.transform],
        target=args.target,
        target_layers=args.target_layer,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.seed is not None and args.sample,
        seed=args.seed,
        batch_size=args.batch_size,
        **affine,
        **latent,
        **chosen,
    )
    if args.out and Path(args.out).exists() and Path(args.out).stat().st_size > 0 and not args.force:
        layers = range(num_layers(model)) if scope.layers == "all" else scope.layers
        planned = {
            "model": [model_name(model)],
            "source": scope.prompts,
            "site": scope.sites,
            "layer": list(layers),
            "alpha": [float(a) for a in scope.alphas],
            "transform": scope.transforms,
        }
        differs = _grid_differences(read_table(args.out), planned)
        if differs:
            raise ValueError(
                f"{args.out} holds another grid ({'; '.join(differs)}); "
                "choose another --out or pass --force to overwrite it"
            )
    frame = superscopes.run(model, scope, remote=args.remote, threads=args.threads)
    if args.judge:  # the judge readout has scored each row
        winners = judge.best(frame, ["token", "site", "layer", "target_layer"])
        key = ["token", "site", "layer", "target_layer", "alpha"]
        marked = set(map(tuple, winners[key].itertuples(index=False)))
        frame["best"] = ["*" if tuple(r) in marked else "" for r in frame[key].itertuples(index=False)]
    from superscopes import readouts

    _print_readout(frame, [c for name in chosen["readouts"] for c in readouts.REGISTRY[name].columns])
    print(_target_tokens(frame, model.tokenizer))
    if args.out:
        save_table(frame, args.out)
        print(f"wrote {len(frame)} rows to {args.out}", file=sys.stderr)


def _target_tokens(frame: pd.DataFrame, tokenizer) -> str:
    """Which target token received the vector, as text (the row says only its position)."""
    from superscopes.prompts import tokens

    written = []
    for row in frame[["source", "target", "target_position"]].drop_duplicates().itertuples():
        text = row.source if row.target == "source" else row.target
        written.append(f"{tokens(tokenizer, text)[row.target_position]!r} (position {row.target_position})")
    return "vector written at target token " + ", ".join(dict.fromkeys(written))


def cmd_judge(args: argparse.Namespace) -> None:
    from superscopes import judge

    if args.out:
        check_table_path(args.out)
    frame = read_table(args.file)
    groups = [c.strip() for c in args.group_cols.split(",") if c.strip()] if args.group_cols else []
    if args.target is not None and args.target_col is not None:
        raise ValueError("give --target (one prompt for every row) or --target-col (a column), not both")
    wanted = [
        args.source_col,
        args.output_col,
        *groups,
        *([args.by] if args.by else []),
        *([args.target_col] if args.target_col else []),
    ]
    missing = [c for c in dict.fromkeys(wanted) if c not in frame.columns]
    if missing:  # before the judge loads or scores anything
        raise ValueError(f"column(s) {missing} are not in {args.file}; its columns are {list(frame.columns)}")
    if args.by and args.by not in groups:
        raise ValueError(f"--by {args.by!r} must be one of --group-cols ({', '.join(groups) or 'none given'})")
    target_col = args.target_col or "target"
    frame = judge.score(
        frame, args.source_col, args.output_col, target=args.target, target_col=target_col, token_col=args.token_col
    )
    if not judge.echoes_checked(frame, args.target, target_col):
        print(
            "echoes of the target prompt's examples could not be checked: the table has no 'target' column "
            "(give --target TEXT or --target-col NAME)",
            file=sys.stderr,
        )
    if groups:
        frame = frame.reset_index(drop=True)
        winners = judge.best(frame.assign(row=frame.index), groups, args.threshold)
        with pd.option_context("display.max_rows", None, "display.width", 200):
            print(winners[[*groups, "similarity", "success"]].to_string(index=False))
        if args.by:  # e.g. the paper's successes per layer
            counts = winners.groupby(args.by)["success"].agg(successes="sum", groups="size").reset_index()
            print(counts.to_string(index=False))
        print(f"{int(winners['success'].sum())}/{len(winners)} groups above {args.threshold}")
        # For --out: each group's winning row, and whether its group passed.
        frame["winner"] = frame.index.isin(winners["row"])
        frame = frame.merge(
            winners[[*groups, "success"]].rename(columns={"success": "group_success"}), on=groups, how="left"
        )
    if "echo" in frame.columns:
        print(
            f"{int(frame['echo'].sum())} of {len(frame)} readouts echo the source token or the target's examples "
            "(never a success)"
        )
    if args.out:
        save_table(frame, args.out)
        print(f"wrote {len(frame)} rows to {args.out}", file=sys.stderr)


def cmd_models(args: argparse.Namespace) -> None:
    from superscopes.models import list_models, refetch

    if args.refetch:
        print(f"fetched {args.refetch} again into {refetch(args.refetch)}")
    print(pd.DataFrame(list_models())[["name", "cached", "source", "licence", "path"]].to_string(index=False))


def cmd_remote_status(args: argparse.Namespace) -> None:
    from superscopes.models import resolve_remote_id
    from superscopes.remote import status_report

    rows = status_report(resolve_remote_id(args.model) if args.model else None)
    for check, ok, sentence in rows:
        print(f"{'ok ' if ok else 'NO '} {check:8} {sentence}")
    if not all(ok for _, ok, _ in rows):
        raise RuntimeError("the remote set-up is not ready (see the lines marked NO)")


def recipes_package():
    """The recipes: ``superscopes.recipes`` when installed, the checkout's ``recipes/`` otherwise."""
    import importlib

    try:
        return importlib.import_module("superscopes.recipes")
    except ModuleNotFoundError:
        return importlib.import_module("recipes")


def cmd_recipe(args: argparse.Namespace) -> None:
    import importlib

    package = recipes_package()
    if args.name not in package.RECIPES:
        raise ValueError(f"unknown recipe {args.name!r}; recipes: {', '.join(package.RECIPES)}")
    importlib.import_module(f"{package.__name__}.{args.name}").main(args.recipe_args)


# Verbs whose own module parses the rest of the command line (`superscopes inverse train ...`).
MODULE_VERBS = {
    "inverse": "train, sample and evaluate InverseScope's conditional generator of inputs",
    "sae": "train a TopK sparse autoencoder on a model's site",
    "corpus": "build the offline English corpus (Debian dictionaries, glossaries, fortunes)",
}


def cmd_module(args: argparse.Namespace) -> None:
    import importlib

    importlib.import_module(f"superscopes.{args.verb}").main(args.module_args)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="superscopes", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    # Torch threads, for every verb that computes: one is fastest on a shared CPU (two threads on two
    # busy cores run many times slower), more only on an otherwise idle machine.
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads")
    scope = verbs.add_parser(
        "scope", parents=[threads], help="amplify and patch one prompt's activations, print the readouts"
    )
    scope.add_argument("prompt", help="the source prompt")
    where = scope.add_mutually_exclusive_group()
    where.add_argument(
        "--token", help="a word or whole token of the prompt; its first match's last token (default: the last token)"
    )
    where.add_argument("--position", type=int, help="token index (BOS counts; negative from the end)")
    where.add_argument("--all-tokens", action="store_true", help="every token of the prompt")
    scope.add_argument(
        "--sites", type=parse_names, default="mlp_out,resid_post", help=f"comma list of {', '.join(SITE_NAMES)}"
    )
    scope.add_argument("--layers", type=parse_layers, default="1-7", help=f"source layers: {LAYER_SYNTAX}")
    scope.add_argument("--alphas", type=parse_floats, default="1,3,6,9,12,15", help="comma list of amplifications")
    scope.add_argument(
        "--transform",
        default="scale",
        choices=ops.TRANSFORMS,
        help="how the vector is amplified (affine needs --affine-map, latent needs --latent)",
    )
    scope.add_argument("--affine-map", help="torch file of {'weight': [d, d], 'bias': [d]} for --transform affine")
    scope.add_argument("--latent", type=int, help="SAE latent whose component --transform latent amplifies")
    scope.add_argument(
        "--sae", help="SAE folder or release for --latent and --readout sae (default: the model's embedded SAE)"
    )
    scope.add_argument("--target-layer", type=parse_target_layers, default="0", help="0, same, INT or a comma list")
    scope.add_argument(
        "--target", default="entity", help=f"a template ({', '.join(TEMPLATES)}) or template text containing the word x"
    )
    scope.add_argument("--max-new-tokens", type=int, default=10, help="tokens generated per readout")
    scope.add_argument(
        "--readout",
        type=parse_names,
        action="append",
        metavar="NAME",
        help="what each cell reads out (repeatable or a comma list): generate (default) or topk, plus any of "
        "lens, affine_lens, sae, self_similarity, relevancy, judge; superscopes.readouts.available() lists them",
    )
    scope.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF repo id or local directory")
    scope.add_argument("--remote", action="store_true", help="run on NDIF (NDIF_HOST, NDIF_API_KEY)")
    scope.add_argument("--judge", action="store_true", help="add MiniLM similarity and mark the best alpha")
    scope.add_argument("--seed", type=int, help="seed for sampled generation (with --sample)")
    scope.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (needs --seed)")
    scope.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="patched rows per forward pass")
    scope.add_argument("--out", help="write the table (.csv or .parquet); checked before the run")
    scope.add_argument("--force", action="store_true", help="overwrite an --out file that holds another grid")
    scope.set_defaults(func=cmd_scope)

    judge = verbs.add_parser("judge", parents=[threads], help="add a MiniLM similarity column to a table")
    judge.add_argument("file", help="a .csv or .parquet table")
    judge.add_argument("--source-col", required=True, help="column of the texts the readouts should describe")
    judge.add_argument("--output-col", required=True, help="column of the readouts")
    judge.add_argument("--group-cols", help="comma list: print each group's best similarity and success")
    judge.add_argument("--by", help="one of --group-cols: print the successes per level of it (e.g. layer)")
    judge.add_argument("--threshold", type=float, default=0.3, help="success: best similarity above this")
    judge.add_argument("--token-col", default="token", help="column of the source tokens (echoes of the token)")
    judge.add_argument("--target-col", help="column of the target prompts (echoes of its examples; default: target)")
    judge.add_argument("--target", help="the target prompt of every row, for a table without a target column")
    judge.add_argument("--out", help="write the judged table (.csv or .parquet)")
    judge.set_defaults(func=cmd_judge)

    models = verbs.add_parser("models", help="list the embedded models and their cache state")
    models.add_argument("--refetch", metavar="NAME", help="fetch an embedded model again (e.g. a corrupt cache)")
    models.set_defaults(func=cmd_models)

    app = verbs.add_parser("app", parents=[threads], help="the Superscopes explorer: a web page on 127.0.0.1")
    from superscopes.app.server import add_arguments, cmd_app

    add_arguments(app)
    app.set_defaults(func=cmd_app)

    remote = verbs.add_parser("remote", help="NDIF: check the server, versions, key and model")
    remote_verbs = remote.add_subparsers(dest="remote_verb", required=True)
    status = remote_verbs.add_parser("status", help="is the server reachable, compatible, the model deployed?")
    status.add_argument("model", nargs="?", help="embedded name, repo id or served directory")
    status.set_defaults(func=cmd_remote_status)

    recipe = verbs.add_parser(
        "recipe", help="run a paper experiment: superscopes recipe NAME [--quick] ...", add_help=False
    )
    recipe.add_argument("name", help="the recipe; `superscopes recipe NAME --help` for its options")
    recipe.add_argument("recipe_args", nargs=argparse.REMAINDER)
    recipe.set_defaults(func=cmd_recipe)
    for verb, help_text in MODULE_VERBS.items():
        module = verbs.add_parser(verb, help=f"{help_text}: superscopes {verb} --help", add_help=False)
        module.add_argument("module_args", nargs=argparse.REMAINDER)
        module.set_defaults(func=cmd_module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = join_negative_values(sys.argv[1:] if argv is None else list(argv), {"--alphas"})
    if argv and argv[0] in MODULE_VERBS:  # the module parses everything after its verb, --help included
        cmd_module(argparse.Namespace(verb=argv[0], module_args=argv[1:]))
        return 0
    args = build_parser().parse_args(argv)
    if getattr(args, "sample", False) and args.seed is None:
        print("superscopes: error: --sample needs --seed (sampled readouts must be reproducible)", file=sys.stderr)
        return 2
    if getattr(args, "threads", 1) < 1:
        print(f"superscopes: error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    if hasattr(args, "threads"):
        import torch

        torch.set_num_threads(args.threads)
    try:
        status = args.func(args)
    except USER_ERRORS as error:
        print(error_line(error), file=sys.stderr)
        return 2
    return status or 0


# What a command reports as one line (ScopeError, ModelNotFoundError, RemoteRunError, a missing
# column...), where anything else is a bug and keeps its traceback.
if __name__ == "__main__":
    sys.exit(main())
