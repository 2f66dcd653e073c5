"""llama.cpp side by side with dmpq-compile at matching stored bits per weight.

For each model: convert the checkpoint to GGUF (f32 for the samples, f16 for the one-layer
real-width checkpoints), quantize it to Q8_0, Q4_0, Q4_K_M, Q3_K_M, Q2_K, IQ3_XXS and IQ2_XS
(with an importance matrix from llama-imatrix on the calibration split of the pydoc corpus),
compile dmpq-compile ort-cpu artifacts whose stored bytes match each GGUF, and measure all of them
in one interleaved run.

Bits per weight (bpw) are *stored* bits: file bytes x 8 / all parameters of the checkpoint
(embeddings, attention, norms, router, lm_head included). GGUF: the whole .gguf file (its
tokenizer included). dmpq: every file of the artifact folder but ``report.json`` (model.onnx,
model.onnx.data, tokenizer.json, manifest). "Expert bpw" is the routed experts' stored bytes x 8 /
their parameters (GGUF ``*_exps`` tensors; the manifest's per-expert bytes: codes, scales, zero points).

dmpq budgets: ``--budget-mb`` (stored expert bytes) set so that the artifact's whole-file bpw
equals the GGUF's, the weights outside the experts at ``--nonexpert-bits`` (attention, shared
experts, lm_head and, on ort-cpu at 4/8 bits, the embedding table; 16 keeps them fp32), their
bytes read from a uniform 4-bit reference artifact with the same policy; where that is impossible
because those parts alone already weigh more, the budget matches the GGUF's expert bpw instead,
and the row says which ("match" column).

Measured, interleaved (order rotates each round), with ``--threads`` threads for both tools:

* prefill tok/s of ``--prefill-tokens`` random tokens from an empty cache: ``llama-bench -p N -n 0``
  and ``dmpq_compile.bench.bench`` (one round per call, each with its own warm-up);
* decode ms/token over ``--decode-tokens`` tokens after a prefill of the same length:
  ``llama-bench -p 0 -n 32 -d 128`` (tokens generated at depth 128) and ``bench``'s decode steps.
  both report the mean time of a round's 32 tokens (llama-bench's ``avg_ts``; ``bench``'s
  ``decode_mean_ms``), and the table gives the median over rounds (the same statistic on both sides,
  named in the table's header and in the results file's ``statistics``), with the weight bytes a decoded
  token reads (``read_bytes_per_token``; GGUF: top-k / experts of the stacked expert tensors, one embedding
  row, every other tensor whole; dmpq: each expert at its calibration routing frequency, report.json) plus the
  KV cache it attends (``kv_read_bytes_per_token``: float16 for llama.cpp, float32 for dmpq, at the mean depth
  of the decoded tokens) and the GB/s that makes of the decode time;
* on trained checkpoints, quality under the project's evaluation protocol (docs/evaluation.md), on
  each of ``--domains`` (default pydoc and pystdlib, ``--split`` test): windows of ``--context``
  tokens drawn across every document of the set (none above 15 % of the scored tokens), the second
  half of each scored, as llama-perplexity scores a chunk. llama.cpp: ``llama-perplexity
  --kl-divergence-base FILE`` on every GGUF writes that model's log-probabilities at every scored
  position, read back per token (``llamacpp.iter_logprobs``); dmpq: the artifact runtime's logits on
  the same windows. Both tools' KL is to one reference, the dmpq fp32 artifact's log-probabilities;
  the f32 GGUF's agreement with it is recorded per set (``reference_agreement``). Perplexity, KL and
  top-1 agreement carry 95 % bootstrap intervals over documents, and each matched dmpq row's paired
  ratios to the GGUF type(s) it matches (``vs``). The script checks that ``llama-tokenize`` gives
  the windows' ids for the set's text and that llama-perplexity's file holds exactly those tokens.

``--llama-cpp`` is a cmake build folder of llama.cpp built from the source vendored in
llama-cpp-python's sdist (``pip download --no-deps --no-binary :all: llama-cpp-python``; CPU only,
Release, ``-DGGML_NATIVE=ON``; tools llama-quantize, llama-imatrix, llama-perplexity, llama-bench,
llama-tokenize). ``--help`` prints the exact steps (``llamacpp.BUILD_HELP``), as does
benchmarks/README.md. The samples' byte-level BPE pre-tokenizer is registered in the build's
converter at run time, as ``convert_hf_to_gguf_update.py`` would (``llamacpp.register_pre_tokenizer``).

    nice -n 19 python benchmarks/bench_llamacpp.py --llama-cpp BUILD                    # the two samples
    nice -n 19 python benchmarks/bench_llamacpp.py --llama-cpp BUILD --models olmoe-1b-7b-1l mixtral-8x7b-1l
    nice -n 19 python benchmarks/bench_llamacpp.py --llama-cpp BUILD --models qwen3-30b-a3b-1l --types Q4_0 Q4_K_M
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import llamacpp as lc
import numpy as np
from dmpq_compile.passes.precision import split_auto

from dmpq_compile.sysinfo import load_average as uptime

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ3_XXS", "IQ2_XS")
# default pipeline for the samples: profile, local sensitivity, measured cost, optimal allocator
SAMPLE_FLAGS = ((), ("--no-cache",))
# random weights carry no sensitivity signal: allocate by routing frequency (as bench_shapes.py)
SHAPE_FLAGS = (("--allocator", "frequency", "--no-sensitivity"),
               ("--calib-sequences", "8", "--seq-len", "128", "--no-cache"))


@dataclass(frozen=True)
class ModelSpec:
    """One model of the comparison.

    Attributes:
        name: Label (and folder under the work directory).
        shape: ``dmpq_compile.testing.scale.SHAPES`` key of a one-layer random checkpoint, or None.
        quality: Score perplexity and KL (trained samples only; random weights have no quality).
        base: GGUF type converted from the checkpoint (the speed and KL reference).
        flags: dmpq-compile flags of the matched artifacts besides the budget (allocator), and of every
            artifact (calibration, cache).
        reference: (label, flags) of the dmpq artifact that gives the non-expert bytes (fp32: the KL reference).
        path: Checkpoint folder of a trained model (None: ``samples/NAME``, or built from ``shape``).
        layers: Decoder layers of a checkpoint built from ``shape`` (None: all of the shape's).
    """

    name: str
    shape: str | None
    quality: bool
    base: str
    flags: tuple[tuple[str, ...], tuple[str, ...]]
    reference: tuple[str, tuple[str, ...]]
    path: Path | None = None
    layers: int | None = 1


FP32_REFERENCE = ("dmpq-fp32", ("--allocator", "uniform", "--budget-code-bits", "16", "--no-sensitivity"))
MODELS = {
    "mixtral-tiny": ModelSpec("mixtral-tiny", None, True, "f32", SAMPLE_FLAGS, FP32_REFERENCE),
    "olmoe-tiny": ModelSpec("olmoe-tiny", None, True, "f32", SAMPLE_FLAGS, FP32_REFERENCE),
    "olmoe-1b-7b-1l": ModelSpec("olmoe-1b-7b-1l", "olmoe-1b-7b", False, "f16", SHAPE_FLAGS,
                                ("dmpq-int4", ("--allocator", "uniform", "--budget-code-bits", "4", "--no-sensitivity"))),
    "mixtral-8x7b-1l": ModelSpec("mixtral-8x7b-1l", "mixtral-8x7b", False, "f16", SHAPE_FLAGS,
                                 ("dmpq-int4", ("--allocator", "uniform", "--budget-code-bits", "4", "--no-sensitivity"))),
    # the whole model (16 layers, 6.9 B parameters, 13.8 GB in bf16): pass cache on, so the matched variants
    # share one routing profile
    "olmoe-1b-7b": ModelSpec("olmoe-1b-7b", "olmoe-1b-7b", False, "f16", (SHAPE_FLAGS[0], ("--calib-sequences", "8",
                             "--seq-len", "128")), ("dmpq-int4", ("--allocator", "uniform", "--budget-code-bits", "4",
                                                                  "--no-sensitivity")), layers=None),
    "qwen3-30b-a3b-1l": ModelSpec("qwen3-30b-a3b-1l", "qwen3-30b-a3b", False, "f16", SHAPE_FLAGS,
                                  ("dmpq-int4", ("--allocator", "uniform", "--budget-code-bits", "4",
                                                 "--no-sensitivity"))),
    # two layers: both tools run the last layer's MoE on the kept positions only (llama.cpp's inp_out_ids,
    # dmpq's keep_point), so a one-layer prefill times attention and one token's MoE; the first of two layers
    # runs its MoE on every prompt token
    "mixtral-8x7b-2l": ModelSpec("mixtral-8x7b-2l", "mixtral-8x7b", False, "f16", SHAPE_FLAGS,
                                 ("dmpq-int4", ("--allocator", "uniform", "--budget-code-bits", "4", "--no-sensitivity")),
                                 layers=2),
    "qwen3-30b-a3b-2l": ModelSpec("qwen3-30b-a3b-2l", "qwen3-30b-a3b", False, "f16", SHAPE_FLAGS,
                                  ("dmpq-int4", ("--allocator", "uniform", "--budget-code-bits", "4",
                                                 "--no-sensitivity")), layers=2),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=lc.BUILD_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", required=True, metavar="DIR", help="llama.cpp cmake build folder (see below)")
    p.add_argument("--models", nargs="+", default=["mixtral-tiny", "olmoe-tiny"], metavar="MODEL",
                   help=f"{', '.join(MODELS)}, or the folder of a trained checkpoint with the samples' tokenizer "
                   "(e.g. one from samples/train.py --hidden 256: K- and i-quants need rows of 256), scored like "
                   "the samples (default: the two samples)")
    p.add_argument("--types", nargs="+", default=list(QUANT_TYPES), help="llama-quantize types")
    p.add_argument("--work", default=str(ROOT / "out" / "bench-llamacpp"))
    p.add_argument("--reuse", action="store_true", help="keep GGUF files and artifacts that already exist")
    p.add_argument("--drop-base", action="store_true",
                   help="delete the base GGUF (f16/f32) once every --types file exists, and leave its row out of the "
                   "timing: on a disk that cannot hold it beside the rest (the whole OLMoE-1B-7B shape's f16 GGUF is "
                   "13 GB); random-weight models only (the quality sets need it)")
    p.add_argument("--no-reference", action="store_true",
                   help="neither compile nor time the reference artifact (uniform 4-bit experts, float non-experts) "
                   "where the matched budgets do not need it (--nonexpert-bits other than 16): one compile and one row "
                   "less, 5 GB of disk on the whole OLMoE-1B-7B shape")
    p.add_argument("--extra-artifacts", nargs="*", default=[], metavar="DIR",
                   help="more dmpq artifacts of the same checkpoint to time in the same interleaved rounds (e.g. the "
                   "same compile with --dispatch gather-if), as rows labelled by their folder names")
    p.add_argument("--genai-artifacts", nargs="*", default=[], metavar="DIR",
                   help="dmpq artifacts to time through onnxruntime-genai too (its shared KV buffer, the threads of "
                   "the other tools), in the same rounds, as rows labelled genai:NAME")
    p.add_argument("--old-dispatch", action="store_true",
                   help="also compile every matched dmpq artifact with --dispatch gather-if (the per-expert dispatch "
                   "before the fused one), as rows labelled ...@gather-if")
    p.add_argument("--pass-cache", action="store_true",
                   help="let the matched artifacts of one trained checkpoint share dmpq-compile's pass cache (profile and "
                   "sensitivity computed once, $DMPQ_CACHE_DIR) instead of --no-cache in every compile; the same "
                   "results, less time on a busy machine")
    p.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds (0: quality only, no timing)")
    p.add_argument("--threads", type=int, default=2, help="threads of every tool and measurement (default 2)")
    p.add_argument("--extra-speed-threads", type=int, nargs="*", default=[],
                   help="also time prefill/decode with these thread counts (keys suffixed _t<N>), e.g. 1 on a "
                   "loaded machine where two synchronising threads get preempted")
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--context", type=int, default=256, help="evaluation window length (both tools)")
    p.add_argument("--chunks", type=int, default=64, help="at most this many evaluation windows per set")
    p.add_argument("--domains", nargs="+", default=["pydoc", "pystdlib"], help="evaluation domains (default both)")
    p.add_argument("--split", default="test", choices=("dev", "test"), help="evaluation split (default test)")
    p.add_argument("--tries", type=int, default=5,
                   help="runs of a llama.cpp tool before giving up when its output is cut short (default 5)")
    p.add_argument("--imatrix-chunks", type=int, default=64, help="llama-imatrix chunks of the calibration text")
    p.add_argument("--group-size", type=int, default=64, help="dmpq group size (for the 2-bit floor)")
    p.add_argument("--dmpq-flags", default="", help="extra dmpq-compile flags of the matched artifacts, e.g. "
                   "'--quant-method gptq' (one string)")
    p.add_argument("--nonexpert-bits", default="4",
                   help="--nonexpert-bits of the matched dmpq artifacts, auto[,KIND=N], N or KIND=N,... (auto: matched "
                   "by --budget-bits, the optimal allocator placing non-experts too; default 4: every matrix, "
                   "as llama.cpp quantizes every matrix; e.g. 4,attention=8,lm_head=8; 16: float non-experts)")
    args = p.parse_args(argv)
    try:
        args.specs = [model_spec(name) for name in args.models]
    except ValueError as e:
        p.error(str(e))
    if args.drop_base and (scored := [s.name for s in args.specs if s.quality]):
        p.error(f"--drop-base removes the base GGUF that the quality sets of {', '.join(scored)} are checked "
                "against: use it with random-weight models only")
    if args.no_reference and (scored := [s.name for s in args.specs if s.quality]):
        p.error(f"--no-reference drops the artifact that {', '.join(scored)}'s KL is measured against: use it with "
                "random-weight models only")
    return args


def model_spec(name: str) -> ModelSpec:
    """A named model of ``MODELS``, or a trained checkpoint folder (scored for quality like the samples)."""
    if name in MODELS:
        return MODELS[name]
    path = Path(name)
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        raise ValueError(f"--models {name!r} is neither one of {', '.join(MODELS)} nor a checkpoint folder with "
                         "config.json and tokenizer.json")
    return ModelSpec(path.resolve().name, None, True, "f32", SAMPLE_FLAGS, FP32_REFERENCE, path.resolve())


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()


# -- inputs ------------------------------------------------------------------------------------------
def checkpoint(spec: ModelSpec, work: Path, reuse: bool) -> Path:
    """The sample folder, or a one-layer random checkpoint at real widths with the sample's byte-level
    tokenizer (so that both tools tokenize exactly alike; the converter pads the vocabulary)."""
    if spec.path is not None:
        return spec.path
    if spec.shape is None:
        return ROOT / "samples" / spec.name
    out = work / "checkpoint"
    if not (reuse and (out / "config.json").is_file()):
        code = ("import json, sys\nfrom dmpq_compile.testing.scale import SHAPES, write_random_checkpoint\n"
                "family, overrides = SHAPES[sys.argv[1]]\nlayers = json.loads(sys.argv[3])\n"
                "write_random_checkpoint(family, sys.argv[2], **{**overrides, **({} if layers is None else "
                "{'num_hidden_layers': layers})})\n")
        subprocess.run([sys.executable, "-c", code, spec.shape, str(out), json.dumps(spec.layers)], check=True)
    bench_form(out)
    return out


def bench_form(ckpt: Path) -> None:
    """Put a random checkpoint into the form both tools read alike: the samples' byte-level tokenizer (the
    converter knows its pre-tokenizer), the model class in ``config.json`` and per-expert keys. Each step
    is a no-op where it is already done, so a reused folder gets it too, e.g. one that
    ``dmpq_compile.testing.scale`` wrote directly (fused experts, its own whitespace tokenizer)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src, dst = ROOT / "samples" / "mixtral-tiny" / name, ckpt / name
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            print(f"  {ckpt}: {name} from samples/mixtral-tiny", flush=True)
            shutil.copy(src, dst)
    add_architecture(ckpt / "config.json")
    unfuse_experts(ckpt)


def unfuse_experts(ckpt: Path) -> None:
    """Rewrite transformers 5's fused experts (``experts.gate_up_proj [E, 2I, H]``, ``down_proj``) as the
    per-expert keys of the family's original checkpoints, which the llama.cpp converter reads (dmpq reads
    both). Same values; the router moves with the experts when the family's module name differs."""
    import re

    from safetensors import safe_open
    from safetensors.torch import save_file

    from dmpq_compile.frontend.families import family_for

    fam = family_for(json.loads((ckpt / "config.json").read_text())["model_type"])
    gate, up, down = fam.expert_names
    fused = re.compile(r"(.*\.layers\.\d+)\.\w+\.(experts\.(gate_up_proj|down_proj)|gate\.weight)$")
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None

    def renamed(key: str) -> bool:  # fused experts, or a router under another module name
        m = fused.match(key)
        return m is not None and (m.group(3) is not None or key != f"{m.group(1)}.{fam.moe_prefixes[0]}.gate.weight")

    for shard in sorted(ckpt.glob("*.safetensors")):
        out = {}
        with safe_open(str(shard), "pt") as f:
            keys = list(f.keys())  # a safetensors handle, not a dict
            if not any(renamed(k) for k in keys):  # already in per-expert form: not rewritten
                continue
            for key in keys:
                m, t = fused.match(key), f.get_tensor(key)
                if m is None:
                    out[key] = t
                    continue
                moe = f"{m.group(1)}.{fam.moe_prefixes[0]}"
                if m.group(3) == "gate_up_proj":
                    inter = t.shape[1] // 2
                    for e in range(t.shape[0]):
                        out[f"{moe}.experts.{e}.{gate}.weight"] = t[e, :inter].clone()
                        out[f"{moe}.experts.{e}.{up}.weight"] = t[e, inter:].clone()
                elif m.group(3) == "down_proj":
                    out.update({f"{moe}.experts.{e}.{down}.weight": t[e].clone() for e in range(t.shape[0])})
                else:
                    out[f"{moe}.gate.weight"] = t
        save_file(out, str(shard), metadata={"format": "pt"})
        if index is not None:
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
            index["weight_map"].update({k: shard.name for k in out})
        del out
    if index is not None:
        index_file.write_text(json.dumps(index, indent=1))


def add_architecture(config_file: Path) -> None:
    """Name the model class in ``config.json`` (the converter picks its converter by ``architectures``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = json.loads(config_file.read_text())
    config.setdefault("architectures", [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]])
    config_file.write_text(json.dumps(config, indent=2))


def corpus_text(model_dir: Path, split: str, n_tokens: int, out: Path) -> list[int]:
    """Write the first documents of a pydoc split (the calibration text of llama-imatrix), joined by blank
    lines, until they hold ``n_tokens`` tokens (plus a margin); return the ids ``tokenizers`` gives it."""
    from dmpq_compile.eval import load_corpus
    from dmpq_compile.eval.tokens import load_tokenizer

    tok = load_tokenizer(model_dir)
    texts, count = [], 0
    for doc in load_corpus("pydoc", split):
        texts.append(doc)
        count += len(tok.encode(doc).ids)
        if count >= n_tokens * 1.05 + 64:
            break
    text = "\n\n".join(texts)
    out.write_text(text, encoding="utf-8")
    ids = tok.encode(text).ids
    if len(ids) < n_tokens:
        raise RuntimeError(f"the pydoc {split} split holds {len(ids)} tokens, fewer than the {n_tokens} needed")
    return ids


def quality_sets(model_dir: Path, args: argparse.Namespace) -> list:
    """The protocol's windows of every ``--domains`` set (``--split``), with the checkpoint's tokenizer."""
    from dmpq_compile.eval import eval_windows
    from dmpq_compile.eval.tokens import load_tokenizer

    tok = load_tokenizer(model_dir)
    sets = [eval_windows(d, args.split, tok, context=args.context, max_windows=args.chunks) for d in args.domains]
    for w in sets:
        if not w.text_exact:
            raise RuntimeError(f"{w.name}: the windows' text does not tokenize back to their ids with {model_dir}'s "
                               "tokenizer, so llama.cpp could not score the same tokens; use a byte-level BPE tokenizer")
    return sets


def check_tokens(llama: lc.LlamaCpp, gguf: Path, text_file: Path, ids: list[int], n: int) -> dict:
    """Compare llama.cpp's tokenization of ``text_file`` with ``ids`` over the first ``n`` tokens."""
    # --no-escape: llama-tokenize turns "\\xe0" in a file into a byte by default; llama-perplexity reads files verbatim
    out = lc.run([llama.tool("llama-tokenize"), "-m", str(gguf), "-f", str(text_file), "--ids", "--log-disable",
                  "--no-bos", "--no-escape"], "llama-tokenize")
    theirs = lc.parse_token_ids(out)
    diff = next((i for i, (a, b) in enumerate(zip(theirs[:n], ids[:n])) if a != b), None)
    if diff is None and len(theirs) < n:
        diff = len(theirs)
    result = {"checked_tokens": n, "llama_tokens": len(theirs), "tokenizers_tokens": len(ids), "first_mismatch": diff}
    if diff is not None:
        raise RuntimeError(f"llama.cpp tokenizes {text_file} differently from tokenizers at token {diff}: {result}")
    return result


# -- building ----------------------------------------------------------------------------------------
def gguf_files(llama: lc.LlamaCpp, spec: ModelSpec, ckpt: Path, work: Path, args: argparse.Namespace,
               calib_file: Path) -> dict[str, Path]:
    """The base GGUF and one file per quantization type (llama.cpp's own tools)."""
    base = work / f"{spec.base.upper()}.gguf"
    imatrix = work / "imatrix.gguf"
    have = args.reuse and imatrix.is_file() and all((work / f"{t}.gguf").is_file() for t in args.types)
    if not (args.reuse and base.is_file()) and not (args.drop_base and have):  # dropped: built only when needed
        lc.ensure_pre_tokenizer(llama, ckpt)
        lc.run([sys.executable, str(llama.source / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", spec.base,
                "--outfile", str(base)], f"convert {spec.name}")
    if not (args.reuse and imatrix.is_file()):
        lc.run([llama.tool("llama-imatrix"), "-m", str(base), "-f", str(calib_file), "-o", str(imatrix),
                "-c", str(args.context), "--chunks", str(args.imatrix_chunks), "-t", str(args.threads)],
               f"llama-imatrix {spec.name}")
    files = {} if args.drop_base else {spec.base.upper(): base}
    for qtype in args.types:
        out = work / f"{qtype}.gguf"
        if not (args.reuse and out.is_file()):
            print(f"  llama-quantize {qtype}", flush=True)
            lc.run([llama.tool("llama-quantize"), "--imatrix", str(imatrix), str(base), str(out), qtype,
                    str(args.threads)], f"llama-quantize {qtype}")
        files[qtype] = out
    if args.drop_base and base.is_file():
        print(f"  --drop-base: deleting {base} ({base.stat().st_size / 1e9:.1f} GB)", flush=True)
        base.unlink()
    return files


def gguf_row(llama: lc.LlamaCpp, path: Path, params: tuple[int, int], routed: float) -> dict:
    """A GGUF's sizes; ``read_bytes_per_token``: what one decoded token reads, the routed fraction ``routed``
    (top-k / experts) of the stacked expert tensors, one row of the embedding, every other tensor whole."""
    tensors = lc.gguf_tensors(llama, path)
    expert = [t for n, t in tensors.items() if lc.is_gguf_expert(n)]
    types: dict[str, int] = {}
    for t in tensors.values():
        types[t["type"]] = types.get(t["type"], 0) + t["elements"]
    read = sum(t["bytes"] * (routed if lc.is_gguf_expert(n) else 1 / t["rows"] if n == "token_embd.weight" else 1)
               for n, t in tensors.items())
    return {"kind": "gguf", "path": str(path), "file_bytes": path.stat().st_size, "read_bytes_per_token": read,
            "bpw": lc.stored_bpw(path.stat().st_size, params[0]),
            "tensor_bpw": lc.stored_bpw(sum(t["bytes"] for t in tensors.values()), params[0]),
            "expert_bpw": lc.stored_bpw(sum(t["bytes"] for t in expert), params[1]),
            "expert_types": sorted({t["type"] for t in expert}), "elements_by_type": types}


def dmpq_row(path: Path, params: tuple[int, int]) -> dict:
    """An artifact's sizes; ``read_bytes_per_token``: what one decoded token reads, each expert at its routing
    frequency in the compile's calibration (report.json; ``dmpq_compile.bench.weight_stats``), or None for an
    artifact whose manifest lacks what it needs."""
    from dmpq_compile.artifact import ArtifactError
    from dmpq_compile.bench import expert_frequencies, weight_stats

    manifest = json.loads((path / "manifest.json").read_text())
    freqs = expert_frequencies(path)
    try:
        read = weight_stats(path, manifest, freqs).read_bytes_per_token if freqs else None
    except ArtifactError:
        read = None
    file_bytes = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name != "report.json")
    expert_bytes = sum(e["bytes"] for e in manifest["experts"].values())
    hist = manifest["quantization"]["bits_histogram"]
    weights = ((manifest.get("storage") or {}).get("weights") or {}).get("bytes")
    return {"kind": "dmpq", "path": str(path), "file_bytes": file_bytes, "read_bytes_per_token": read,
            "bpw": lc.stored_bpw(file_bytes, params[0]),
            "tensor_bpw": None if weights is None else lc.stored_bpw(weights, params[0]),
            "expert_bpw": lc.stored_bpw(expert_bytes, params[1]), "expert_bytes": expert_bytes,
            "bits_histogram": hist, "manifest_bpw": (manifest.get("storage") or {}).get("bits_per_weight"),
            "expert_code_bits": sum(int(b) * n for b, n in hist.items()) / sum(hist.values())}


def min_expert_bytes(shapes: dict[str, tuple[int, ...]], bits: int, group_size: int) -> int:
    """Stored bytes of all routed experts at ``bits`` on ort-cpu ([out, in] weights, fused ones per expert)."""
    from dmpq_compile.backends.ort_cpu import OrtCpuBackend

    backend, total = OrtCpuBackend(), 0
    for name, shape in shapes.items():
        if lc.is_hf_expert(name):
            experts = shape[0] if len(shape) == 3 else 1
            total += experts * backend.weight_bytes(shape[-2], shape[-1], bits, group_size)
    return total


def dmpq_budget(target_bpw: float, target_expert_bpw: float, params: tuple[int, int], non_expert_bytes: float,
                floor_bytes: float) -> tuple[float, str]:
    """(stored expert bytes to allow, how matched): the whole file's bpw when the experts can be made that
    small, else the GGUF's expert bpw (never below ``floor_bytes``, the experts at the lowest bit-width)."""
    whole = target_bpw * params[0] / 8 - non_expert_bytes
    if whole >= floor_bytes:
        return whole, "whole file"
    return max(target_expert_bpw * params[1] / 8, floor_bytes), "experts only"


def compile_dmpq(ckpt: Path, out: Path, flags: list[str], reuse: bool) -> None:
    if reuse and (out / "manifest.json").is_file():
        return
    cmd = ["dmpq-compile", "compile", str(ckpt), "--target", "ort-cpu", *flags, "-o", str(out), "--overwrite",
           "--no-progress"]
    print(f"  {' '.join(cmd)}", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"dmpq-compile failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")


def dmpq_variants(spec: ModelSpec, ckpt: Path, work: Path, ggufs: dict[str, dict], args: argparse.Namespace,
                  params: tuple[int, int]) -> dict[str, dict]:
    """The reference artifact, then one artifact per distinct matched budget."""
    ref_label, ref_flags = spec.reference
    alloc_flags, common_flags = spec.flags
    if args.pass_cache:
        common_flags = tuple(f for f in common_flags if f != "--no-cache")
    policy = [] if str(args.nonexpert_bits).strip() == "16" else ["--nonexpert-bits", str(args.nonexpert_bits)]
    rows = {}
    if not (args.no_reference and policy):  # without a policy the reference sizes the non-experts
        compile_dmpq(ckpt, work / ref_label, [*ref_flags, *common_flags], args.reuse)
        rows[ref_label] = {**dmpq_row(work / ref_label, params), "flags": list(ref_flags)}
    if split_auto(str(args.nonexpert_bits))[0]:
        return rows | auto_variants(ckpt, work, ggufs, args, params, policy, common_flags)
    sizer = ref_label
    if policy:  # the non-expert bytes of the matched artifacts' policy
        sizer = "dmpq-int4-ne" + str(args.nonexpert_bits).replace(",", "+").replace("=", "")
        flags = ["--allocator", "uniform", "--budget-code-bits", "4", "--no-sensitivity", *policy]
        compile_dmpq(ckpt, work / sizer, [*flags, *common_flags], args.reuse)
        rows[sizer] = {**dmpq_row(work / sizer, params), "flags": flags}
    non_expert = rows[sizer]["file_bytes"] - rows[sizer]["expert_bytes"]
    floor = min_expert_bytes(lc.safetensors_shapes(ckpt), 2, args.group_size)
    budgets: list[tuple[float, str, list[str]]] = []
    for qtype in args.types:
        g = ggufs[qtype]
        nbytes, basis = dmpq_budget(g["bpw"], g["expert_bpw"], params, non_expert, floor)
        same = next((b for b in budgets if abs(b[0] - nbytes) <= 0.01 * nbytes), None)
        if same:
            same[2].append(qtype)
        else:
            budgets.append((nbytes, basis, [qtype]))
    for nbytes, basis, types in budgets:
        label = "dmpq~" + "+".join(types)  # a folder name too
        flags = ["--budget-mb", f"{nbytes / 2**20:.4f}", *policy, *alloc_flags, *args.dmpq_flags.split(),
                 *common_flags]
        compile_dmpq(ckpt, work / label, flags, args.reuse)
        rows[label] = {**dmpq_row(work / label, params), "flags": flags, "match": basis, "matched_types": types,
                       "budget_mb": nbytes / 2**20}
        if args.old_dispatch:
            old = [*flags, "--dispatch", "gather-if"]
            compile_dmpq(ckpt, work / f"{label}@gather-if", old, args.reuse)
            rows[f"{label}@gather-if"] = {**dmpq_row(work / f"{label}@gather-if", params), "flags": old,
                                          "match": basis, "matched_types": types, "budget_mb": nbytes / 2**20}
    return rows


def auto_variants(ckpt: Path, work: Path, ggufs: dict[str, dict], args: argparse.Namespace, params: tuple[int, int],
                  policy: list[str], common_flags: tuple[str, ...]) -> dict[str, dict]:
    """``--nonexpert-bits auto[,KIND=N]``: one artifact per GGUF type at ``--budget-bits`` = the GGUF's whole-file
    bpw less what a dmpq folder stores besides its weight tensors (graph structure, tokenizer.json,
    manifest; read from a uniform 4-bit artifact). The allocator places experts and non-experts in it,
    so only the optimal and uniform allocators apply; a type below the smallest feasible budget is
    skipped with the reason."""
    sizer = "dmpq-int4-ne4"
    flags = ["--allocator", "uniform", "--budget-code-bits", "4", "--no-sensitivity", "--nonexpert-bits", "4"]
    compile_dmpq(ckpt, work / sizer, [*flags, *common_flags], args.reuse)
    rows = {sizer: {**dmpq_row(work / sizer, params), "flags": flags}}
    manifest = json.loads((work / sizer / "manifest.json").read_text())
    overhead_bpw = lc.stored_bpw(rows[sizer]["file_bytes"] - manifest["storage"]["weights"]["bytes"], params[0])
    alloc = ["--allocator", "optimal"]  # places non-experts by sensitivity (random-weight shapes too)
    for qtype in args.types:
        budget = ggufs[qtype]["bpw"] - overhead_bpw
        label = f"dmpq~{qtype}"
        flags = ["--budget-bits", f"{budget:.4f}", *policy, *alloc, *args.dmpq_flags.split(), *common_flags]
        try:
            compile_dmpq(ckpt, work / label, flags, args.reuse)
        except RuntimeError as e:
            if "infeasible" not in str(e):
                raise
            print(f"  {label}: skipped, --budget-bits {budget:.2f} is infeasible", flush=True)
            continue
        rows[label] = {**dmpq_row(work / label, params), "flags": flags, "match": "whole file",
                       "matched_types": [qtype], "budget_bits": budget}
    return rows


# -- measuring ---------------------------------------------------------------------------------------
def time_gguf(llama: lc.LlamaCpp, path: Path, args: argparse.Namespace, threads: int) -> dict[str, float]:
    common = [llama.tool("llama-bench"), "-m", str(path), "-t", str(threads), "-r", "1", "-o", "json"]
    pre = lc.run([*common, "-p", str(args.prefill_tokens), "-n", "0"], "llama-bench prefill")
    dec = lc.run([*common, "-p", "0", "-n", str(args.decode_tokens), "-d", str(args.prefill_tokens)],
                 "llama-bench decode")
    return {**lc.parse_bench_json(pre), **lc.parse_bench_json(dec)}


def time_dmpq(path: Path, args: argparse.Namespace, threads: int) -> dict[str, float]:
    from dmpq_compile.bench import BenchConfig, bench

    cfg = BenchConfig(prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens, rounds=1,
                      threads=threads, corpus=None, rss=False)
    r = bench([path], cfg, progress=False)[0]
    # the same statistic as llama-bench's: the mean time of the round's decoded tokens (its avg_ts)
    return {"prefill_tok_s": r["prefill_tok_s"], "decode_ms": r["decode_mean_ms"]}


def time_genai(path: Path, args: argparse.Namespace, threads: int) -> dict[str, float]:
    """onnxruntime-genai on an artifact: prefill tok/s of one ``append_tokens`` of the prompt, and the mean
    time of ``--decode-tokens`` generated tokens after a prompt as long (llama-bench's ``-d``)."""
    import onnxruntime_genai as og
    from bench_genai import with_threads  # same folder

    model = og.Model(str(with_threads(path, threads)))
    ids = np.random.default_rng(0).integers(2, 256, (1, args.prefill_tokens)).astype(np.int32)

    def generator(length: int):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, do_sample=False)
        return og.Generator(model, params)

    gen = generator(args.prefill_tokens + 1)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    prefill = time.perf_counter() - t0
    gen = generator(args.prefill_tokens + args.decode_tokens + 1)
    gen.append_tokens(ids)
    steps = []
    for _ in range(args.decode_tokens):
        t0 = time.perf_counter()
        gen.generate_next_token()
        steps.append(time.perf_counter() - t0)
    return {"prefill_tok_s": args.prefill_tokens / prefill, "decode_ms": statistics.fmean(steps) * 1e3}


def timed_bytes(rows: dict[str, dict]) -> int:
    """Bytes of the distinct files the speed rounds read: each GGUF file, each artifact's model files."""
    files: set[Path] = set()
    for row in rows.values():
        path = Path(row["path"])
        files.update([path] if path.is_file() else (f for f in path.glob("model.onnx*") if f.is_file()))
    return sum(f.stat().st_size for f in files)


def page_cache_check(rows: dict[str, dict]) -> dict[str, float]:
    """The timed files' size against this machine's memory, warned about when they do not fit together: every
    round then reads some of them from disk again, and reclaiming the page cache competes with the timed
    threads (a session of this machine saw rounds up to 2x apart that way, benchmarks/README.md)."""
    timed = timed_bytes(rows)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = timed <= 0.8 * total
    if not fits:
        print(f"  warning: the timed rows' files hold {timed / 1e9:.1f} GB against {total / 1e9:.1f} GB of memory; "
              "rounds will refill the page cache while timing, so their times scatter. Time fewer rows per run "
              "(fewer --types or --extra-artifacts)", flush=True)
    return {"timed_files_gb": round(timed / 1e9, 2), "memory_gb": round(total / 1e9, 2), "fits": fits}


def interleaved_speed(llama: lc.LlamaCpp, rows: dict[str, dict], args: argparse.Namespace) -> None:
    labels = list(rows)
    if args.rounds < 1:  # --rounds 0: a quality-only run
        return
    samples: dict[str, list[dict]] = {k: [] for k in labels}
    for r in range(args.rounds):
        for i in range(len(labels)):
            label = labels[(i + r) % len(labels)]
            path, sample = Path(rows[label]["path"]), {}
            for threads in (args.threads, *args.extra_speed_threads):
                suffix = "" if threads == args.threads else f"_t{threads}"
                kind = rows[label]["kind"]
                timed = (time_gguf(llama, path, args, threads) if kind == "gguf" else
                         time_genai(path, args, threads) if kind == "genai" else time_dmpq(path, args, threads))
                sample.update({k + suffix: v for k, v in timed.items()})
            samples[label].append(sample)
        print(f"  round {r + 1}/{args.rounds} done ({uptime()})", flush=True)
    for label in labels:
        for key in samples[label][0]:
            values = [s[key] for s in samples[label]]
            rows[label][key] = statistics.median(values)
            rows[label][key + "_rounds"] = values


def chunk_logprobs(path: Path, windows, threads: int) -> np.ndarray:
    """Log-probabilities ``[windows, C - 1 - C/2, V]`` of an artifact at the positions llama-perplexity scores
    (the protocol's :func:`~dmpq_compile.eval.protocol.window_logprobs` through the artifact's runtime)."""
    from dmpq_compile.eval import NumpyLogits, window_logprobs
    from dmpq_compile.runtime import load

    return window_logprobs(NumpyLogits(load(path, threads=threads).logits), windows)


def dmpq_quality(rows: dict[str, dict], ref: np.ndarray, windows, args: argparse.Namespace) -> dict:
    """Per-token scores of every dmpq row on ``windows``, KL to ``ref`` (the fp32 artifact's log-probs)."""
    from dmpq_compile.eval import NumpyLogits, score
    from dmpq_compile.runtime import load

    return {label: score(NumpyLogits(load(Path(row["path"]), threads=args.threads).logits), windows, reference=ref)
            for label, row in rows.items() if row["kind"] == "dmpq"}


def gguf_scores(llama: lc.LlamaCpp, path: Path, windows, text_file: Path, ref: np.ndarray, work: Path,
                args: argparse.Namespace):
    """Per-token scores of a GGUF on ``windows``: llama-perplexity writes its log-probabilities at every scored
    position (``--kl-divergence-base``), which are checked to be for the windows' tokens and compared with
    ``ref`` here, as the dmpq rows are."""
    from dmpq_compile.eval import Scores

    out = work / f"{path.stem}.{windows.name.replace('/', '-')}.logprobs"
    k, c = windows.ids.shape
    printed = lc.run_logprobs([llama.tool("llama-perplexity"), "-m", str(path), "-f", str(text_file), "-c", str(c),
                               "--chunks", str(k), "-t", str(args.threads)], f"llama-perplexity {path.name} "
                              f"{windows.name}", out, tries=args.tries)
    n_ctx, n_vocab, n_chunk, tokens = lc.read_logprobs_header(out)
    if (n_ctx, n_chunk) != (c, k) or not np.array_equal(tokens, windows.ids):
        raise RuntimeError(f"llama-perplexity scored other tokens than the {windows.name} windows ({n_chunk} chunks of "
                           f"{n_ctx}; first difference at {_first_difference(tokens, windows.ids)}): does the GGUF "
                           "add a BOS token, or tokenize the text differently?")
    vocab = ref.shape[-1]
    if n_vocab < vocab:
        raise RuntimeError(f"{path} has a vocabulary of {n_vocab}, the reference {vocab}")
    targets = windows.targets
    nll, kl = np.empty(targets.shape), np.empty(targets.shape)
    top1 = np.empty(targets.shape, dtype=bool)
    for i, lp in zip(range(0, k, 4), lc.iter_logprobs(out, batch=4)):
        rows = slice(i, i + lp.shape[0])
        lp = lp[..., :vocab]  # a converter may pad the vocabulary: those rows carry no mass
        r = ref[rows].astype(np.float64)
        nll[rows] = -np.take_along_axis(lp, targets[rows, :, None], axis=-1)[..., 0]
        kl[rows] = (np.exp(r) * (r - lp)).sum(-1)
        top1[rows] = r.argmax(-1) == lp.argmax(-1)
    out.unlink()  # ~1 MB a window: the scores are what is kept
    scores = Scores(nll, kl, top1)
    scores.printed = printed  # llama-perplexity's own figures, when they reached the pipe or its log
    return scores


def _first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    a, b = a.reshape(-1), b.reshape(-1)
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else (None if a.size == b.size else n)


def set_quality(llama: lc.LlamaCpp, rows: dict[str, dict], spec: ModelSpec, windows, work: Path,
                args: argparse.Namespace) -> dict:
    """Quality of every row on one evaluation set, with intervals; each row gets ``quality[set]``."""
    from dmpq_compile.eval import DocBootstrap, summarize

    text_file = work / f"{windows.name.replace('/', '-')}.txt"  # never committed: out/ is ignored
    text_file.write_text(windows.text, encoding="utf-8")
    base = f"gguf-{spec.base.upper()}"
    check = check_tokens(llama, Path(rows[base]["path"]), text_file, windows.ids.reshape(-1).tolist(), windows.ids.size)
    ref = chunk_logprobs(Path(rows[spec.reference[0]]["path"]), windows, args.threads)
    scores = dmpq_quality(rows, ref, windows, args)
    for label, row in rows.items():
        if row["kind"] == "gguf":
            scores[label] = gguf_scores(llama, Path(row["path"]), windows, text_file, ref, work, args)
    boot = DocBootstrap(windows)
    summary = summarize(windows, scores, boot=boot)
    for label, row in rows.items():
        if label not in summary:
            continue
        q = summary[label]
        if getattr(scores[label], "printed", None):
            q["llama_perplexity_printed"] = scores[label].printed
        vs = {}
        for t in row.get("matched_types", []):
            other = f"gguf-{t}"
            if other in scores:
                vs[other] = {"ppl_ratio": boot.ppl_ratio(scores[label].nll, scores[other].nll).as_dict(),
                             "kl_ratio": boot.ratio(scores[label].kl, scores[other].kl).as_dict()}
        if vs:
            q["vs"] = vs
        row.setdefault("quality", {})[windows.name] = q
    agree = scores[base]
    return {**windows.record(), "bootstrap": boot.record(), "tokens_check": check,
            "reference": spec.reference[0],
            "reference_agreement": {"gguf": base, "mean_kl": float(agree.kl.mean()), "max_kl": float(agree.kl.max()),
                                    "max_abs_nll_diff": float(np.abs(agree.nll - scores[spec.reference[0]].nll).max()),
                                    "top1": float(agree.top1.mean())}}


# -- one model ---------------------------------------------------------------------------------------
def run_model(llama: lc.LlamaCpp, spec: ModelSpec, args: argparse.Namespace) -> dict:
    work = Path(args.work) / spec.name
    work.mkdir(parents=True, exist_ok=True)
    print(f"{spec.name}: {uptime()}", flush=True)
    ckpt = checkpoint(spec, work, args.reuse)
    params = lc.count_params(lc.safetensors_shapes(ckpt))
    calib_file = work / "calib.txt"
    corpus_text(ckpt, "calib", args.imatrix_chunks * args.context, calib_file)  # never committed: out/ is ignored
    files = gguf_files(llama, spec, ckpt, work, args, calib_file)
    from dmpq_compile.frontend.families import family_for

    config = json.loads((ckpt / "config.json").read_text())
    routed = config["num_experts_per_tok"] / family_for(config["model_type"]).num_experts(SimpleNamespace(**config))
    rows = {f"gguf-{k}": {**gguf_row(llama, p, params, routed)} for k, p in files.items()}
    ggufs = {k: rows[f"gguf-{k}"] for k in args.types}
    rows.update(dmpq_variants(spec, ckpt, work, ggufs, args, params))
    for extra in map(Path, args.extra_artifacts):
        if not (extra / "manifest.json").is_file():
            raise SystemExit(f"--extra-artifacts {extra} is not an artifact folder (no manifest.json)")
        rows[extra.name] = {**dmpq_row(extra, params), "flags": "(given)"}
    for path in map(Path, args.genai_artifacts):
        if not (path / "genai_config.json").is_file():
            raise SystemExit(f"--genai-artifacts {path} has no genai_config.json (an ort-cpu artifact compiled "
                             "before onnxruntime-genai's contract?)")
        rows[f"genai:{path.name}"] = {**dmpq_row(path, params), "kind": "genai", "flags": "(given)"}
    result: dict = {"model": spec.name, "checkpoint": str(ckpt), "params": params[0], "expert_params": params[1]}
    if spec.path is not None and (ckpt / "training.json").is_file():  # a checkpoint not in the repository
        trained = json.loads((ckpt / "training.json").read_text())
        result["training"] = {k: v for k, v in trained.items() if k not in ("loss_curve", "expert_frequency")}
    if spec.quality:
        result["quality_sets"] = [set_quality(llama, rows, spec, w, work, args) for w in quality_sets(ckpt, args)]
    for row in rows.values():  # llama.cpp's default cache is float16, ours float32
        row["kv_read_bytes_per_token"] = kv_read_bytes(config, args.prefill_tokens, args.decode_tokens,
                                                       2 if row["kind"] == "gguf" else 4)
    result["uptime_before_speed"] = uptime()
    if args.rounds > 0:
        result["page_cache"] = page_cache_check(rows)
    interleaved_speed(llama, rows, args)
    result["uptime_after_speed"] = uptime()
    result["rows"] = rows
    print(table(rows), flush=True)
    for q in result.get("quality_sets", []):
        print(quality_table(rows, q["set"]), flush=True)
    return result


SPEED_NAMES = {"prefill_tok_s": "prefill tok/s (median of rounds)",
               "decode_ms": "decode ms/token (mean of a round's tokens, median of rounds)"}
STATISTICS = {"prefill_tok_s": "prompt tokens / time of one prefill (llama-bench -p N -n 0, -r 1: its avg_ts); median "
                               "over rounds",
              "decode_ms": "mean time per token of --decode-tokens tokens after a prefill of --prefill-tokens "
                           "(llama-bench -n N -d P, -r 1: 1000/avg_ts; dmpq bench: decode_mean_ms); median over rounds"}


def table(rows: dict[str, dict]) -> str:
    """Markdown table of sizes and speed (columns for every thread count measured), ratios to the first row."""
    base = next(iter(rows.values()))
    speed = [k for k in base if k.startswith(("prefill_tok_s", "decode_ms")) and not k.endswith("_rounds")]
    names = []
    for k in speed:
        key, _, threads = k.rpartition("_t") if k not in SPEED_NAMES else (k, "", "")
        names.append(SPEED_NAMES[key] + (f" [{threads} threads]" if threads else ""))
    head = ["variant", "match", "bpw", "tensor bpw", "expert bpw", "file MB", "types held (GGUF: share of parameters)",
            *names, "read GB/token (decode: weights + KV)", "GB/s (decode)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        tensor = "-" if r.get("tensor_bpw") is None else f"{r['tensor_bpw']:.2f}"
        cells = [label, r.get("match", ""), f"{r['bpw']:.2f}", tensor, f"{r['expert_bpw']:.2f}",
                 f"{r['file_bytes'] / 1e6:.2f}", types_held(r),
                 *(f"{r[k]:.{0 if k.startswith('prefill') else 3}f} ({r[k] / base[k]:.2f}x)" for k in speed),
                 *read_cells(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_cells(row: dict) -> list[str]:
    """Bytes one decoded token reads, its weights (experts at their routing frequency) plus the KV cache it attends
    (``kv_read_bytes_per_token``, where the row has it), and the rate that makes of the decode time (of the default
    thread count)."""
    read = row.get("read_bytes_per_token")
    if read is None:
        return ["-", "-"]
    read += row.get("kv_read_bytes_per_token") or 0
    return [f"{read / 1e9:.3f}", f"{read / (row['decode_ms'] * 1e-3) / 1e9:.1f}" if row.get("decode_ms") else "-"]


def kv_read_bytes(config: dict, prefill: int, decode: int, element_bytes: int) -> int:
    """The KV cache bytes a decoded token reads, averaged over ``decode`` tokens after ``prefill``: every layer's
    keys and values of every cached position (the token's own included), ``element_bytes`` each (llama.cpp caches
    float16 by default, dmpq's artifacts float32)."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    positions = prefill + (decode + 1) / 2  # the mean over the tokens: prefill + 1, ..., prefill + decode
    return round(config["num_hidden_layers"] * 2 * kv_heads * head_dim * element_bytes * positions)


def types_held(row: dict) -> str:
    """What a file really stores: a GGUF's tensor types (llama-quantize falls back to other types where a row is not
    a multiple of the type's block) or a dmpq artifact's expert bit-widths, each with its share of the parameters."""
    if row["kind"] != "gguf":
        hist = row.get("bits_histogram") or {}
        total = sum(hist.values()) or 1
        return "experts: " + ", ".join(f"{b}-bit {100 * n / total:.0f}%" for b, n in
                                       sorted(hist.items(), key=lambda kv: int(kv[0])))
    counts, total = row["elements_by_type"], sum(row["elements_by_type"].values()) or 1
    return ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def quality_table(rows: dict[str, dict], set_name: str) -> str:
    """Markdown table of one evaluation set: ppl, KL to the fp32 reference, top-1 agreement with 95% intervals,
    and each matched dmpq row's paired ratios to its GGUF type(s)."""
    from dmpq_compile.eval.protocol import format_interval

    head = ["variant", f"{set_name} ppl [95%]", "KL [95%]", "top-1 [95%]", "vs GGUF: ppl ratio, KL ratio [95%]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        q = (r.get("quality") or {}).get(set_name)
        if q is None:
            continue
        vs = "; ".join(f"{other}: {format_interval(v['ppl_ratio'], '{:.3f}')}, {format_interval(v['kl_ratio'], '{:.2f}')}"
                       for other, v in q.get("vs", {}).items())
        lines.append("| " + " | ".join([label, format_interval(q["ppl"], "{:.3f}"), format_interval(q["kl"], "{:.2e}"),
                                         format_interval(q["top1"], "{:.3f}"), vs or "-"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dmpq_compile.bench import machine

    args = parse_args(argv)
    try:
        llama = lc.find_llama_cpp(args.llama_cpp)
    except lc.LlamaCppError as e:
        sys.exit(str(e))
    start = {"uptime": uptime(), "commit": git("rev-parse", "--short", "HEAD"), "time": time.strftime("%F %T")}
    print(f"start: {start}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"llamacpp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    models, failed = [], []
    for spec in args.specs:  # the JSON is rewritten after each model: a later failure keeps the earlier rows
        try:
            models.append(run_model(llama, spec, args))
        except (lc.LlamaCppError, RuntimeError) as e:
            print(f"{spec.name} failed: {e}", file=sys.stderr, flush=True)
            failed.append({"model": spec.name, "error": str(e)[-2000:]})
        if not models:  # never a results file that holds only errors
            continue
        record = {k: v for k, v in vars(args).items() if k != "specs"}
        out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/bench_llamacpp.py", *sys.argv[1:]]),
                                   "start": start, "end_uptime": uptime(), "machine": machine(),
                                   "statistics": STATISTICS, "protocol": "docs/evaluation.md",
                                   "llama_cpp": {"source": str(llama.source), "version": llama_version(llama)},
                                   "args": record, "models": models, "failed": failed}, indent=1))
        print(f"wrote {out}", flush=True)
    if not models:
        print("no model finished: no results file written", file=sys.stderr, flush=True)
    return 1 if failed else 0


def llama_version(llama: lc.LlamaCpp) -> str:
    res = subprocess.run([llama.tool("llama-bench"), "--version"], capture_output=True, text=True, check=False)
    return (res.stdout + res.stderr).strip().splitlines()[0] if (res.stdout + res.stderr).strip() else "?"


if __name__ == "__main__":
    sys.exit(main())
