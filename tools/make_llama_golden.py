#!/usr/bin/env python3
"""Writes tests/fixtures/smollm2_golden.json: reference outputs of SmolLM2-135M-Instruct for kdx's Llama decoder.

Reference: transformers `LlamaForCausalLM` in float32 with eager attention on the CPU (one thread), loaded from
the converted Hugging Face folder (config.json, model.safetensors, tokenizer.json). Texts are tokenised with the
folder's tokenizer.json through the `tokenizers` library without special tokens (no BOS); the ids are recorded,
so a test can feed them directly.

- `prompts`: for each prompt, the greedy continuation of exactly NEW_TOKENS tokens (argmax at every step, no stop
  at EOS) and the top-5 next-token ids with their log-probabilities at the last prompt position.
- `sentence`: the shifted LM loss of one sentence (token i+1 predicted from tokens 0..i), per position and mean.
- `deep_prompt`: the same with a P-tuning v2 prefix of `k` key and value vectors per layer, each
  [k, n_kv_heads, head_dim], given by a formula (see PREFIX_FORMULA). The prefix entries are used exactly as cached
  keys and values (no rotary embedding: the prefix has no position); the real tokens keep positions 0..n-1 and
  each attends to all k prefix entries plus its causal past. Recorded: the first prompt's top-5 next tokens and the
  sentence's mean NLL.

Log-probabilities are log_softmax of the float32 logits taken in float64; floats are rounded to SIG_DIGITS
significant digits. The script checks, before writing:
  * the greedy continuation made with the KV cache matches the argmax of one uncached forward over the whole
    sequence and the argmax of the float64 re-implementation below; the step with the smallest top-1/top-2 logit
    gap is recorded (how close the run came to a tie);
  * the mean NLL equals transformers' own `labels=` loss;
  * the prefix path with k = 0 reproduces the plain numbers;
  * the prefix path (cache filled with the prefix, mask built by transformers) matches the same forward with an
    explicit 4D mask;
  * plain and with the prefix, the logits agree with an independent float64 re-implementation of the Llama forward
    written here; the differences of the recorded quantities from it are written to `checks` as a guide to the
    tolerances a float32 implementation needs (with the prefix the model is badly conditioned at the first real
    positions: see REFERENCE_TOLERANCE).

Usage:
    /work/venv-ref/bin/python tools/make_llama_golden.py [--model weights/smollm2-135m] \\
        [--out tests/fixtures/smollm2_golden.json]
"""

import argparse
import json
import math
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from tokenizers import Tokenizer
from transformers import DynamicCache, LlamaForCausalLM

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, a small robot",
]
SENTENCE = "Knowledge distillation trains a small student model to imitate a large teacher."
NEW_TOKENS = 20
TOP_K = 5
PREFIX_LEN = 4
PREFIX_FORMULA = {
    "key": "key[layer, j, kv_head, d] = 0.5 * sin(0.37*layer + 1.3*j + 0.71*kv_head + 0.05*d + 0.1)",
    "value": "value[layer, j, kv_head, d] = 0.5 * cos(0.23*layer + 0.9*j + 0.53*kv_head + 0.07*d + 0.2)",
    "evaluated": "in float64, then rounded to float32",
    "shape": "per layer [k, n_kv_heads, head_dim]; layer, j, kv_head, d count from 0",
}
CONFIG_KEYS = [
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
    "hidden_act",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "torch_dtype",
]
SIG_DIGITS = 7
# float32 transformers against the float64 re-implementation, on logits (values of order 10). With the deep prompt
# the model is badly conditioned at the first real positions (layers 10-11 attend almost only to the prefix, and the
# large-activation channel that follows amplifies float32 rounding about 20-fold), so float32 logits there move by
# up to about 1e-2; a wrong prefix semantics (positions starting at k, RoPE on the prefix, prefix ignored) moves them
# by tens.
REFERENCE_TOLERANCE = 5e-2
# The same float32 computation reached two ways (explicit mask, k = 0, labels= loss).
SAME_TOLERANCE = 1e-4


def rounded(x: float) -> float:
    return float(f"{x:.{SIG_DIGITS}g}")


def prefix_kv(cfg: dict, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (key, value), each [1, n_kv_heads, k, head_dim] float32 (the cache layout)."""
    layers, heads, dim = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    f64 = torch.float64
    layer = torch.arange(layers, dtype=f64)[:, None, None, None]
    j = torch.arange(k, dtype=f64)[None, :, None, None]
    head = torch.arange(heads, dtype=f64)[None, None, :, None]
    d = torch.arange(dim, dtype=f64)[None, None, None, :]
    key = 0.5 * torch.sin(0.37 * layer + 1.3 * j + 0.71 * head + 0.05 * d + 0.1)
    value = 0.5 * torch.cos(0.23 * layer + 0.9 * j + 0.53 * head + 0.07 * d + 0.2)
    # [layers, k, heads, dim] -> per layer [1, heads, k, dim]
    key = key.to(torch.float32).permute(0, 2, 1, 3).unsqueeze(1)
    value = value.to(torch.float32).permute(0, 2, 1, 3).unsqueeze(1)
    return [(key[i], value[i]) for i in range(layers)]


def prefixed_logits(model, ids: list[int], prefix, explicit_mask: bool = False) -> torch.Tensor:
    """Logits [n, vocab] of `ids` after a deep-prompt prefix: the prefix fills the cache of every layer, the real
    tokens take positions 0..n-1."""
    cache = DynamicCache(config=model.config)
    for layer_idx, (key, value) in enumerate(prefix):
        cache.update(key, value, layer_idx)
    k = prefix[0][0].shape[2]
    n = len(ids)
    kwargs = {}
    if explicit_mask:
        # Query i sees every prefix entry and real tokens 0..i.
        allowed = torch.ones(n, k + n, dtype=torch.bool)
        allowed[:, k:] = torch.ones(n, n, dtype=torch.bool).tril()
        mask = torch.zeros(n, k + n).masked_fill(~allowed, torch.finfo(torch.float32).min)
        kwargs["attention_mask"] = mask[None, None]
    out = model(
        input_ids=torch.tensor([ids]),
        position_ids=torch.arange(n)[None],
        past_key_values=cache,
        use_cache=True,
        **kwargs,
    )
    return out.logits[0]


def reference_logits(weights: dict, cfg: dict, ids: list[int], prefix) -> torch.Tensor:
    """Llama forward written out in float64 from the raw weights, with the deep-prompt prefix: [n, vocab]."""
    f64 = torch.float64
    w = {name: t.to(f64) for name, t in weights.items()}
    heads, kv_heads, dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    n = len(ids)
    k = prefix[0][0].shape[2]

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, dim, 2, dtype=f64) / dim)
    angles = torch.arange(n, dtype=f64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(x):  # [n, h, dim], rotate-half pairing (i, i + dim/2)
        half = dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]

    allowed = torch.ones(n, k + n, dtype=torch.bool)
    allowed[:, k:] = torch.ones(n, n, dtype=torch.bool).tril()
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).view(n, heads, dim))
        key = rope((h @ w[p + "self_attn.k_proj.weight"].T).view(n, kv_heads, dim))
        value = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, kv_heads, dim)
        key = torch.cat([prefix[layer][0][0].transpose(0, 1).to(f64), key], 0)  # [k + n, kv_heads, dim]
        value = torch.cat([prefix[layer][1][0].transpose(0, 1).to(f64), value], 0)
        group = heads // kv_heads  # query head i reads kv head i // group
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, key) / math.sqrt(dim)
        scores = scores.masked_fill(~allowed, -math.inf).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", scores, value).reshape(n, heads * dim)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rms_norm(x, w["model.norm.weight"]) @ head.T


def two_digits(v):
    """Check results for the fixture: differences to 2 significant digits."""
    if isinstance(v, dict):
        return {key: two_digits(x) for key, x in v.items()}
    return float(f"{v:.2g}")


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def top_k(logits_row: torch.Tensor) -> dict:
    values, ids = torch.topk(log_probs(logits_row), TOP_K)
    return {"ids": ids.tolist(), "log_probs": [rounded(v) for v in values.tolist()]}


def token_nll(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """NLL of tokens 1..n-1 from their prefixes, [n - 1] float64."""
    lp = log_probs(logits[:-1])
    return -lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def greedy(model, ids: list[int]) -> tuple[list[int], list[float]]:
    """NEW_TOKENS argmax steps with the KV cache; the new ids and the top-1/top-2 logit gap at each step."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    new, gaps = [], []
    for step in range(NEW_TOKENS):
        last = out.logits[0, -1]
        top2 = torch.topk(last, 2).values
        gaps.append((top2[0] - top2[1]).item())
        new.append(int(last.argmax()))
        if step + 1 < NEW_TOKENS:
            position = torch.tensor([[len(ids) + step]])
            out = model(input_ids=torch.tensor([[new[-1]]]), position_ids=position, past_key_values=cache, use_cache=True)
    return new, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="weights/smollm2-135m", help="folder with config.json, model.safetensors, tokenizer.json")
    parser.add_argument("--out", default="tests/fixtures/smollm2_golden.json", help="fixture path to write")
    args = parser.parse_args()
    model_dir = Path(args.model)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    assert model.config.num_key_value_heads == cfg["num_key_value_heads"] and model.config.head_dim == cfg["head_dim"]
    assert model.config.rope_parameters["rope_theta"] == cfg["rope_theta"], model.config.rope_parameters
    assert model.config.rope_parameters["rope_type"] == "default", model.config.rope_parameters

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    checks = {}
    with torch.no_grad():
        prompts = []
        for text in PROMPTS:
            ids = encode(text)
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            if not prompts:
                first_logits = logits
            new, gaps = greedy(model, ids)
            closest = min(range(NEW_TOKENS), key=lambda i: gaps[i])
            full = model(input_ids=torch.tensor([ids + new])).logits[0]
            assert full[len(ids) - 1 : -1].argmax(-1).tolist() == new, f"cached greedy differs from uncached for {text!r}"
            prompts.append(
                {
                    "text": text,
                    "input_ids": ids,
                    "next_top5": top_k(logits[-1]),
                    "greedy_new_ids": new,
                    "greedy_text": tok.decode(new, skip_special_tokens=False),
                    "greedy_closest_step": {"step": closest, "top1_minus_top2_logit": rounded(gaps[closest])},
                }
            )

        sent_ids = encode(SENTENCE)
        logits = model(input_ids=torch.tensor([sent_ids])).logits[0]
        nll = token_nll(logits, sent_ids)
        hf_loss = model(input_ids=torch.tensor([sent_ids]), labels=torch.tensor([sent_ids])).loss.item()
        assert abs(hf_loss - nll.mean().item()) < SAME_TOLERANCE, (hf_loss, nll.mean().item())

        # Deep prompts. k = 0 through the same path must give the plain numbers.
        empty = prefix_kv(cfg, 0)
        prompt_ids = prompts[0]["input_ids"]
        diff0 = max(
            (prefixed_logits(model, sent_ids, empty) - logits).abs().max().item(),
            (prefixed_logits(model, prompt_ids, empty) - first_logits).abs().max().item(),
        )
        assert diff0 < SAME_TOLERANCE, f"prefix path with k = 0 differs from the plain forward by {diff0:.3e}"
        checks["k0_vs_plain_max_abs_logit_diff"] = diff0

        prefix = prefix_kv(cfg, PREFIX_LEN)
        deep = {}
        worst_mask = 0.0
        for name, ids in [("prompt", prompt_ids), ("sentence", sent_ids)]:
            deep[name] = prefixed_logits(model, ids, prefix)
            explicit = prefixed_logits(model, ids, prefix, explicit_mask=True)
            worst_mask = max(worst_mask, (deep[name] - explicit).abs().max().item())
        assert worst_mask < SAME_TOLERANCE, f"prefix: transformers' mask vs explicit mask {worst_mask:.3e}"
        checks["prefix_explicit_mask_max_abs_logit_diff"] = worst_mask
        deep_nll = token_nll(deep["sentence"], sent_ids)

        # The float64 re-implementation, plain and with the prefix: logits, and the recorded quantities.
        weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
        for rec in prompts:
            ids, new = rec["input_ids"], rec["greedy_new_ids"]
            ref = reference_logits(weights, cfg, ids + new, empty)
            assert ref[len(ids) - 1 : -1].argmax(-1).tolist() == new, f"float64 greedy differs for {rec['text']!r}"
        for label, pre, got_prompt, got_sent in [
            ("plain", empty, first_logits, logits),
            ("deep_prompt", prefix, deep["prompt"], deep["sentence"]),
        ]:
            ref_prompt = reference_logits(weights, cfg, prompt_ids, pre)
            ref_sent = reference_logits(weights, cfg, sent_ids, pre)
            logit_diff = max(
                (got_prompt.double() - ref_prompt).abs().max().item(), (got_sent.double() - ref_sent).abs().max().item()
            )
            assert logit_diff < REFERENCE_TOLERANCE, f"{label}: transformers vs float64 reference {logit_diff:.3e}"
            top_ids = torch.topk(got_prompt[-1], TOP_K).indices
            got_nll, ref_nll = token_nll(got_sent, sent_ids), token_nll(ref_sent, sent_ids)
            checks[f"float64_reference_{label}"] = {
                "max_abs_logit_diff": logit_diff,
                "top5_log_prob_diff": (log_probs(got_prompt[-1]) - log_probs(ref_prompt[-1]))[top_ids].abs().max().item(),
                "token_nll_diff": (got_nll - ref_nll).abs().max().item(),
                "mean_nll_diff": abs(got_nll.mean().item() - ref_nll.mean().item()),
            }

    fixture = {
        "model": "SmolLM2-135M-Instruct",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "reference": "transformers LlamaForCausalLM, float32, attn_implementation=eager, CPU; "
        "log-probs = log_softmax of the float32 logits in float64",
        "config": {key: cfg.get(key) for key in CONFIG_KEYS},
        "tokenizer": "tokenizer.json of the model folder, add_special_tokens=False (no BOS)",
        "prompts": prompts,
        "sentence": {
            "text": SENTENCE,
            "input_ids": sent_ids,
            "token_nll": [rounded(v) for v in nll.tolist()],
            "mean_nll": rounded(nll.mean().item()),
        },
        "deep_prompt": {
            "k": PREFIX_LEN,
            "formula": PREFIX_FORMULA,
            "usage": "per layer, the k prefix keys/values are the attention cache before the real tokens, used as they "
            "are (no rotary embedding); real tokens take positions 0..n-1 and attend to all k prefix entries "
            "plus their causal past",
            "prompt_next_top5": top_k(deep["prompt"][-1]),
            "sentence_mean_nll": rounded(deep_nll.mean().item()),
            "sentence_token_nll": [rounded(v) for v in deep_nll.tolist()],
        },
        "checks": {key: two_digits(v) for key, v in checks.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(fixture, ensure_ascii=False, indent=1)
    # Lists of numbers on one line each.
    text = re.sub(r"\[(?:\s*-?[0-9][0-9.eE+-]*,?)+\s*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)
    out.write_text(text + "\n", encoding="utf-8")

    for rec in prompts:
        top = rec["next_top5"]
        print(f"{rec['text']!r}: {len(rec['input_ids'])} tokens, next {top['ids'][0]} "
              f"(log p {top['log_probs'][0]:.4f}) -> {rec['greedy_text']!r} "
              f"(closest step {rec['greedy_closest_step']['step']}: logit gap {rec['greedy_closest_step']['top1_minus_top2_logit']:.3g})")
    print(f"sentence: {len(sent_ids)} tokens, mean NLL {nll.mean().item():.5f}; with deep prompt k={PREFIX_LEN}: "
          f"{deep_nll.mean().item():.5f}")
    top = fixture["deep_prompt"]["prompt_next_top5"]
    print(f"deep prompt, first prompt: next {top['ids']} log p {top['log_probs']}")
    for key, value in fixture["checks"].items():
        print(f"check {key}: {value}")
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
