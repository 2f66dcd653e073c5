"""Embed a dmpq-compile ort-cpu artifact in an app through onnxruntime-genai.

The artifact folder is an onnxruntime-genai model folder as it is (``genai_config.json``,
``model.onnx``, the tokenizer): the same folder loads from genai's C, C++, C#, Java and Python
APIs. This script is the Python version; ``tests/test_genai.py`` runs it.

    python docs/examples/genai-app/chat.py ARTIFACT "The list type" --max-new-tokens 30
    python docs/examples/genai-app/chat.py ARTIFACT "Once upon a time" "The" --max-new-tokens 20

Several prompts run as one batch (genai pads them); each prints its own continuation.
"""

from __future__ import annotations

import argparse

import onnxruntime_genai as og


def generate(folder: str, prompts: list[str], max_new_tokens: int, max_length: int | None = None) -> list[str]:
    """Greedy continuations of ``prompts``, as one batch, streamed token by token by genai."""
    model = og.Model(folder)
    tokenizer = og.Tokenizer(model)
    tokens = tokenizer.encode_batch(prompts)
    params = og.GeneratorParams(model)
    # max_length bounds prompt + new tokens and sizes genai's KV buffer (genai_config.json holds the default)
    longest = max(len(tokenizer.encode(p)) for p in prompts)
    params.set_search_options(max_length=max_length or longest + max_new_tokens, batch_size=len(prompts),
                              do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(tokens)
    while not generator.is_done():
        generator.generate_next_token()
    out = []
    for i, prompt in enumerate(prompts):
        sequence = generator.get_sequence(i)
        prompt_len = len(tokenizer.encode(prompt))
        out.append(tokenizer.decode(sequence[prompt_len:]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="an ort-cpu artifact folder written by dmpq-compile")
    parser.add_argument("prompts", nargs="+", help="one or more prompts (several run as one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    args = parser.parse_args()
    for prompt, text in zip(args.prompts, generate(args.artifact, args.prompts, args.max_new_tokens)):
        print(f"{prompt!r} -> {text!r}")


if __name__ == "__main__":
    main()
