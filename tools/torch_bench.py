"""PyTorch reference timings for the shapes kdx benchmarks.

Usage:

    HF_HUB_OFFLINE=1 python tools/torch_bench.py [--threads N] [--device cpu|cuda]
        [--model DIR] [--llama-model DIR] [--filter SUBSTR] [--runs 20] [--warmup 3]
        [--budget 4] [--json] [--compile]

Each entry is timed as the median over up to --runs samples, after up to
--warmup warm-up calls. To keep heavy entries such as the training step short,
warm-up ends early (after two calls) once a quarter of --budget seconds has
passed, and sampling ends once the entry has taken --budget seconds, with at
least 3 samples. Fast ops repeat inside a sample until it lasts about 1 ms;
times are reported per call.

Work units:
  * matmul: 2*M*K*N flop.
  * attention: forward 4*B*H*T*T*D flop, forward+backward 2.5x that.
  * model entries: forward counts 2*tokens*(linear weights per layer)*layers
    plus the attention flop above per layer; a training step counts 3x the
    forward. Tokens/s uses B*T tokens.
  * elementwise and norm ops: f32 bytes read plus written, activations only
    (forward reads x and writes y; backward reads dy and x and writes dx).
  * SmolLM2 entries: tokens only (prefill and prompt tuning B*T per call,
    decoding B per step); they have no rate column.

The MiniLM-L6 model is built from --model DIR/config.json when given, else
from the all-MiniLM-L6-v2 shapes; weights are random since they do not affect
speed. With --json the table goes to stderr and one JSON object to stdout; a
run stopped by SIGTERM (timeout) still prints the entries it finished.

With --device cuda, calls are timed with CUDA events, and the GPU entries of
`kdx bench --device cuda` are added under the same names: matrix products in
f32 (no TF32, PyTorch's default) and bf16 at MiniLM and BERT-base shapes,
BERT-base's intermediate projection (F.linear, forward and forward+backward),
SDPA attention forward and forward+backward at 12 heads of 32 and 64, and a
BERT-base encoder (12 layers, hidden 768, 12 heads, intermediate 3072) forward
and training step, eager in f32 and under bf16 autocast (`/amp-bf16`); with
--compile, the training step through torch.compile too (`/compiled`: the
first call compiles, during warm-up). Operator entries rotate between copies
of their inputs, together three times the L2 cache (at most 16), so that no
call finds its inputs cached by the one before, as kdx does.

The SmolLM2-135M entries load LlamaForCausalLM (float32, sdpa attention) from
--llama-model DIR (default weights/smollm2-135m), with its parameters frozen,
onto the chosen --device; they are skipped with a note when the folder is
missing:
  * smollm2-135m/prefill/b8x64: a forward over 8 x 64 random token ids with
    use_cache=True, logits of the last position only (logits_to_keep=1).
  * smollm2-135m/decode/bB: one decoding step (one new token per sequence and
    its logits) against a DynamicCache holding 64 tokens per sequence, filled by
    a prefill outside the timed region; the cache is cropped back to 64 tokens
    after each step, so every step sees the same cache.
  * smollm2-135m/prompt-fwd-bwd/b8x64: P-tuning v2 deep prompts (k = 8 key and
    value vectors per layer, leaf tensors shared by the batch) put in the cache
    before 8 x 64 tokens at positions 0..63; the shifted LM loss over all tokens
    and its backward, whose gradients reach only the prompts.
"""

import argparse
import itertools
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
import transformers

BATCH, SEQ = 32, 128
LLAMA_NAME = "smollm2-135m"
LLAMA_BATCH, LLAMA_SEQ = 8, 64
LLAMA_CACHE = 64
LLAMA_DECODE_BATCHES = (1, 16)
PROMPT_LEN = 8
TOKENS = BATCH * SEQ
MIN_RUNS = 3
MIN_SAMPLE_S = 1e-3
F32 = 4


@dataclass
class Work:
    flops: float = 0.0
    bytes: float = 0.0
    tokens: int = 0


# An entry's builder allocates its inputs and returns the call to time.
Entry = tuple[str, Callable[[], Callable[[], None]], Work]


def minilm_config(model_dir: str | None) -> transformers.BertConfig:
    if model_dir:
        return transformers.BertConfig.from_pretrained(model_dir, attn_implementation="sdpa")
    return bert_config(hidden=384, layers=6, intermediate=1536)


def bert_config(hidden: int, layers: int, intermediate: int) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=intermediate,
        max_position_embeddings=512,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        attn_implementation="sdpa",
    )


def model_forward_flops(cfg: transformers.BertConfig, batch: int, seq: int) -> float:
    h, i = cfg.hidden_size, cfg.intermediate_size
    linear = 4 * h * h + 2 * h * i
    head_dim = h // cfg.num_attention_heads
    attention = 4 * batch * cfg.num_attention_heads * seq * seq * head_dim
    return cfg.num_hidden_layers * (2 * batch * seq * linear + attention)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def build_entries(cfg: transformers.BertConfig, device: torch.device) -> list[Entry]:
    def randn(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, device=device, requires_grad=grad)

    def model_inputs() -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), device=device)
        return ids, torch.ones_like(ids)

    def bert() -> transformers.BertModel:
        return transformers.BertModel(cfg, add_pooling_layer=False).to(device)

    def minilm_forward():
        model = bert().eval()
        ids, mask = model_inputs()

        def step():
            with torch.no_grad():
                mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

        return step

    def minilm_train_step():
        model = bert().train()
        head = torch.nn.Linear(cfg.hidden_size, 2).to(device)
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=2e-5)
        ids, mask = model_inputs()
        labels = torch.randint(0, 2, (BATCH,), device=device)

        def step():
            pooled = mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
            F.cross_entropy(head(pooled), labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def matmul(m: int, k: int, n: int):
        def make():
            a, b = randn(m, k), randn(k, n)
            c = torch.empty(m, n, device=device)
            return lambda: torch.mm(a, b, out=c)

        return make

    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads

    def attention(backward: bool):
        def make():
            q, k, v = (randn(BATCH, heads, SEQ, head_dim, grad=backward) for _ in range(3))
            # Key padding mask (True = attend) with sequence lengths between SEQ/2 and SEQ.
            gen = torch.Generator().manual_seed(0)
            lengths = torch.randint(SEQ // 2, SEQ + 1, (BATCH,), generator=gen).to(device)
            mask = (torch.arange(SEQ, device=device)[None, :] < lengths[:, None])[:, None, None, :]
            if not backward:
                return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            dout = randn(BATCH, heads, SEQ, head_dim)

            def step():
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(dout)
                q.grad = k.grad = v.grad = None

            return step

        return make

    def layernorm(backward: bool):
        def make():
            x = randn(TOKENS, cfg.hidden_size, grad=backward)
            w, b = randn(cfg.hidden_size, grad=backward), randn(cfg.hidden_size, grad=backward)
            eps = cfg.layer_norm_eps
            if not backward:
                return lambda: F.layer_norm(x, (cfg.hidden_size,), w, b, eps)
            dy = randn(TOKENS, cfg.hidden_size)

            def step():
                F.layer_norm(x, (cfg.hidden_size,), w, b, eps).backward(dy)
                x.grad = w.grad = b.grad = None

            return step

        return make

    def gelu():
        x = randn(TOKENS, cfg.intermediate_size)
        return lambda: F.gelu(x)

    def softmax_ce():
        logits = randn(BATCH, 2, grad=True)
        labels = torch.randint(0, 2, (BATCH,), device=device)

        def step():
            F.cross_entropy(logits, labels).backward()
            logits.grad = None

        return step

    def listwise_cos_kl():
        # RetriKT's listwise loss as PyTorch code would write it: autograd through normalise,
        # similarity, diagonal mask, both softmaxes and KL(student ‖ teacher), summed over rows.
        student = randn(128, h, grad=True)
        teacher = randn(128, h)
        eye = torch.eye(128, dtype=torch.bool, device=device)

        def step():
            s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
            log_p = F.log_softmax((s @ s.T / 0.1).masked_fill(eye, float("-inf")), dim=-1)
            log_q = F.log_softmax((t @ t.T / 0.2).masked_fill(eye, float("-inf")), dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).masked_fill(eye, 0.0).sum()
            kl.backward()
            student.grad = None

        return step

    def softmax_kl(rows: int, classes: int):
        # The KD loss as PyTorch code writes it (Hinton: KL(teacher ‖ student) at T = 2, times T²).
        def make():
            student = randn(rows, classes, grad=True)
            teacher = randn(rows, classes)
            temp = 2.0

            def step():
                loss = F.kl_div(
                    F.log_softmax(student / temp, dim=-1),
                    F.softmax(teacher / temp, dim=-1),
                    reduction="batchmean",
                ) * temp**2
                loss.backward()
                student.grad = None

            return step

        return make

    def nucleus_sampling():
        # The usual top-p sampler (as in transformers' TopPLogitsWarper + multinomial).
        logits = randn(16, 49152)

        def step():
            probs = F.softmax(logits / 0.9, dim=-1)
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            drop = sorted_p.cumsum(dim=-1) - sorted_p > 0.9
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            choice = torch.multinomial(sorted_p, 1)
            return order.gather(-1, choice)

        return step

    def cos_topk():
        keys = F.normalize(randn(100_000, h), dim=-1)
        queries = randn(256, h)
        return lambda: torch.topk(F.normalize(queries, dim=-1) @ keys.T, 16, dim=-1)

    fwd_flops = model_forward_flops(cfg, BATCH, SEQ)
    attn_flops = 4 * BATCH * heads * SEQ * SEQ * head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return [
        (f"minilm-l6/forward/b{BATCH}x{SEQ}", minilm_forward, Work(flops=fwd_flops, tokens=TOKENS)),
        (f"minilm-l6/train-step/b{BATCH}x{SEQ}", minilm_train_step, Work(flops=3 * fwd_flops, tokens=TOKENS)),
        (f"matmul/nn/{TOKENS}x{h}x{i}", matmul(TOKENS, h, i), Work(flops=2 * TOKENS * h * i)),
        (f"matmul/nn/{TOKENS}x{i}x{h}", matmul(TOKENS, i, h), Work(flops=2 * TOKENS * i * h)),
        (f"attention/fwd/b{BATCH}-h{heads}-t{SEQ}-d{head_dim}", attention(False), Work(flops=attn_flops)),
        (f"attention/fwd-bwd/b{BATCH}-h{heads}-t{SEQ}-d{head_dim}", attention(True), Work(flops=2.5 * attn_flops)),
        (f"layernorm/fwd/{TOKENS}x{h}", layernorm(False), Work(bytes=2 * TOKENS * h * F32)),
        (f"layernorm/fwd-bwd/{TOKENS}x{h}", layernorm(True), Work(bytes=5 * TOKENS * h * F32)),
        (f"gelu/fwd/{TOKENS}x{i}", gelu, Work(bytes=2 * TOKENS * i * F32)),
        (f"softmax-ce/fwd-bwd/{BATCH}x2", softmax_ce, Work(bytes=2 * BATCH * 2 * F32)),
        (f"listwise-cos-kl/fwd-bwd/n128-d{h}", listwise_cos_kl, Work(flops=3 * 2 * 128 * 128 * h)),
        (f"cos-topk/q256-n100000-d{h}-k16", cos_topk, Work(flops=2 * 256 * 100_000 * h)),
        ("softmax-kl/fwd-bwd/4096x32000", softmax_kl(4096, 32000), Work(bytes=3 * 4096 * 32000 * F32)),
        ("softmax-kl/fwd-bwd/256x2", softmax_kl(256, 2), Work(bytes=3 * 256 * 2 * F32)),
        ("sampling/nucleus/b16x49152", nucleus_sampling, Work(bytes=16 * 49152 * F32)),
    ]


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def build_gpu_entries(device: torch.device, compile_steps: bool) -> list[Entry]:
    """The entries `kdx bench --device cuda` adds, under its names."""
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size

    def rotating(make_set: Callable[[], tuple], nbytes: int) -> Callable[[], tuple]:
        # As kdx: copies of the inputs together three times the L2 (at most 16), used in turn.
        copies = max(1, min(16, math.ceil(3 * l2_bytes / max(nbytes, 1))))
        return itertools.cycle([make_set() for _ in range(copies)]).__next__

    def matmul(m: int, k: int, n: int, tag: str, dtype: torch.dtype):
        def make():
            def make_set():
                a = torch.randn(*((k, m) if tag[0] == "t" else (m, k)), device=device, dtype=dtype)
                b = torch.randn(*((n, k) if tag[1] == "t" else (k, n)), device=device, dtype=dtype)
                return (a.T if tag[0] == "t" else a, b.T if tag[1] == "t" else b, torch.empty(m, n, device=device, dtype=dtype))

            nxt = rotating(make_set, (m * k + k * n + m * n) * dtype.itemsize)

            def step():
                a, b, c = nxt()
                torch.mm(a, b, out=c)

            return step

        return make

    def linear(rows: int, inp: int, outp: int, dtype: torch.dtype, backward: bool):
        def make():
            def make_set():
                x = torch.randn(rows, inp, device=device, dtype=dtype, requires_grad=backward)
                w = torch.randn(outp, inp, device=device, dtype=dtype, requires_grad=backward)
                b = torch.randn(outp, device=device, dtype=dtype, requires_grad=backward)
                return x, w, b, torch.randn(rows, outp, device=device, dtype=dtype)

            nxt = rotating(make_set, (rows * inp + outp * inp + 2 * rows * outp) * dtype.itemsize)

            def step():
                x, w, b, dy = nxt()
                y = F.linear(x, w, b)
                if backward:
                    y.backward(dy)
                    x.grad = None  # dw and db accumulate, as kdx's do

            return step

        return make

    def attention(head_dim: int, dtype: torch.dtype, backward: bool):
        def make():
            def make_set():
                q, k, v = (
                    torch.randn(BATCH, 12, SEQ, head_dim, device=device, dtype=dtype, requires_grad=backward)
                    for _ in range(3)
                )
                return q, k, v, torch.randn(BATCH, 12, SEQ, head_dim, device=device, dtype=dtype)

            nxt = rotating(make_set, 4 * BATCH * 12 * SEQ * head_dim * dtype.itemsize)

            def step():
                q, k, v, dout = nxt()
                out = F.scaled_dot_product_attention(q, k, v)
                if backward:
                    out.backward(dout)
                    q.grad = k.grad = v.grad = None

            return step

        return make

    def softmax_kl(rows: int, classes: int, dtype: torch.dtype):
        # Hinton's KL at T = 2 as PyTorch code writes it, with autograd, on rotated inputs.
        def make():
            def make_set():
                student = torch.randn(rows, classes, device=device, dtype=dtype, requires_grad=True)
                return student, torch.randn(rows, classes, device=device, dtype=dtype)

            nxt = rotating(make_set, 2 * rows * classes * dtype.itemsize)

            def step():
                student, teacher = nxt()
                loss = F.kl_div(F.log_softmax(student / 2.0, dim=-1), F.softmax(teacher / 2.0, dim=-1), reduction="batchmean") * 4.0
                loss.backward()
                student.grad = None

            return step

        return make

    def cos_topk(queries: int, keys: int, dim: int, k: int, dtype: torch.dtype):
        # Retrieval as PyTorch code writes it: normalise the queries, one product, topk.
        def make():
            store = F.normalize(torch.randn(keys, dim, device=device), dim=-1).to(dtype)
            q = torch.randn(queries, dim, device=device)
            return lambda: torch.topk(F.normalize(q, dim=-1).to(dtype) @ store.T, k, dim=-1)

        return make

    base = bert_config(hidden=768, layers=12, intermediate=3072)

    def bert_forward(amp: bool):
        def make():
            model = transformers.BertModel(base, add_pooling_layer=False).to(device).eval()
            ids = torch.randint(0, base.vocab_size, (BATCH, SEQ), device=device)
            mask = torch.ones_like(ids)

            def step():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

            return step

        return make

    def bert_train_step(amp: bool, compiled: bool):
        def make():
            model = transformers.BertModel(base, add_pooling_layer=False).to(device).train()
            head = torch.nn.Linear(base.hidden_size, 2).to(device)
            opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=5e-5)
            run = torch.compile(model) if compiled else model
            ids = torch.randint(0, base.vocab_size, (BATCH, SEQ), device=device)
            mask = torch.ones_like(ids)
            labels = torch.randint(0, 2, (BATCH,), device=device)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    pooled = mean_pool(run(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
                    loss = F.cross_entropy(head(pooled), labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            return step

        return make

    entries: list[Entry] = []
    products = [
        (TOKENS, 384, 1536, "nn"),
        (TOKENS, 1536, 384, "nn"),
        (TOKENS, 384, 384, "nt"),
        (384, 1536, TOKENS, "tn"),
        (TOKENS, 768, 3072, "nn"),
        (TOKENS, 3072, 768, "nn"),
        (TOKENS, 768, 768, "nt"),
        (3072, TOKENS, 768, "tn"),
        (8192, 8192, 8192, "nn"),
    ]
    for name, dtype in DTYPES.items():
        for m, k, n, tag in products:
            entries.append((f"matmul/{tag}/{m}x{k}x{n}/{name}", matmul(m, k, n, tag, dtype), Work(flops=2 * m * k * n)))
        flops = 2 * TOKENS * 768 * 3072
        entries.append((f"linear/fwd/{TOKENS}x768x3072/{name}", linear(TOKENS, 768, 3072, dtype, False), Work(flops=flops)))
        entries.append((f"linear/fwd-bwd/{TOKENS}x768x3072/{name}", linear(TOKENS, 768, 3072, dtype, True), Work(flops=3 * flops)))
        for head_dim in (32, 64):
            flops = 4 * BATCH * 12 * SEQ * SEQ * head_dim
            shape = f"b{BATCH}-h12-t{SEQ}-d{head_dim}/{name}"
            entries.append((f"attention/fwd/{shape}", attention(head_dim, dtype, False), Work(flops=flops)))
            entries.append((f"attention/fwd-bwd/{shape}", attention(head_dim, dtype, True), Work(flops=2.5 * flops)))
    for rows, classes in ((4096, 32000), (256, 2), (8192, 49152)):
        for name, dtype in DTYPES.items():
            if (rows, classes, name) in ((4096, 32000, "f32"), (256, 2, "f32")):
                continue  # the CPU list's entries, on the GPU too
            entries.append(
                (f"softmax-kl/fwd-bwd/{rows}x{classes}/{name}", softmax_kl(rows, classes, dtype), Work(bytes=3 * rows * classes * dtype.itemsize))
            )
    entries.append(
        ("cos-topk/q1024-n1000000-d384-k16/f16", cos_topk(1024, 1_000_000, 384, 16, torch.float16), Work(flops=2 * 1024 * 1_000_000 * 384))
    )
    fwd_flops = model_forward_flops(base, BATCH, SEQ)
    for amp, suffix in ((False, ""), (True, "/amp-bf16")):
        entries.append((f"bert-base/forward/b{BATCH}x{SEQ}{suffix}", bert_forward(amp), Work(flops=fwd_flops, tokens=TOKENS)))
        entries.append((f"bert-base/train-step/b{BATCH}x{SEQ}{suffix}", bert_train_step(amp, False), Work(flops=3 * fwd_flops, tokens=TOKENS)))
        if compile_steps:
            entries.append(
                (f"bert-base/train-step/b{BATCH}x{SEQ}{suffix}/compiled", bert_train_step(amp, True), Work(flops=3 * fwd_flops, tokens=TOKENS))
            )
    return entries


def build_llama_entries(model_dir: str, device: torch.device) -> list[Entry]:
    """SmolLM2 entries; the model is loaded once, by the first selected entry."""
    loaded: list[transformers.LlamaForCausalLM] = []

    def model() -> transformers.LlamaForCausalLM:
        if not loaded:
            m = transformers.LlamaForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, attn_implementation="sdpa"
            ).to(device)
            loaded.append(m.eval().requires_grad_(False))
        return loaded[0]

    def token_ids(batch: int, seq: int) -> torch.Tensor:
        return torch.randint(0, model().config.vocab_size, (batch, seq), device=device)

    def prefill():
        m = model()
        ids = token_ids(LLAMA_BATCH, LLAMA_SEQ)

        def step():
            with torch.no_grad():
                m(input_ids=ids, use_cache=True, logits_to_keep=1)

        return step

    def decode(batch: int):
        def make():
            m = model()
            cache = transformers.DynamicCache(config=m.config)
            with torch.no_grad():
                m(input_ids=token_ids(batch, LLAMA_CACHE), past_key_values=cache, use_cache=True, logits_to_keep=1)
            new = token_ids(batch, 1)
            position = torch.full((batch, 1), LLAMA_CACHE, device=device)

            def step():
                with torch.no_grad():
                    m(input_ids=new, position_ids=position, past_key_values=cache, use_cache=True).logits
                cache.crop(-1)  # a negative count removes that many tokens from the end

            return step

        return make

    def prompt_fwd_bwd():
        m = model()
        cfg = m.config
        ids = token_ids(LLAMA_BATCH, LLAMA_SEQ)
        positions = torch.arange(LLAMA_SEQ, device=device).expand(LLAMA_BATCH, -1)
        # Per layer [k, n_kv_heads, head_dim] keys and values, stacked over layers.
        shape = (cfg.num_hidden_layers, PROMPT_LEN, cfg.num_key_value_heads, cfg.head_dim)
        keys = (0.5 * torch.randn(*shape, device=device)).requires_grad_()
        values = (0.5 * torch.randn(*shape, device=device)).requires_grad_()

        def step():
            cache = transformers.DynamicCache(config=cfg)
            for layer in range(cfg.num_hidden_layers):
                # [k, heads, dim] -> [batch, heads, k, dim], the cache layout
                k = keys[layer].transpose(0, 1).expand(LLAMA_BATCH, -1, -1, -1)
                v = values[layer].transpose(0, 1).expand(LLAMA_BATCH, -1, -1, -1)
                cache.update(k, v, layer)
            out = m(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, labels=ids)
            out.loss.backward()
            keys.grad = values.grad = None

        return step

    tokens = LLAMA_BATCH * LLAMA_SEQ
    return [
        (f"{LLAMA_NAME}/prefill/b{LLAMA_BATCH}x{LLAMA_SEQ}", prefill, Work(tokens=tokens)),
        *((f"{LLAMA_NAME}/decode/b{b}", decode(b), Work(tokens=b)) for b in LLAMA_DECODE_BATCHES),
        (f"{LLAMA_NAME}/prompt-fwd-bwd/b{LLAMA_BATCH}x{LLAMA_SEQ}", prompt_fwd_bwd, Work(tokens=tokens)),
    ]


def time_entry(step: Callable[[], None], sync: Callable[[], None], args: argparse.Namespace) -> tuple[float, int]:
    """Median seconds per call and the number of samples taken."""

    def timed(reps: int) -> float:
        if args.device == "cuda":
            # Device time between two events on the stream, as kdx times itself.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3 / reps
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            step()
        sync()
        return (time.perf_counter() - start) / reps

    began = time.perf_counter()
    per_call = math.inf
    for i in range(max(1, args.warmup)):
        per_call = timed(1)
        if i > 0 and time.perf_counter() - began > args.budget / 4:
            break
    reps = max(1, math.ceil(MIN_SAMPLE_S / per_call))
    samples: list[float] = []
    while len(samples) < args.runs and (len(samples) < MIN_RUNS or time.perf_counter() - began < args.budget):
        samples.append(timed(reps))
    return statistics.median(samples), len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", help="model folder whose config.json gives the MiniLM shapes")
    parser.add_argument(
        "--llama-model",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "weights", LLAMA_NAME),
        help="SmolLM2-135M Hugging Face folder (default: weights/smollm2-135m)",
    )
    parser.add_argument("--filter", default="", help="run only entries whose name contains SUBSTR")
    parser.add_argument("--runs", type=int, default=20, help="timed samples per entry (at most)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up calls per entry")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per entry before stopping early")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile'd training steps (cuda)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    table = sys.stderr if args.json else sys.stdout
    print(f"{'entry':<48} {'median ms':>11} {'rate':>15} {'tokens/s':>10} {'runs':>5}", file=table)
    results = []

    def report() -> None:
        if args.json:
            print(
                json.dumps(
                    {
                        "device": device_name,
                        "framework": f"pytorch {torch.__version__}",
                        "threads": args.threads,
                        "entries": results,
                    },
                    indent=2,
                )
            )

    def stopped(signum, frame):
        # A timeout's SIGTERM: keep what was measured.
        print(f"stopped by signal {signum}: {len(results)} entries done", file=sys.stderr)
        report()
        sys.exit(1)

    signal.signal(signal.SIGTERM, stopped)
    entries = build_entries(minilm_config(args.model), device)
    if device.type == "cuda":
        # The GPU list has its own products and attention, in both dtypes and with rotated inputs.
        entries = [e for e in entries if not e[0].startswith(("matmul/", "attention/"))]
        entries += build_gpu_entries(device, args.compile)
    llama_entries = build_llama_entries(args.llama_model, device)
    if os.path.isfile(os.path.join(args.llama_model, "config.json")):
        entries += llama_entries
    elif any(args.filter in name for name, _, _ in llama_entries):
        print(f"note: no model folder at {args.llama_model}; {LLAMA_NAME} entries skipped", file=table)
    for name, make, work in entries:
        if args.filter not in name:
            continue
        seconds, runs = time_entry(make(), sync, args)
        result = {"name": name, "median_ms": round(seconds * 1e3, 4)}
        if work.flops:
            result["gflops"] = round(work.flops / seconds / 1e9, 2)
            rate = f"{result['gflops']:.2f} GFLOP/s"
        elif work.bytes:
            result["gbps"] = round(work.bytes / seconds / 1e9, 3)
            rate = f"{result['gbps']:.3f} GB/s"
        else:
            rate = "-"
        tokens = ""
        if work.tokens:
            result["tokens_per_s"] = round(work.tokens / seconds, 1)
            tokens = f"{result['tokens_per_s']:.0f}"
        result["runs"] = runs
        results.append(result)
        print(f"{name:<48} {seconds * 1e3:>11.3f} {rate:>15} {tokens:>10} {runs:>5}", file=table, flush=True)

    report()


if __name__ == "__main__":
    main()
