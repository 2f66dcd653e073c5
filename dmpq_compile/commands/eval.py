"""dmpq-compile eval MODEL_OR_ARTIFACT --corpus ...: perplexity (and KL to a reference)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "perplexity of a checkpoint or artifact on a corpus split (optionally KL to a reference)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="MODEL_OR_ARTIFACT", help="HF checkpoint folder or compiled artifact folder")
    p.add_argument("--corpus", default="pydoc",
                   help="'pydoc' (built-in), or your own text file or folder of text files (default pydoc)")
    p.add_argument("--split", default="auto", choices=("auto", "train", "calib", "test", "all"),
                   help="auto (default): the test split of pydoc, all of your own corpus; train/calib/test pick "
                   "one part of the project's hash split (5%% test, 5%% calib), all the whole corpus")
    p.add_argument("--context", type=int, default=256, help="window length (default 256)")
    p.add_argument("--stride", type=int, help="window stride (default: half the context)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the split")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reference", help="model or artifact to measure KL(reference || this) against")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.add_argument("--no-progress", action="store_true")


def model_logits_fn(path: str | Path):
    """``(logits_fn, tokenizer_dir)`` for an artifact (ONNX runtime) or a checkpoint (reference interpreter)."""
    from ..runtime.manifest import looks_like_artifact

    path = Path(path)
    if looks_like_artifact(path):  # loading names a missing manifest or damaged file
        from ..eval import NumpyLogits
        from ..runtime import load as load_artifact

        return NumpyLogits(load_artifact(path).logits), path  # numpy all the way: no torch
    from ..frontend import load
    from ..ir import logits_fn

    return logits_fn(load(path), quantize=False), path


def check_context(path: str | Path, context: int) -> None:
    """Refuse windows longer than the model's max_position_embeddings (past it the scores degrade)."""
    path = Path(path)
    source = path / "manifest.json" if (path / "manifest.json").is_file() else path / "config.json"
    raw = json.loads(source.read_text()) if source.is_file() else {}
    limit = (raw.get("model", raw) if isinstance(raw, dict) else {}).get("max_position_embeddings")
    if limit and context > int(limit):
        raise ValueError(f"--context {context} is longer than {path}'s max_position_embeddings {limit}; "
                         f"pass --context {limit} or less")


def main(args: argparse.Namespace) -> int:
    from ..eval import kl_divergence, perplexity, tokenize_corpus
    from ..eval.tokens import eos_token, load_tokenizer

    fn, tok_dir = model_logits_fn(args.path)
    check_context(args.path, args.context)
    tok = load_tokenizer(tok_dir)
    texts, split = _corpus_texts(args.corpus, args.split)
    ids = tokenize_corpus(texts, tok, separator=eos_token(tok), max_tokens=args.max_tokens)
    stride = args.stride or max(1, args.context // 2)
    kw = {"context": args.context, "stride": stride, "batch_size": args.batch_size, "progress": not args.no_progress}
    res = perplexity(fn, ids, **kw)
    out = {"path": str(args.path), "corpus": args.corpus, "split": split, "tokens": res.n_tokens,
           "ppl": res.ppl, "nll": res.nll}
    if args.reference:
        ref_fn, _ = model_logits_fn(args.reference)
        kl = kl_divergence(ref_fn, fn, ids, **kw)
        out["kl"] = kl.kl
    print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def _corpus_texts(corpus: str, split_arg: str) -> tuple[list[str], str]:
    """The texts to score and the split's name; a hash split of the user's own corpus is announced."""
    from ..eval import is_builtin, load_documents, resolve_split, split_documents

    split = resolve_split(corpus, None if split_arg == "all" else split_arg, "test")
    docs = load_documents(corpus)
    chosen = split_documents(docs, split)
    if split is not None and not is_builtin(corpus):
        print(f"note: scoring only the {split!r} hash split of {corpus}: {len(chosen)} of {len(docs)} documents; "
              "--split all (the default for your own corpus) scores all of it", file=sys.stderr)
    return [d.text for d in chosen], split or "all"
