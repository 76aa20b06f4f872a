"""Smoke check: remote traces against the local NDIF server match local ones.

Run with the project's client venv while the server is up (scripts/ndif/up.sh):

    /work/main/.venv/bin/python scripts/ndif/smoke.py            # core checks
    /work/main/.venv/bin/python scripts/ndif/smoke.py --errors   # + error cases

Env: NDIF_HOST (default http://127.0.0.1:5001), SUPERSCOPES_NDIF_MODEL_DIR
(default ~/.cache/superscopes/models/smollm2-135m), NDIF_API_KEY (any value;
the local server does not check keys).

Checks (each prints PASS/FAIL; exit status 1 if any core check fails):
  1. trace: layers[3].output[:, -1, :] and the last-token logits top-5,
     local vs remote=True, within 1e-4;
  2. generate(max_new_tokens=5, do_sample=False): token ids local vs remote;
  3. session(remote=True) with two traces, the second patching in a value
     read by the first, local vs remote;
  4. a result larger than the inline cap (8 MiB with stock Redis limits), which
     travels through the S3 store and a presigned URL.
It also prints the bytes each remote request sent and received (client side).
With --errors it prints what the client raises for: server unreachable,
a model key that is not deployed, a wrong API key, an exception raised inside
the trace, and a request rejected by the server's version gate (only when a
second API with NDIF_MIN_NNSIGHT_VERSION is listening on --gated-host).
"""

import argparse
import os
import sys
import time
import traceback

import nnsight
import torch
from nnsight.intervention.backends import remote as remote_mod
from nnsight.modeling.huggingface import _ID_CACHE
from nnsight.modeling.transformers import TransformersModel
from transformers import AutoTokenizer

TOL = 1e-4
PROMPT = "The Eiffel Tower is located in the city of"


# --------------------------------------------------------------- byte meter
class ByteMeter:
    """Counts what the nnsight client sends and receives per remote request.

    Wraps RemoteBackend methods (client side only, no server support needed):
      sent      - the serialized request blob POSTed to /request
      ws_bytes  - every websocket frame received (status JSON + the result
                  itself when it comes back inline as a binary frame)
      result    - the (compressed) result blob, whether it came inline or was
                  downloaded from the object store's presigned URL
      url_bytes - bytes downloaded from a presigned URL (results too large for
                  the inline path, > 8 MiB with stock Redis limits)
    """

    def __init__(self):
        self.reset()
        B = remote_mod.RemoteBackend
        meter = self
        orig_serialize, orig_parse, orig_finalize, orig_download = (
            B._serialize,
            B.parse,
            B.finalize,
            B.download_result,
        )

        def _serialize(backend, tracer):
            blob = orig_serialize(backend, tracer)
            meter.sent += len(blob)
            return blob

        def parse(message):
            meter.ws_bytes += len(message)
            return orig_parse(message)

        def finalize(backend, content):
            meter.result += len(content)
            return orig_finalize(backend, content)

        def download_result(backend, url):
            if isinstance(url, str) and url:
                before = meter.result
                out = orig_download(backend, url)
                meter.url_bytes += meter.result - before
                return out
            return orig_download(backend, url)

        B._serialize = _serialize
        B.parse = staticmethod(parse)
        B.finalize = finalize
        B.download_result = download_result

    def reset(self):
        self.sent = self.ws_bytes = self.result = self.url_bytes = 0

    def line(self):
        return (
            f"sent {self.sent:,} B, websocket received {self.ws_bytes:,} B, "
            f"result blob {self.result:,} B (via URL {self.url_bytes:,} B)"
        )


# --------------------------------------------------------------- helpers
FAILED = []


def report(name, ok, detail=""):
    print(f"[{'PASS' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


def load_model(model_dir):
    # Offline, the client canonicalises the repo id through the Hub; a local
    # path must map to itself, and must be the exact string the server uses.
    _ID_CACHE[model_dir] = model_dir
    tok = AutoTokenizer.from_pretrained(model_dir)
    return TransformersModel(model_dir, tokenizer=tok, task="text-generation")


# The trace bodies live in functions of this file (nnsight captures source text).
def run_trace(model, **kw):
    with torch.inference_mode():
        with model.trace(PROMPT, **kw):
            h = model.model.layers[3].output[:, -1, :].clone().save()
            logits = model.output.logits[:, -1, :].clone().save()
    return h, logits


def run_generate(model, **kw):
    with torch.inference_mode():
        with model.generate(PROMPT, max_new_tokens=5, do_sample=False, **kw) as tracer:
            ids = tracer.result.save()
    return ids


def run_session(model, **kw):
    with torch.inference_mode():
        with model.session(**kw):
            with model.trace("Paris is the capital of"):
                h = model.model.layers[3].output[:, -1, :].clone()
            with model.trace("Rome is the capital of"):
                model.model.layers[3].output[:, -1, :] = h
                patched = model.output.logits[:, -1, :].clone().save()
    return patched


def run_big(model, prompt, **kw):
    with torch.inference_mode():
        with model.trace(prompt, **kw):
            logits = model.output.logits.clone().save()
    return logits


def run_raise(model, **kw):
    with model.trace(PROMPT, **kw):
        _ = model.model.layers[3].output  # a module access, so the error is raised inside a real trace
        raise ValueError("boom from inside the trace")


def describe(exc):
    msg = str(exc)
    if len(msg) > 900:  # server tracebacks: keep the head and the end (the cause)
        msg = msg[:250] + "\n       [...]\n" + msg[-650:]
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {msg}"


def expect_error(name, fn):
    started = time.time()
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - we want to see everything
        print(f"[INFO] {name} -> raised after {time.time() - started:.1f}s\n       {describe(exc)}", flush=True)
        return exc
    print(f"[INFO] {name} -> no exception ({time.time() - started:.1f}s)", flush=True)
    return None


# --------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--errors", action="store_true", help="also probe error cases")
    ap.add_argument(
        "--gated-host", default=None, help="an API started with NDIF_MIN_NNSIGHT_VERSION (version-gate check)"
    )
    args = ap.parse_args()

    host = os.environ.get("NDIF_HOST", "http://127.0.0.1:5001")
    model_dir = os.path.abspath(
        os.path.expanduser(os.environ.get("SUPERSCOPES_NDIF_MODEL_DIR", "~/.cache/superscopes/models/smollm2-135m"))
    )
    nnsight.CONFIG.API.HOST = host
    nnsight.CONFIG.API.APIKEY = os.environ.get("NDIF_API_KEY", "local-dev-key")
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    meter = ByteMeter()

    t0 = time.time()
    model = load_model(model_dir)
    print(f"model key: {model.to_model_key()}")
    print(f"host: {host}  (model wrapper ready in {time.time() - t0:.1f}s)", flush=True)

    # 1. trace ------------------------------------------------------------
    h_loc, lg_loc = run_trace(model)
    meter.reset()
    t = time.time()
    h_rem, lg_rem = run_trace(model, remote=True)
    dt = time.time() - t
    dh = (h_loc - h_rem).abs().max().item()
    dl = (lg_loc - lg_rem).abs().max().item()
    top_loc = lg_loc.topk(5, dim=-1).indices.tolist()
    top_rem = lg_rem.topk(5, dim=-1).indices.tolist()
    report("trace layers[3] last token", dh <= TOL, f"max|diff|={dh:.2e} shape={tuple(h_rem.shape)}")
    report("trace logits", dl <= TOL, f"max|diff|={dl:.2e}")
    report("trace top-5", top_loc == top_rem, f"{[model.tokenizer.decode(i) for i in top_rem[0]]} ({dt:.2f}s remote)")
    print(f"       bytes: {meter.line()}", flush=True)

    # 2. generate ----------------------------------------------------------
    try:
        ids_loc = run_generate(model)
        meter.reset()
        t = time.time()
        ids_rem = run_generate(model, remote=True)
        dt = time.time() - t
        same = torch.equal(ids_loc.cpu(), ids_rem.cpu())
        report("generate 5 tokens", same, f"{model.tokenizer.decode(ids_rem[0][-5:])!r} ({dt:.2f}s remote)")
        print(f"       bytes: {meter.line()}", flush=True)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        report("generate 5 tokens", False, describe(exc))

    # 3. session -------------------------------------------------------------
    try:
        p_loc = run_session(model)
        meter.reset()
        t = time.time()
        p_rem = run_session(model, remote=True)
        dt = time.time() - t
        d = (p_loc - p_rem).abs().max().item()
        report(
            "session two traces (value flows)",
            d <= TOL,
            f"max|diff|={d:.2e}, top-1 {model.tokenizer.decode(p_rem.argmax(-1))!r} ({dt:.2f}s remote)",
        )
        print(f"       bytes: {meter.line()}", flush=True)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        report("session two traces (value flows)", False, describe(exc))

    # 4. a result too large for the inline (Redis pub/sub) path: the server
    #    uploads it to the S3 store and the client downloads a presigned URL.
    try:
        long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
        big_loc = run_big(model, long_prompt)
        meter.reset()
        t = time.time()
        big_rem = run_big(model, long_prompt, remote=True)
        dt = time.time() - t
        d = (big_loc - big_rem).abs().max().item()
        report(
            "large result via object store",
            d <= TOL and meter.url_bytes > 0,
            f"shape={tuple(big_rem.shape)} max|diff|={d:.2e} ({dt:.2f}s remote)",
        )
        print(f"       bytes: {meter.line()}", flush=True)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        report("large result via object store", False, describe(exc))

    # 5. error cases -------------------------------------------------------
    if args.errors:
        print("--- error cases ---", flush=True)
        # (a) server down / unreachable (nothing listens on port 1)
        expect_error("(a) server unreachable", lambda: run_trace(model, remote="http://127.0.0.1:1"))
        # (b) a model key that is not deployed: a tiny random model saved locally
        import tempfile

        from transformers import AutoModelForCausalLM, LlamaConfig

        tiny_dir = os.path.join(tempfile.gettempdir(), "ndif-smoke-undeployed")
        if not os.path.exists(os.path.join(tiny_dir, "config.json")):
            cfg = LlamaConfig(
                num_hidden_layers=4,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=model.tokenizer.vocab_size + 100,
            )
            AutoModelForCausalLM.from_config(cfg).save_pretrained(tiny_dir)
            model.tokenizer.save_pretrained(tiny_dir)
        other = load_model(tiny_dir)
        expect_error("(b) model not deployed", lambda: run_trace(other, remote=True))
        # (c) wrong / missing API key
        for key in ("definitely-not-a-valid-key", ""):
            nnsight.CONFIG.API.APIKEY = key
            expect_error(f"(c) API key {key!r}", lambda: run_trace(model, remote=True))
        nnsight.CONFIG.API.APIKEY = os.environ.get("NDIF_API_KEY", "local-dev-key")
        # (d) exception inside the trace (server side)
        expect_error("(d) exception inside the trace", lambda: run_raise(model, remote=True))
        expect_error("(d') out-of-range index inside the trace", lambda: run_index(model, remote=True))
        # (e) version gate (needs a second API with NDIF_MIN_NNSIGHT_VERSION)
        if args.gated_host:
            expect_error("(e) client below NDIF_MIN_NNSIGHT_VERSION", lambda: run_trace(model, remote=args.gated_host))
        # the server still works after all that
        h2, _ = run_trace(model, remote=True)
        report("server healthy after error cases", (h2 - h_loc).abs().max().item() <= TOL)

    print(f"total {time.time() - t0:.1f}s; {'FAILED: ' + ', '.join(FAILED) if FAILED else 'all checks passed'}")
    return 1 if FAILED else 0


def run_index(model, **kw):
    with model.trace(PROMPT, **kw):
        bad = model.model.layers[3].output[:, 10_000, :].save()
    return bad


if __name__ == "__main__":
    sys.exit(main())
