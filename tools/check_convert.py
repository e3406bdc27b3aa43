#!/usr/bin/env python3
"""Checks `kdx convert` against independent readers of the same GGUF file.

1. Weights: every tensor of the converted folder, loaded with `LlamaForCausalLM.from_pretrained`, against
   transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`), and against the `gguf` package's
   dequantisation with the Q/K rows un-permuted here in numpy. Then the logits of both models on a prompt.
2. Tokenizer: the converted tokenizer.json (through transformers and through the tokenizers library
   alone) against transformers' GGUF tokenizer on varied strings, and the chat template. transformers'
   GGUF tokenizer ignores `tokenizer.ggml.pre` (it splits with GPT-2's regex only), so the ids are also
   compared with a llama.cpp-style reference written here: special tokens split out, then the two regexes
   llama-vocab.cpp uses for the file's pre-tokenizer type applied in turn (matches and the text between
   them both kept), then the BPE model of transformers' GGUF tokenizer on each piece.

Usage (the reference venv needs torch, transformers, accelerate, gguf):
    /work/venv-ref/bin/python tools/check_convert.py --gguf FILE.gguf [--hf CONVERTED_DIR] [--kdx target/release/kdx]
Without --hf the file is converted with --kdx into a temporary folder first. Prints a JSON report.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

TEXTS = [
    "Hello world",
    "Hello 12345 world",
    "  leading and trailing spaces  ",
    "multiple\n\nnewlines\n\n\nhere",
    "tabs\tand\tmore\t\ttabs",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they've said it's what we'd do, isn't it? You'll see.",
    "3.14159 and 2,718,281 and 1e-5 and 0x1F",
    "Phone: +1 (555) 123-4567, year 2024",
    "Numbers ² ³ ½ ¾ ① Ⅻ ٣ ४ and digits 42",
    "Café, naïve, façade, résumé, Über, Straße",
    "日本語のテキストです。中文文本。한국어 텍스트.",
    "Привет, мир! Ελληνικά κείμενο.",
    "مرحبا بالعالم",
    "emoji 😀🎉👍🏽 and flags 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>",
    "text with <|endoftext|> in the middle",
    "<repo_name>kdx<file_sep>src/main.rs",
    "not special: <|im_start and im_end|>",
    "URL https://example.com/path?q=1&b=two#frag",
    "email someone@example.org",
    "ALL CAPS SHOUTING AND MiXeD cAsE",
    "punctuation!!! ??? ... --- ;;; :::",
    "a",
    " ",
    "   ",
    "\n",
    "",
    "trailing newline\n",
    "wörd wörd wörd",
    "!!!hello!!!",
    "$100.00 or €50,00 or ¥1000",
    "zero-width\u200bspace and non\u00a0breaking",
    "   indented line\n\tand tab-indented",
    "JSON: {\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "Mathematical: ∀x∈ℝ, x² ≥ 0 ⇒ √(x²) = |x|",
    "repeated aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky? 🌤"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And at 9 pm?"},
    ],
]


def unpermute(w, n_head):
    """Inverse of llama.cpp's convert_hf_to_gguf.py `permute`, written with numpy reshapes."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_package_reference(gguf_path):
    """HF-named f32 tensors from the `gguf` package's dequantisation."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    field = lambda k: reader.fields[k].contents()
    n_head = field("llama.attention.head_count")
    n_kv = field("llama.attention.head_count_kv")
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    per_layer = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    out = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if t.name in names:
            out[names[t.name]] = w
            continue
        _, layer, kind, _ = t.name.split(".")
        if kind == "attn_q":
            w = unpermute(w, n_head)
        elif kind == "attn_k":
            w = unpermute(w, n_kv)
        out[f"model.layers.{layer}.{per_layer[kind]}.weight"] = w
    return out


def max_abs(a, b):
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def check_weights(gguf_path, hf_dir):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    ours = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(gguf_path)),
        gguf_file=os.path.basename(gguf_path),
        dtype=torch.float32,
    ).eval()
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    report = {
        "tensors_ours": len(sd_ours),
        "tensors_transformers": len(sd_ref),
        "missing_in_ours": sorted(set(sd_ref) - set(sd_ours)),
        "extra_in_ours": sorted(set(sd_ours) - set(sd_ref)),
    }
    diffs = {}
    for name in sorted(set(sd_ours) & set(sd_ref)):
        a, b = sd_ours[name], sd_ref[name]
        diffs[name] = max_abs(a, b) if a.shape == b.shape else float("inf")
    report["max_abs_diff_vs_transformers_gguf"] = max(diffs.values())
    report["tensors_bit_identical_vs_transformers_gguf"] = sum(1 for d in diffs.values() if d == 0.0)
    report["worst_tensors_vs_transformers_gguf"] = sorted(diffs.items(), key=lambda kv: -kv[1])[:3]

    gguf_ref = gguf_package_reference(gguf_path)
    gdiffs = {}
    for name, w in gguf_ref.items():
        a = sd_ours[name]
        gdiffs[name] = max_abs(a, torch.from_numpy(w)) if tuple(a.shape) == w.shape else float("inf")
    report["max_abs_diff_vs_gguf_package"] = max(gdiffs.values())
    report["tensors_checked_vs_gguf_package"] = len(gdiffs)

    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]
    report["config_mismatches"] = {
        k: (getattr(ours.config, k, None), getattr(ref.config, k, None))
        for k in keys
        if getattr(ours.config, k, None) != getattr(ref.config, k, None)
        and not (k == "rms_norm_eps" and abs(ours.config.rms_norm_eps - ref.config.rms_norm_eps) < 1e-12)
    }
    theta = lambda c: (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None))
    report["rope_theta"] = [theta(ours.config), theta(ref.config)]

    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 2, 198, 1, 4093, 198]])
    with torch.no_grad():
        lo, lr = ours(ids).logits, ref(ids).logits
    report["logits_max_abs_diff"] = max_abs(lo, lr)
    report["logits_argmax_equal"] = bool((lo.argmax(-1) == lr.argmax(-1)).all())
    return report


GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama-vocab.cpp's regexes per tokenizer.ggml.pre (the types this check knows).
LLAMACPP_REGEXES = {
    "smollm": [r"\p{N}", GPT2_REGEX],
    "gpt2": [GPT2_REGEX],
    "default": [GPT2_REGEX],
}


def bytes_to_unicode():
    """GPT-2's byte → printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def split_keep(pieces, pattern):
    import regex

    out = []
    for piece in pieces:
        at = 0
        for m in regex.finditer(pattern, piece):
            if m.start() > at:
                out.append(piece[at : m.start()])
            if m.end() > m.start():
                out.append(m.group())
            at = m.end()
        if at < len(piece):
            out.append(piece[at:])
    return out


def llamacpp_style_ids(ref, pre, text):
    import regex

    byte_map = bytes_to_unicode()
    model = ref.backend_tokenizer.model
    specials = sorted(ref.get_added_vocab(), key=len, reverse=True)
    ids = []
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if part in ref.get_added_vocab():
            ids.append(ref.get_added_vocab()[part])
            continue
        pieces = [part] if part else []
        for pattern in LLAMACPP_REGEXES[pre]:
            pieces = split_keep(pieces, pattern)
        for piece in pieces:
            mapped = "".join(byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(t.id for t in model.tokenize(mapped))
    return ids


def check_tokenizer(gguf_path, hf_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(hf_dir)
    raw = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(gguf_path)), gguf_file=os.path.basename(gguf_path)
    )
    import gguf

    pre = gguf.GGUFReader(gguf_path).fields["tokenizer.ggml.pre"].contents()
    agree, agree_raw, agree_cpp, roundtrip, disagreements = 0, 0, 0, 0, []
    for text in TEXTS:
        a = ours(text)["input_ids"]
        b = ref(text)["input_ids"]
        c = raw.encode(text).ids
        d = llamacpp_style_ids(ref, pre, text)
        agree += a == b
        agree_raw += c == a
        agree_cpp += a == d
        roundtrip += ours.decode(a) == text
        if a != b or c != a or a != d:
            tokens = lambda ids: ref.convert_ids_to_tokens(ids)
            disagreements.append({
                "text": text,
                "ours": tokens(a),
                "transformers_gguf": tokens(b) if b != a else "same",
                "tokenizers_lib": tokens(c) if c != a else "same",
                "llamacpp_style": tokens(d) if d != a else "same",
            })
    chats_equal = 0
    for chat in CHATS:
        a = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        b = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        a = a["input_ids"] if isinstance(a, dict) or hasattr(a, "keys") else a
        b = b["input_ids"] if isinstance(b, dict) or hasattr(b, "keys") else b
        chats_equal += list(a) == list(b)
    return {
        "texts": len(TEXTS),
        "pre_tokenizer": pre,
        "same_ids_as_transformers_gguf": agree,
        "same_ids_as_llamacpp_style_reference": agree_cpp,
        "same_ids_through_tokenizers_lib_alone": agree_raw,
        "decode_roundtrip_exact": roundtrip,
        "chat_templates_equal": f"{chats_equal}/{len(CHATS)}",
        "special_tokens": [ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token],
        "special_tokens_transformers_gguf": [ref.bos_token, ref.eos_token, ref.pad_token, ref.unk_token],
        "vocab_size": [len(ours), len(ref)],
        "disagreements": disagreements,
    }


def isolated(gguf_path, tmp):
    """The GGUF alone in a folder of its own: transformers' GGUF loading also reads config.json and
    tokenizer files lying beside the GGUF (as in weights/smollm2-135m/), which would make the reference
    read the very files under test."""
    path = os.path.join(tmp, os.path.basename(gguf_path))
    os.symlink(os.path.abspath(gguf_path), path)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--hf", help="converted folder (default: convert into a temporary folder)")
    ap.add_argument("--kdx", default="target/release/kdx")
    args = ap.parse_args()
    tmp = None
    hf = args.hf
    if hf is None:
        tmp = tempfile.TemporaryDirectory()
        hf = os.path.join(tmp.name, "hf")
        subprocess.run(
            [args.kdx, "convert", "--gguf", args.gguf, "--out", hf], check=True, stdout=sys.stderr
        )
    with tempfile.TemporaryDirectory() as alone:
        gguf_path = isolated(args.gguf, alone)
        report = {"weights": check_weights(gguf_path, hf), "tokenizer": check_tokenizer(gguf_path, hf)}
    json.dump(report, sys.stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()
