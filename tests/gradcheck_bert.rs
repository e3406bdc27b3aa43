//! A whole random 2-layer BERT + classifier in f64: every parameter's gradient against central finite
//! differences, with padding and dropout on.

mod common;

use common::check_gradient;
use kdx::backend::backend;
use kdx::model::bert::{Batch, Mode};
use kdx::model::classifier::{Head, SequenceClassifier};
use kdx::model::config::BertConfig;
use kdx::model::params::ParamStore;
use kdx::{DType, Device, Tensor};

fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 23,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 12,
        max_position_embeddings: 9,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_act: "gelu".into(),
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        initializer_range: 0.5,
        pad_token_id: 0,
    }
}

fn batch() -> Batch {
    Batch {
        ids: vec![1, 5, 9, 3, 22, 0, 2, 7, 4, 0, 0, 0, 8, 8, 1, 6, 0, 0],
        type_ids: vec![0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0],
        lengths: vec![5, 3, 4],
        seq: 6,
    }
}

#[test]
fn every_parameter_gradient_matches_finite_differences() {
    let config = tiny_config();
    for (head, mode) in [
        (Head::Mean, Mode::Eval),
        (Head::Mean, Mode::Train { seed: 9 }),
        (Head::Pooler, Mode::Train { seed: 4 }),
    ] {
        check_every_gradient(&config, head, mode);
    }
}

fn check_every_gradient(config: &BertConfig, head: Head, mode: Mode) {
    let be = backend(Device::Cpu).unwrap();
    let mut store = ParamStore::new();
    let model = SequenceClassifier::register(config, 3, head, &mut store);
    store.initialise(42).unwrap();
    let params = store.to_dtype(DType::F64).unwrap();
    let (batch, labels) = (batch(), [2u32, 0, 1]);
    {
        let mut grads = params.zeros_like();
        model
            .loss_and_grads(be, &params, &batch, &labels, mode, &mut grads)
            .unwrap();
        for id in params.ids() {
            let name = params.name(id).to_string();
            let loss_with = |value: &Tensor| {
                let mut p = params.clone();
                p[id] = value.clone();
                let mut scratch = p.zeros_like();
                model
                    .loss_and_grads(be, &p, &batch, &labels, mode, &mut scratch)
                    .unwrap()
            };
            // Rows of the embedding tables that the batch never uses have a zero gradient on both sides.
            check_gradient(
                &format!("{name} ({head:?} head, {mode:?})"),
                &params[id],
                &grads[id],
                loss_with,
                1e-4,
                1e-8,
            );
            // Only the key bias has no effect on the loss (softmax ignores a shift shared by all keys).
            let norm = grads[id]
                .to_vec_f64()
                .iter()
                .map(|g| g * g)
                .sum::<f64>()
                .sqrt();
            assert_eq!(
                norm < 1e-9,
                name.ends_with("attention.self.key.bias"),
                "{name}: gradient norm {norm}"
            );
        }
    }
}
