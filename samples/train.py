#!/usr/bin/env python
"""Train a tiny Mixture-of-Experts sample model (and its BPE tokenizer) from scratch on CPU.

Example (the exact commands that made the committed samples are in samples/README.md)::

    python samples/train.py --family mixtral --out samples/mixtral-tiny --time-budget-min 22
    python samples/train.py --family olmoe --out samples/olmoe-tiny --tokenizer samples/mixtral-tiny \\
        --time-budget-min 22

The output folder is a normal Hugging Face checkpoint (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json) plus training.json with the recipe
and results. With --time-budget-min the cosine learning-rate schedule follows wall time, so the
rate reaches its floor exactly when the budget runs out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dmpq_compile.eval import (
    DEFAULT_SEPARATOR,
    expert_frequencies,
    hf_logits_fn,
    load_corpus,
    perplexity,
    tokenize_corpus,
    unigram_perplexity,
)

FAMILIES = ("mixtral", "olmoe", "qwen3_moe")
# Suggested recipes; every value can be overridden on the command line.
RECIPES = {
    "mixtral": {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 256, "experts": 8,
                "top_k": 2, "aux_coef": 0.02},
    "olmoe": {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 64, "experts": 32,
              "top_k": 4, "aux_coef": 0.01},
    # fine-grained, the shape of Qwen3-30B-A3B / OLMoE-1B-7B (many narrow experts, top-8), with every
    # width a multiple of 256 so that llama.cpp's K- and i-quants apply to each row
    "qwen3_moe": {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 256, "experts": 64,
                  "top_k": 8, "aux_coef": 0.01},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, required=True)
    p.add_argument("--out", required=True, type=Path, help="output checkpoint folder")
    p.add_argument("--corpus", default="pydoc", help="'pydoc' or a text file / folder (default: pydoc)")
    p.add_argument("--tokenizer", type=Path, help="reuse tokenizer.json from this folder instead of training one")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, help="maximum optimizer steps")
    p.add_argument("--time-budget-min", type=float, help="stop training after this many minutes")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N steps with the learning-rate schedule of --steps: the first N steps of that run, "
                   "bit for bit (samples/rebuild.py --prefix checks a machine's determinism this way)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, help="cap on test tokens for perplexity/routing (default: all)")
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "experts", "top-k"):
        p.add_argument(f"--{name}", type=int, help="override the family recipe")
    p.add_argument("--aux-coef", type=float, help="router aux loss coefficient (override the recipe)")
    p.add_argument("--max-position-embeddings", type=int, default=1024)
    args = p.parse_args(argv)
    if args.steps is None and args.time_budget_min is None:
        p.error("give --steps and/or --time-budget-min so that training knows when to stop")
    if args.stop_after is not None and (args.steps is None or args.time_budget_min is not None
                                        or not 0 < args.stop_after <= args.steps):
        p.error("--stop-after N needs --steps (at least N) and no --time-budget-min: it stops a deterministic run early")
    for key, value in RECIPES[args.family].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer whose only special token is <|endoftext|> (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[DEFAULT_SEPARATOR],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def load_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        sys.exit(f"--tokenizer {folder}: no tokenizer.json there; point it at a folder this script wrote")
    return Tokenizer.from_file(str(path))


def save_tokenizer(tok, out: Path, model_max_length: int) -> None:
    """Save tokenizer.json + tokenizer_config.json so that AutoTokenizer loads the folder offline."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=DEFAULT_SEPARATOR, eos_token=DEFAULT_SEPARATOR,
                                   pad_token=DEFAULT_SEPARATOR, unk_token=None, model_max_length=model_max_length)
    fast.save_pretrained(str(out))


# ------------------------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace, vocab_size: int, special_id: int):
    """Build the family's untrained transformers model in fp32 from the recipe in ``args``."""
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        OlmoeConfig,
        OlmoeForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    common = {"vocab_size": vocab_size, "hidden_size": args.hidden, "intermediate_size": args.intermediate,
              "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
              "num_key_value_heads": args.kv_heads, "max_position_embeddings": args.max_position_embeddings,
              "tie_word_embeddings": False, "num_experts_per_tok": args.top_k, "output_router_logits": True,
              "router_aux_loss_coef": args.aux_coef, "bos_token_id": special_id, "eos_token_id": special_id,
              "pad_token_id": special_id}
    if args.family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(num_local_experts=args.experts, **common))
    elif args.family == "olmoe":
        model = OlmoeForCausalLM(OlmoeConfig(num_experts=args.experts, **common))
    else:  # qwen3_moe: intermediate_size is the (unused) dense MLP's width; the experts' is moe_intermediate_size
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(num_experts=args.experts, moe_intermediate_size=args.intermediate,
                                                   head_dim=args.hidden // args.heads, norm_topk_prob=True,
                                                   **common))
    return model.float()


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warmup over steps, then cosine decay to ``min_lr_ratio * lr`` over ``progress`` in [0, 1]."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss computed per layer and averaged over layers.

    transformers' built-in ``aux_loss`` pools the counts of all layers before balancing, which lets
    one layer starve experts as long as another layer compensates; balancing every layer keeps all
    experts of every layer in use. A perfectly balanced layer scores ``top_k``.
    """
    per_layer = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        n_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        frac_tokens = F.one_hot(chosen, n_experts).sum(1).float().mean(0)  # sums to top_k
        per_layer.append(n_experts * (frac_tokens * probs.mean(0)).sum())
    return torch.stack(per_layer).mean()


def train(model, train_ids: np.ndarray, args: argparse.Namespace) -> dict:
    """Run the training loop until --steps or --time-budget-min is reached; return its statistics."""
    rng = np.random.default_rng(args.seed)
    data = torch.from_numpy(train_ids)
    n_starts = train_ids.size - args.seq_len - 1
    if n_starts < 1:
        sys.exit(f"the train split has only {train_ids.size} tokens; need more than --seq-len {args.seq_len}")
    opt = make_optimizer(model, args)
    budget_s = args.time_budget_min * 60 if args.time_budget_min else math.inf
    max_steps = args.steps or sys.maxsize
    model.train()
    losses, aux_losses, step, t0 = [], [], 0, time.time()
    stop = min(max_steps, args.stop_after or max_steps)
    bar = tqdm(total=args.stop_after or args.steps, desc=f"train {args.family}", unit="step", mininterval=5)
    while step < stop and time.time() - t0 < budget_s:
        progress = max(step / max_steps, (time.time() - t0) / budget_s)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, args)
        starts = rng.integers(0, n_starts, size=args.batch_size)
        batch = torch.stack([data[s:s + args.seq_len] for s in starts])
        out = model(input_ids=batch, use_cache=False, output_router_logits=True)
        lm_loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        aux_loss = per_layer_balance_loss(out.router_logits, args.top_k)
        (lm_loss + args.aux_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(lm_loss))
        aux_losses.append(aux := float(aux_loss))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", aux=f"{aux:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    bar.close()
    wall = time.time() - t0
    return {"steps": step, "tokens_seen": step * args.batch_size * args.seq_len, "train_wall_s": round(wall, 1),
            "final_train_loss": round(float(np.mean(losses[-50:])), 4),
            "final_aux_loss": round(float(np.mean(aux_losses[-50:])), 4),
            "loss_curve": [round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)]}


def evaluate(model, train_ids: np.ndarray, test_ids: np.ndarray, vocab_size: int, args) -> dict:
    """Test perplexity (strided, context=seq_len, stride=seq_len/2), unigram baseline and routing spread."""
    model.eval()
    stride = max(1, args.seq_len // 2)
    ppl = perplexity(hf_logits_fn(model), test_ids, context=args.seq_len, stride=stride, batch_size=8)
    uni = unigram_perplexity(train_ids, test_ids[1:], vocab_size)
    routing = expert_frequencies(model, test_ids, seq_len=args.seq_len, batch_size=8)
    return {"test_tokens": ppl.n_tokens, "eval_context": args.seq_len, "eval_stride": stride,
            "test_perplexity": round(ppl.ppl, 3), "test_nll": round(ppl.nll, 4),
            "unigram_test_perplexity": round(uni.ppl, 3), "ppl_over_unigram": round(ppl.ppl / uni.ppl, 4),
            "expert_frequency": [r.summary() for r in routing]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    train_texts, test_texts = load_corpus(args.corpus, "train"), load_corpus(args.corpus, "test")
    print(f"corpus {args.corpus}: {len(train_texts)} train / {len(test_texts)} test documents", flush=True)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else train_tokenizer(train_texts, args.vocab_size)
    vocab_size = tok.get_vocab_size()
    train_ids = tokenize_corpus(train_texts, tok)
    test_ids = tokenize_corpus(test_texts, tok, max_tokens=args.eval_tokens)
    print(f"vocab {vocab_size}; {train_ids.size} train tokens, {test_ids.size} test tokens", flush=True)

    model = build_model(args, vocab_size, tok.token_to_id(DEFAULT_SEPARATOR))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {n_params:,} parameters", flush=True)
    stats = train(model, train_ids, args)
    results = evaluate(model, train_ids, test_ids, vocab_size, args)

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False  # aux loss was for training; inference returns logits only
    model.save_pretrained(str(args.out))
    save_tokenizer(tok, args.out, args.max_position_embeddings)
    record = {"family": args.family, "architecture": type(model).__name__, "parameters": n_params,
              "seed": args.seed, "corpus": args.corpus, "vocab_size": vocab_size,
              "train_corpus_tokens": int(train_ids.size),
              "recipe": {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())},
              "model_config": model.config.to_diff_dict(), **stats, **results,
              "total_wall_s": round(time.time() - t_start, 1), "torch": torch.__version__,
              "python": platform.python_version()}
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print_summary(record)
    return 0


def print_summary(r: dict) -> None:
    print(f"\n== {r['architecture']} -> {r['recipe']['out']}")
    print(f"parameters {r['parameters']:,}; steps {r['steps']}; tokens seen {r['tokens_seen']:,}; "
          f"train wall {r['train_wall_s']:.0f} s")
    print(f"final train loss {r['final_train_loss']:.4f} (aux {r['final_aux_loss']:.4f})")
    print(f"test perplexity {r['test_perplexity']:.2f} vs unigram {r['unigram_test_perplexity']:.2f} "
          f"(ratio {r['ppl_over_unigram']:.3f}) over {r['test_tokens']:,} tokens")
    for layer in r["expert_frequency"]:
        print(f"  layer {layer['layer']}: expert frequency min {layer['min']:.4f} max {layer['max']:.4f} "
              f"std {layer['std']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
