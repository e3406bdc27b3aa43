//! Gradients of a whole (tiny, random) Llama against central finite differences in f64: the
//! deep-prompt gradients always, and every weight's gradient when asked; with grouped-query
//! attention, a padded batch, tied and untied heads. Without a gradient store no weight gradient
//! is computed.

mod common;

use common::check_gradient;
use kdx::backend::{backend, Backend};
use kdx::model::llama::{next_token_targets, Llama, LlamaConfig, TokenBatch};
use kdx::model::params::ParamStore;
use kdx::model::prompts::DeepPrompts;
use kdx::{DType, Device};

fn cpu() -> &'static dyn Backend {
    backend(Device::Cpu).unwrap()
}

fn tiny(tied: bool) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 16, "tie_word_embeddings": tied
    }))
    .unwrap()
}

/// The LM loss of a padded batch through the model with prompts.
fn loss(model: &Llama, params: &ParamStore, prompts: &DeepPrompts, batch: &TokenBatch) -> f64 {
    let (hidden, _) = model.forward(cpu(), params, batch, Some(prompts)).unwrap();
    let targets = next_token_targets(batch);
    model
        .lm_loss(cpu(), params, &hidden, &targets, None)
        .unwrap()
        .0
}

#[test]
fn prompt_and_weight_gradients_match_finite_differences() {
    for tied in [false, true] {
        let config = tiny(tied);
        let mut params = ParamStore::new();
        let model = Llama::register(&config, &mut params)
            .unwrap()
            .with_dtype(DType::F64)
            .unwrap();
        params.initialise(3).unwrap();
        // Larger weights than the 0.02 init (σ = 0.1), so every path carries a visible gradient.
        for (_, t) in params.iter_mut() {
            let v: Vec<f64> = t.to_vec_f64().iter().map(|x| x * 5.0 + 0.05).collect();
            *t = kdx::Tensor::from_vec(v, t.shape()).unwrap();
        }
        let params = params.to_dtype(DType::F64).unwrap();
        let mut prompts = DeepPrompts::random(&config, 2, 0.5, 4, "tiny").unwrap();
        prompts.store = prompts.store.to_dtype(DType::F64).unwrap();
        let batch = TokenBatch::from_sequences(&[vec![1, 5, 2, 9, 3], vec![4, 4, 7]], 0).unwrap();

        let (hidden, cache) = model
            .forward(cpu(), &params, &batch, Some(&prompts))
            .unwrap();
        let targets = next_token_targets(&batch);
        let mut grads = params.zeros_like();
        let head = if tied {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let head_id = params.ids().find(|&i| params.name(i) == head).unwrap();
        let (_, d_hidden) = model
            .lm_loss(cpu(), &params, &hidden, &targets, Some(&mut grads[head_id]))
            .unwrap();
        let layer_grads = model
            .backward(
                cpu(),
                &params,
                cache,
                &d_hidden,
                Some(&prompts),
                Some(&mut grads),
            )
            .unwrap()
            .unwrap();
        let mut prompt_grads = prompts.store.zeros_like();
        prompts
            .accumulate(&mut prompt_grads, &layer_grads, cpu())
            .unwrap();

        for id in prompts.store.ids() {
            let what = format!("tied {tied}: {}", prompts.store.name(id));
            check_gradient(
                &what,
                &prompts.store[id],
                &prompt_grads[id],
                |x| {
                    let mut p = prompts.clone();
                    p.store[id] = x.clone();
                    loss(&model, &params, &p, &batch)
                },
                1e-5,
                1e-9,
            );
        }
        for id in params.ids() {
            let what = format!("tied {tied}: {}", params.name(id));
            check_gradient(
                &what,
                &params[id],
                &grads[id],
                |x| {
                    let mut p = params.clone();
                    p[id] = x.clone();
                    loss(&model, &p, &prompts, &batch)
                },
                1e-5,
                1e-9,
            );
        }

        // Prompt tuning passes no gradient store: the prompt gradients are the same without it.
        let (hidden, cache) = model
            .forward(cpu(), &params, &batch, Some(&prompts))
            .unwrap();
        let (_, d_hidden) = model
            .lm_loss(cpu(), &params, &hidden, &targets, None)
            .unwrap();
        let frozen = model
            .backward(cpu(), &params, cache, &d_hidden, Some(&prompts), None)
            .unwrap()
            .unwrap();
        for ((a, b), (c, d)) in frozen.iter().zip(&layer_grads) {
            assert!(a.to_vec_f64() == c.to_vec_f64() && b.to_vec_f64() == d.to_vec_f64());
        }
    }
}

#[test]
fn prompt_tuning_lowers_the_loss_of_a_frozen_model() {
    use kdx::train::prompt_tune::{mean_loss, tune, PromptTuning};
    let config = tiny(true);
    let mut params = ParamStore::new();
    let model = Llama::register(&config, &mut params).unwrap();
    params.initialise(5).unwrap();
    // Weights of σ = 0.2 (not the 0.02 init), so attention to the prompts reaches the output.
    for (_, t) in params.iter_mut() {
        let v: Vec<f32> = t.to_vec_f32().iter().map(|x| x * 10.0).collect();
        *t = kdx::Tensor::from_vec(v, t.shape()).unwrap();
    }
    let frozen = params.clone();
    // A pattern the random model does not know: prompts alone must learn to predict it.
    let sequences: Vec<Vec<u32>> = (0..8)
        .map(|i| (0..6).map(|t| ((i + 3 * t) % 11) as u32).collect())
        .collect();
    let mut prompts = DeepPrompts::random(&config, 4, 0.02, 6, "tiny").unwrap();
    let before = mean_loss(cpu(), &model, &params, &prompts, &sequences, 4).unwrap();
    let settings = PromptTuning {
        steps: 100,
        batch_size: 4,
        lr: 5e-2,
        seed: 7,
    };
    let losses = tune(
        cpu(),
        &model,
        &params,
        &mut prompts,
        &sequences,
        &settings,
        |_, _| {},
    )
    .unwrap();
    let after = mean_loss(cpu(), &model, &params, &prompts, &sequences, 4).unwrap();
    assert_eq!(losses.len(), 100);
    assert!(after < 0.8 * before, "loss {before} -> {after}");
    // The model itself did not move.
    for (a, b) in params.iter().zip(frozen.iter()) {
        assert!(a.1.to_vec_f64() == b.1.to_vec_f64(), "{} changed", a.0);
    }
    // Saved prompts come back equal, and are refused for another model.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    prompts.save(&path).unwrap();
    let again = DeepPrompts::load(&path, &config, "tiny").unwrap();
    for (a, b) in again.store.iter().zip(prompts.store.iter()) {
        assert!(a.1.to_vec_f64() == b.1.to_vec_f64());
    }
    let err = DeepPrompts::load(&path, &config, "other")
        .unwrap_err()
        .to_string();
    assert!(err.contains("trained for 'tiny'"), "{err}");
    let bigger = LlamaConfig {
        num_hidden_layers: 3,
        ..config.clone()
    };
    let err = DeepPrompts::load(&path, &bigger, "tiny")
        .unwrap_err()
        .to_string();
    assert!(err.contains("prompts for 2 layers"), "{err}");
}
