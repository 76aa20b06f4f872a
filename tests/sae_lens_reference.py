"""Write SAEs of every kind with SAELens' own ``save_model`` and SAELens' encodes of them.

Runs in the environment that has ``sae-lens`` (``make test-sae`` makes ``.venv-sae``), not in
superscopes' own: ``python tests/sae_lens_reference.py OUT [--d-in 16 --d-sae 32 --n 26]``.
For each kind it writes ``OUT/<kind>/`` (the folder as SAELens saved it) and
``OUT/<kind>/reference.safetensors`` (``x``, SAELens' ``acts = encode(x)`` and
``recon = decode(acts)``, both from the SAE that SAELens' ``load_from_disk`` reads back from
that folder), and ``OUT/manifest.json`` (the kinds and the sae-lens version). Weights are
random, decoder rows have norms 0.3-3 (not unit), thresholds are positive and b_dec is nonzero,
so every setting shows in the encodes. BatchTopK and Matryoshka are training SAEs: SAELens
saves them for inference with ``save_inference_model`` as JumpReLU SAEs; the reference is that
JumpReLU SAE and the folder given to superscopes is the training folder (``save_model``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import sae_lens
import torch
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import save_file


def kinds(d_in: int, d_sae: int) -> dict:
    """kind -> (SAE class, config); hooks of several sites and layers."""

    def base(layer=1, site="resid_post", **kw) -> dict:
        metadata = SAEMetadata(hook_name=f"blocks.{layer}.hook_{site}", model_name="tiny")
        return dict(d_in=d_in, d_sae=d_sae, metadata=metadata, **kw)

    return {
        "standard": (StandardSAE, StandardSAEConfig(**base())),
        "standard_no_b_dec": (StandardSAE, StandardSAEConfig(**base(2, "mlp_out", apply_b_dec_to_input=False))),
        "standard_constant_norm": (
            StandardSAE,
            StandardSAEConfig(**base(normalize_activations="constant_norm_rescale")),
        ),
        "standard_layer_norm": (
            StandardSAE,
            StandardSAEConfig(**base(0, "resid_pre", normalize_activations="layer_norm")),
        ),
        "topk": (TopKSAE, TopKSAEConfig(**base(k=5))),
        "topk_rescale": (TopKSAE, TopKSAEConfig(**base(3, "attn_out", k=5, rescale_acts_by_decoder_norm=True))),
        "topk_rescale_no_b_dec": (
            TopKSAE,
            TopKSAEConfig(**base(k=7, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False)),
        ),
        "topk_layer_norm": (TopKSAE, TopKSAEConfig(**base(k=4, normalize_activations="layer_norm"))),
        "topk_training": (TopKTrainingSAE, TopKTrainingSAEConfig(**base(k=6))),  # rescale_acts_by_decoder_norm=True
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig(**base())),
        "jumprelu_no_b_dec": (JumpReLUSAE, JumpReLUSAEConfig(**base(2, apply_b_dec_to_input=False))),
        "gated": (GatedSAE, GatedSAEConfig(**base(2, "mlp_out"))),
        # Training SAEs saved with save_model: SAELens' load_from_disk reads them as the inference class.
        "standard_training": (StandardTrainingSAE, StandardTrainingSAEConfig(**base())),
        "jumprelu_training": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig(**base())),
        "gated_training": (GatedTrainingSAE, GatedTrainingSAEConfig(**base(2, "mlp_out"))),
        "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig(**base(k=4))),
        "matryoshka_batchtopk": (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig(**base(k=4, matryoshka_widths=[d_sae // 4, d_sae // 2, d_sae])),
        ),
    }


@torch.no_grad()
def randomise(sae, generator: torch.Generator) -> None:
    """Random weights: decoder rows of norm 0.3-3, b_dec nonzero, thresholds positive."""
    for name, param in sae.named_parameters():
        param.copy_(torch.randn(param.shape, generator=generator) * (0.3 if name.startswith("b_") else 1.0))
    sae.W_dec.mul_(
        torch.empty(sae.W_dec.shape[0], 1).uniform_(0.3, 3.0, generator=generator)
        / sae.W_dec.norm(dim=-1, keepdim=True)
    )
    if hasattr(sae, "threshold"):
        sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=generator) * 1.5 + 0.05)
    if hasattr(sae, "r_mag"):
        sae.r_mag.mul_(0.3)
    if hasattr(sae, "topk_threshold"):  # a buffer: the learned batch threshold
        sae.topk_threshold = torch.tensor(0.8, dtype=torch.double)


def write(out: Path, d_in: int, d_sae: int, n: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=generator) * 2 + torch.randn(d_in, generator=generator)
    written = {}
    for kind, (cls, cfg) in kinds(d_in, d_sae).items():
        folder = out / kind
        if folder.exists():
            shutil.rmtree(folder)
        sae = cls(cfg)
        randomise(sae, generator)
        sae.save_model(folder)
        if isinstance(sae, BatchTopKTrainingSAE):  # SAELens' inference form of it
            with tempfile.TemporaryDirectory() as tmp:
                sae.save_inference_model(tmp)
                reference = SAE.load_from_disk(tmp)
        elif kind.endswith("_training"):
            reference = SAE.load_from_disk(folder)
        else:
            reference = type(sae).load_from_disk(folder)
        reference.eval()
        with torch.no_grad():
            acts = reference.encode(x)
            recon = reference.decode(reference.encode(x))  # normalised SAEs map back with x's statistics
        save_file(
            {"x": x.contiguous(), "acts": acts.contiguous(), "recon": recon.contiguous()},
            folder / "reference.safetensors",
        )
        written[kind] = {
            "class": cls.__name__,
            "reference": type(reference).__name__,
            "active": int((acts != 0).sum()),
            "n": n,
        }
    for kind, source in (("pre6_topk", "topk"), ("pre6_jumprelu_no_b_dec", "jumprelu_no_b_dec")):
        written[kind] = write_pre_6(out / source, out / kind, x)
    manifest = {
        "sae_lens": sae_lens.__version__,
        "torch": torch.__version__,
        "d_in": d_in,
        "d_sae": d_sae,
        "seed": seed,
        "kinds": written,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_pre_6(source: Path, folder: Path, x: torch.Tensor) -> dict:
    """``source``'s weights under a pre-6.0 ``cfg.json`` (hook and activation fields at the top
    level, no sae_lens_version), as SAELens 5.x wrote it; the reference is what SAELens 6 reads."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    shutil.copy(source / "sae_weights.safetensors", folder)
    cfg = json.loads((source / "cfg.json").read_text())
    topk = cfg["architecture"] == "topk"
    old = {
        "architecture": "standard" if topk else cfg["architecture"],
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "dtype": "float32",
        "device": "cpu",
        "model_name": "tiny",
        "hook_name": cfg["metadata"]["hook_name"],
        "hook_layer": int(cfg["metadata"]["hook_name"].split(".")[1]),
        "hook_head_index": None,
        "activation_fn_str": "topk" if topk else "relu",
        "activation_fn_kwargs": {"k": cfg["k"]} if topk else {},
        "apply_b_dec_to_input": cfg["apply_b_dec_to_input"],
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "context_size": 128,
        "prepend_bos": True,
    }
    (folder / "cfg.json").write_text(json.dumps(old))
    reference = SAE.load_from_disk(folder)
    with torch.no_grad():
        acts = reference.encode(x)
        recon = reference.decode(acts)
    save_file(
        {"x": x.contiguous(), "acts": acts.contiguous(), "recon": recon.contiguous()}, folder / "reference.safetensors"
    )
    return {
        "class": "pre-6.0 cfg.json",
        "reference": type(reference).__name__,
        "active": int((acts != 0).sum()),
        "n": len(x),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--d-in", type=int, default=16)
    parser.add_argument("--d-sae", type=int, default=32)
    parser.add_argument("--n", type=int, default=26, help="inputs per SAE")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = write(args.out, args.d_in, args.d_sae, args.n, args.seed)
    print(json.dumps(manifest["kinds"]))


if __name__ == "__main__":
    main()
