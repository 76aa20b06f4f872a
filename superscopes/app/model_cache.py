"""The models the explorer offers, loaded on first use and cached for the process, and a
private tokenizer per model for the request path."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from superscopes.app.errors import BadRequest
from superscopes.app.fields import unique
from superscopes.models import EMBEDDED

if TYPE_CHECKING:
    from superscopes.models import Model

REMOTE_PREFIX = "ndif:"


class ModelCache:
    """Local models (``models`` already loaded, the default, the embedded ones) and, when NDIF
    is configured, remote ones named ``ndif:<model>``."""

    def __init__(
        self,
        default_model: str,
        models: dict | None = None,
        remote_models: list[str] | None = None,
        offer_embedded: bool = True,
    ):
        from superscopes.remote import settings

        self.loaded: dict[str, object] = dict(models or {})
        names = [*self.loaded, default_model, *(EMBEDDED if offer_embedded else [])]
        self.local_models = unique([n for n in names if not n.startswith(REMOTE_PREFIX)])
        ndif = settings()  # a key for public NDIF; a self-hosted server may need only its host
        self.remote_configured = bool(ndif["NDIF_API_KEY"] or ndif["NDIF_HOST"])
        self.remote_models = (
            [REMOTE_PREFIX + n for n in unique(remote_models or list(EMBEDDED))] if self.remote_configured else []
        )
        if default_model.startswith(REMOTE_PREFIX) and default_model not in self.remote_models:
            self.remote_models.insert(0, default_model)
        self.load_locks: dict[str, threading.Lock] = {}
        self.locks_lock = threading.Lock()
        self.tokenizers: dict[int, tuple] = {}  # id(model) -> (model, tokenizer copy): the model keeps its id
        self.tokenizer_lock = threading.Lock()

    def choices(self) -> list[dict]:
        """The models the page offers, local ones first, each with whether it is loaded."""
        choices = [
            {"id": n, "label": n + (" (local)" if n in EMBEDDED else ""), "remote": False, "loaded": n in self.loaded}
            for n in self.local_models
        ]
        choices += [
            {"id": n, "label": f"{n[len(REMOTE_PREFIX) :]} (NDIF)", "remote": True, "loaded": n in self.loaded}
            for n in self.remote_models
        ]
        return choices

    def model(self, name: str) -> object:
        """The named model, loaded on first use and cached in this process."""
        if name not in self.local_models and name not in self.remote_models:
            offered = ", ".join(self.local_models + self.remote_models)
            raise BadRequest(f"model {name!r} is not offered by this server; choose from {offered}")
        if name in self.loaded:
            return self.loaded[name]
        with self.locks_lock:
            lock = self.load_locks.setdefault(name, threading.Lock())
        with lock:  # one load per model, while requests for other models go on
            if name not in self.loaded:
                import superscopes

                remote = name.startswith(REMOTE_PREFIX)
                self.loaded[name] = superscopes.load(name[len(REMOTE_PREFIX) :] if remote else name, remote=remote)
            return self.loaded[name]

    @contextmanager
    def tokenizer(self, model: Model) -> Iterator[object]:
        """A private copy of the model's tokenizer, held for the request path alone: a fast
        tokenizer used from two threads at once (a request and the worker) can fail."""
        with self.tokenizer_lock:
            key = id(model)
            if key not in self.tokenizers:
                self.tokenizers[key] = (model, copy.deepcopy(model.tokenizer))
            yield self.tokenizers[key][1]

    def tokens(self, model: Model, prompt: str) -> list[dict]:
        """The prompt's tokens, with the private tokenizer."""
        from superscopes.prompts import tokens

        with self.tokenizer(model) as tokenizer:
            ids = tokenizer(prompt)["input_ids"]
            special = set(tokenizer.all_special_ids)
            texts = tokens(tokenizer, prompt)
        return [
            {"index": i, "text": text, "special": token_id in special}
            for i, (token_id, text) in enumerate(zip(ids, texts))
        ]


class WithTokenizer:
    """``model`` as ``plan`` sees it, with another tokenizer (the request path's private copy)."""

    def __init__(self, model: Model, tokenizer):
        self._model, self.tokenizer = model, tokenizer

    def __getattr__(self, name: str):
        return getattr(self._model, name)
