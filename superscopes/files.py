"""Reading torch files without unpickling code: every ``torch.load`` here is ``weights_only``."""

from __future__ import annotations

import pickle
from pathlib import Path


class UnsafeFileError(ValueError):
    """A torch file that holds more than tensors and plain values, or is not a torch file."""


def load_torch(path: str | Path, mmap: bool = False):
    """``torch.load(path, weights_only=True)``; a refused or unreadable file is one line naming it.

    Torch's own refusal is a long traceback that advises ``weights_only=False``: the one
    thing not to do with a file someone else may have planted."""
    import torch

    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise UnsafeFileError(
            f"{path} holds objects other than tensors and plain values; refused to unpickle it "
            "(delete it, or rewrite it with tensors, numbers, strings, lists and dicts only)"
        ) from None
    except (RuntimeError, EOFError, ValueError) as error:  # a torn or foreign file
        raise UnsafeFileError(f"{path} is not a readable torch file ({str(error).splitlines()[0]})") from None
