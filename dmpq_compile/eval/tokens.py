"""The model's tokenizer and its end-of-text token (calibration, evaluation and the bench)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(model_dir: str | Path) -> Any:
    """The fast tokenizer (``tokenizer.json``) of a model or artifact folder.

    Raises:
        FileNotFoundError: The folder has no ``tokenizer.json``.
    """
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the model folder needs a fast tokenizer (tokenizer.json) "
                                "for calibration and evaluation")
    return Tokenizer.from_file(str(path))


def eos_token(tok: Any) -> str:
    """The tokenizer's end-of-text token, the separator between corpus documents.

    Raises:
        ValueError: None of the known end-of-text tokens is in the vocabulary.
    """
    for cand in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"):
        if tok.token_to_id(cand) is not None:
            return cand
    raise ValueError("the tokenizer has no known end-of-text token (<|endoftext|>, </s>, <eos>)")
