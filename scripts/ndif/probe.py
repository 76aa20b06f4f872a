"""Readiness probe used by up.sh: one tiny remote trace against the local server.

Runs in the server venv (it has nnsight too). Usage: probe.py MODEL_DIR
with NDIF_HOST set. Exits non-zero if the trace fails.
"""

import os
import sys
import time

import nnsight
from nnsight.modeling.huggingface import _ID_CACHE
from nnsight.modeling.transformers import TransformersModel
from transformers import AutoTokenizer

model_dir = sys.argv[1]
nnsight.CONFIG.API.HOST = os.environ["NDIF_HOST"]
nnsight.CONFIG.API.APIKEY = os.environ.get("NDIF_API_KEY", "local")
nnsight.CONFIG.APP.REMOTE_LOGGING = False
_ID_CACHE[model_dir] = model_dir  # local path: no Hub canonicalisation

model = TransformersModel(model_dir, tokenizer=AutoTokenizer.from_pretrained(model_dir), task="text-generation")
started = time.time()
with model.trace("The capital of France is", remote=True):
    logits = model.output.logits[:, -1, :].clone().save()
print(
    f"probe ok: logits {tuple(logits.shape)} in {time.time() - started:.2f}s, "
    f"argmax {model.tokenizer.decode(logits.argmax(-1))!r}"
)
