"""dmpq-compile eval MODEL_OR_ARTIFACT: perplexity (and KL to a reference) under the evaluation protocol."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "perplexity (and KL to a reference) on held-out text, with 95%% bootstrap intervals over documents"
DESCRIPTION = """Scores a checkpoint or artifact under the project's evaluation protocol (docs/evaluation.md).
Each set (a domain and a split) is scored on windows of --context tokens drawn across every document
of the set (none above --max-doc-share of the scored tokens), the second half of each window scored as
llama.cpp's llama-perplexity does. Every figure comes with a 95% percentile bootstrap interval that
resamples documents (2000 replicates, seed 0); ratios to --reference are paired (same windows, same
resampled documents). Built-in domains: pydoc (the Python documentation, prose) and pystdlib (the
standard library's .py files, code); their 'dev' split is for choices, 'test' (the default) for reports,
both disjoint by document from the samples' train and calib text."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="MODEL_OR_ARTIFACT", help="HF checkpoint folder or compiled artifact folder")
    p.add_argument("--corpus", nargs="+", default=["pydoc", "pystdlib"], metavar="CORPUS",
                   help="built-in domains 'pydoc' and/or 'pystdlib', or your own text file or folder (default: both "
                   "built-in domains, each reported on its own)")
    p.add_argument("--split", default="auto", choices=("auto", "dev", "test", "train", "calib", "all"),
                   help="auto (default): 'test' of a built-in domain, all of your own corpus; dev (choices) / test "
                   "(reports) pick 2.5%% each of the project's hash split; train/calib only for your own corpus")
    p.add_argument("--context", type=int, default=256, help="window length in tokens (default 256; half is scored)")
    p.add_argument("--windows", type=int, default=64, help="at most this many windows per set (default 64)")
    p.add_argument("--max-doc-share", type=float, default=0.15,
                   help="largest share of the scored tokens one document may hold (default 0.15)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--reference", help="model or artifact to measure KL(reference || this) and ppl ratios against")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap replicates (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
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
    from ..eval.protocol import DocBootstrap, eval_windows, format_interval, score, summarize
    from ..eval.tokens import load_tokenizer

    fn, tok_dir = model_logits_fn(args.path)
    check_context(args.path, args.context)
    tok = load_tokenizer(tok_dir)
    ref_fn = model_logits_fn(args.reference)[0] if args.reference else None
    out = {"path": str(args.path), "reference": args.reference, "sets": []}
    for corpus in args.corpus:
        split = _split(corpus, args.split)
        windows = eval_windows(corpus, split, tok, context=args.context, max_windows=args.windows,
                               max_share=args.max_doc_share)
        scores = score(fn, windows, reference=ref_fn, batch_size=args.batch_size, progress=not args.no_progress)
        boot = DocBootstrap(windows, n_boot=args.boot, seed=args.seed)
        models = {"model": scores}
        if ref_fn is not None:
            models["reference"] = scores.reference_scores()
        summary = summarize(windows, models, baseline="reference" if ref_fn is not None else None, boot=boot)
        res = {**windows.record(), "bootstrap": boot.record(), "corpus": corpus, "split": split or "all",
               **summary["model"]}
        if ref_fn is not None:
            res["reference_ppl"] = summary["reference"]["ppl"]
        out["sets"].append(res)
        cells = [f"{windows.name}", f"ppl={format_interval(res['ppl'], '{:.4f}')}"]
        if ref_fn is not None:
            cells += [f"kl={format_interval(res['kl'], '{:.3e}')}", f"top1={format_interval(res['top1'], '{:.4f}')}",
                      f"ppl/ppl(ref)={format_interval(res['ppl_ratio'], '{:.4f}')}"]
        cells.append(f"({res['windows']} windows, {res['scored_tokens']} scored tokens, {res['documents']} documents, "
                     f"max document share {res['max_doc_share']:.1%}; 95% bootstrap over documents)")
        print("  ".join(cells), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def _split(corpus: str, split_arg: str) -> str | None:
    """The split to score; a hash split of the user's own corpus is announced."""
    from ..eval import is_builtin, load_documents, resolve_split, split_documents

    split = resolve_split(corpus, None if split_arg == "all" else split_arg, "test")
    if split is not None and not is_builtin(corpus):
        docs = load_documents(corpus)
        print(f"note: scoring only the {split!r} hash split of {corpus}: {len(split_documents(docs, split))} of "
              f"{len(docs)} documents; --split all (the default for your own corpus) scores all of it", file=sys.stderr)
    return split
