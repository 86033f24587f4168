"""Load a fine-tune with Hugging Face ``transformers`` from its base directory and a
``.udelta`` file, without writing the fine-tuned checkpoint."""

from __future__ import annotations

import os
from typing import Any, Optional

from . import PathLike, UdeltaError, apply_


def from_pretrained(
    base_dir: PathLike,
    path: PathLike,
    *,
    model_class: Optional[Any] = None,
    force: bool = False,
    **kwargs: Any,
):
    """Loads the base model from the local directory ``base_dir`` with
    ``model_class.from_pretrained(base_dir, **kwargs)`` (default
    ``transformers.AutoModelForCausalLM``), then applies the ``.udelta`` file ``path`` in
    place with :func:`udelta.apply_` (base checked tensor by tensor). Returns the model, which
    :func:`udelta.swap_` can switch to another fine-tune of the same base.

    ``kwargs`` go to ``from_pretrained`` (``torch_dtype``, ``device_map``, ...); keep the
    checkpoint's dtype (the default ``torch_dtype="auto"``) for bit-identical weights.
    """
    if model_class is None:
        try:
            from transformers import AutoModelForCausalLM as model_class
        except ImportError as e:
            raise UdeltaError(f"udelta.transformers needs transformers: {e}") from e
    kwargs.setdefault("torch_dtype", "auto")
    model = model_class.from_pretrained(os.fspath(base_dir), **kwargs)
    apply_(model, path, force=force)
    return model
