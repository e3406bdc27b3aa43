//! Golden parity of the Llama decoder with transformers on the real SmolLM2-135M-Instruct
//! (tests/fixtures/smollm2_golden.json, made by tools/make_llama_golden.py): greedy 20-token
//! continuations of three prompts token for token (one padded batch, KV-cache decoding), the top-5
//! next-token log-probs within 1e-3, the mean token NLL of a sentence within 1e-3, and the same with
//! a formula-defined deep prompt.

use std::path::PathBuf;

use kdx::backend::{backend, Backend, Sampling};
use kdx::model::fetch;
use kdx::model::llama::generate::GenerateOptions;
use kdx::model::llama::{next_token_targets, Llama, TokenBatch};
use kdx::model::params::ParamStore;
use kdx::model::prompts::DeepPrompts;
use kdx::{Device, Tensor};
use serde_json::Value;

fn cpu() -> &'static dyn Backend {
    backend(Device::Cpu).unwrap()
}

fn golden() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn model() -> (Llama, ParamStore) {
    let dir = fetch::fetch(
        "smollm2-135m",
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights"),
    )
    .unwrap();
    Llama::load(&dir).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Log-softmax of one row of logits, in f64.
fn log_softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::MIN, f64::max);
    let z = row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|x| x - z).collect()
}

/// Checks the top-5 of `logits` (one row) against the fixture's ids and log-probs.
fn check_top5(what: &str, logits: &[f64], want: &Value) {
    let lp = log_softmax(logits);
    let mut order: Vec<usize> = (0..lp.len()).collect();
    order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]));
    let got: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
    assert_eq!(got, ids(&want["ids"]), "{what}: top-5 ids");
    for (i, w) in floats(&want["log_probs"]).iter().enumerate() {
        let g = lp[order[i]];
        assert!((g - w).abs() < 1e-3, "{what}: log-prob {i}: {g} vs {w}");
    }
}

/// Mean and per-token NLL of a sentence by the shifted LM loss.
fn sentence_nll(
    model: &Llama,
    params: &ParamStore,
    ids: &[u32],
    prompts: Option<&DeepPrompts>,
) -> (f64, Vec<f64>) {
    let batch = TokenBatch::from_sequences(&[ids.to_vec()], 0).unwrap();
    let (hidden, _) = model.forward(cpu(), params, &batch, prompts).unwrap();
    let targets = next_token_targets(&batch);
    let (mean, _) = model
        .lm_loss(cpu(), params, &hidden, &targets, None)
        .unwrap();
    let logits = model.logits(cpu(), params, &hidden).unwrap().to_vec_f64();
    let vocab = model.config.vocab_size;
    let per_token = (0..ids.len() - 1)
        .map(|t| -log_softmax(&logits[t * vocab..(t + 1) * vocab])[ids[t + 1] as usize])
        .collect();
    (mean, per_token)
}

/// The fixture's deep prompt: keys and values defined by a formula, evaluated in f64, stored in f32.
fn formula_prompts(model: &Llama, k: usize) -> DeepPrompts {
    let c = &model.config;
    let (kvh, d) = (c.num_key_value_heads, c.head_dim());
    let layers = (0..c.num_hidden_layers)
        .map(|l| {
            let fill = |f: &dyn Fn(f64, f64, f64, f64) -> f64| {
                let mut v = Vec::with_capacity(k * kvh * d);
                for j in 0..k {
                    for h in 0..kvh {
                        for e in 0..d {
                            v.push(f(l as f64, j as f64, h as f64, e as f64) as f32);
                        }
                    }
                }
                Tensor::from_vec(v, &[k, kvh * d]).unwrap()
            };
            (
                fill(&|l, j, h, e| 0.5 * (0.37 * l + 1.3 * j + 0.71 * h + 0.05 * e + 0.1).sin()),
                fill(&|l, j, h, e| 0.5 * (0.23 * l + 0.9 * j + 0.53 * h + 0.07 * e + 0.2).cos()),
            )
        })
        .collect();
    DeepPrompts::from_tensors(c, layers, "smollm2-135m").unwrap()
}

#[test]
fn smollm2_matches_transformers() {
    let g = golden();
    let (model, params) = model();
    let prompts = g["prompts"].as_array().unwrap();
    let sequences: Vec<Vec<u32>> = prompts.iter().map(|p| ids(&p["input_ids"])).collect();
    let batch = TokenBatch::from_sequences(&sequences, 2).unwrap();

    // Next-token log-probs at each prompt's end, from one padded batch.
    let (logits, _) = model
        .prefill(cpu(), &params, &batch, None, batch.seq)
        .unwrap();
    let vocab = model.config.vocab_size;
    let logits = logits.to_vec_f64();
    for (i, p) in prompts.iter().enumerate() {
        check_top5(
            &format!("prompt {i}"),
            &logits[i * vocab..(i + 1) * vocab],
            &p["next_top5"],
        );
    }

    // Greedy continuations, all three prompts decoded together through the KV cache.
    let options = GenerateOptions {
        max_new_tokens: 20,
        sampling: Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        },
        stop_ids: vec![],
    };
    let out = model
        .generate(cpu(), &params, &batch, None, &options)
        .unwrap();
    for (i, (p, o)) in prompts.iter().zip(&out).enumerate() {
        assert_eq!(
            o.tokens,
            ids(&p["greedy_new_ids"]),
            "prompt {i}: greedy continuation"
        );
    }

    // Sentence NLL, mean and per token.
    let s = &g["sentence"];
    let (mean, per_token) = sentence_nll(&model, &params, &ids(&s["input_ids"]), None);
    assert!(
        (mean - s["mean_nll"].as_f64().unwrap()).abs() < 1e-3,
        "mean NLL {mean}"
    );
    for (t, (a, b)) in per_token.iter().zip(floats(&s["token_nll"])).enumerate() {
        assert!((a - b).abs() < 1e-3, "token {t} NLL {a} vs {b}");
    }

    // With a deep prompt: every layer's attention sees the prefix first.
    let dp = &g["deep_prompt"];
    let deep = formula_prompts(&model, dp["k"].as_u64().unwrap() as usize);
    let first = TokenBatch::from_sequences(&sequences[..1], 2).unwrap();
    let (logits, _) = model
        .prefill(cpu(), &params, &first, Some(&deep), first.seq)
        .unwrap();
    check_top5("deep prompt", &logits.to_vec_f64(), &dp["prompt_next_top5"]);
    let (mean, _) = sentence_nll(&model, &params, &ids(&s["input_ids"]), Some(&deep));
    assert!(
        (mean - dp["sentence_mean_nll"].as_f64().unwrap()).abs() < 1e-3,
        "deep-prompt mean NLL {mean}"
    );
}
