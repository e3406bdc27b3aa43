//! all-MiniLM-L6-v2 against Hugging Face transformers (fixture made by tools/make_golden.py):
//! token ids, the last hidden state and the sentence embeddings, alone and in one padded batch.

mod common;

use std::path::PathBuf;
use std::process::Command;

use kdx::backend::{backend, Pooling};
use kdx::model::bert::Mode;
use kdx::model::fetch;
use kdx::model::EncoderModel;
use kdx::Device;
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    sentences: Vec<Sentence>,
}

#[derive(Deserialize)]
struct Sentence {
    text: String,
    input_ids: Vec<u32>,
    last_hidden_state: Vec<Vec<f32>>,
    mean_normalized: Vec<f32>,
    cls: Vec<f32>,
}

fn golden() -> Golden {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm_golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The real model, installed by the same code `kdx fetch` runs.
fn model_dir() -> PathBuf {
    fetch::fetch(
        "minilm-l6",
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights"),
    )
    .unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn hidden_states_and_embeddings_match_transformers() {
    let model = EncoderModel::load(&model_dir()).unwrap();
    let be = backend(Device::Cpu).unwrap();
    let golden = golden();
    assert!(golden.sentences.len() >= 5);
    let hidden_size = model.encoder.config.hidden_size;
    let texts: Vec<&str> = golden.sentences.iter().map(|s| s.text.as_str()).collect();

    // Alone and all together in one padded batch: the same numbers within the tolerance.
    let batched = model.text.batch(&texts).unwrap();
    let (batch_hidden, _) = model
        .encoder
        .forward(be, &model.params, &batched, Mode::Eval)
        .unwrap();
    let pooled = be
        .pool(&batch_hidden, batched.seq, &batched.lengths, Pooling::Mean)
        .unwrap();
    let batch_mean = be.l2_normalize(&pooled).unwrap().to_vec_f32();
    let batch_hidden = batch_hidden.to_vec_f32();

    for (i, s) in golden.sentences.iter().enumerate() {
        let (ids, _) = model.text.encode(&s.text).unwrap();
        assert_eq!(ids, s.input_ids, "token ids of {:?}", s.text);
        let batch = model.text.batch(&[&s.text]).unwrap();
        let (hidden, _) = model
            .encoder
            .forward(be, &model.params, &batch, Mode::Eval)
            .unwrap();
        let got = hidden.to_vec_f32();
        let want: Vec<f32> = s.last_hidden_state.concat();
        assert_eq!(got.len(), want.len());
        let max_diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            max_diff <= 1e-4,
            "{:?}: last hidden state max |diff| {max_diff}",
            s.text
        );

        let rows =
            &batch_hidden[i * batched.seq * hidden_size..][..s.input_ids.len() * hidden_size];
        let padded_diff = rows
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            padded_diff <= 1e-4,
            "{:?} in a padded batch: max |diff| {padded_diff}",
            s.text
        );

        let mean = be
            .l2_normalize(
                &be.pool(&hidden, batch.seq, &batch.lengths, Pooling::Mean)
                    .unwrap(),
            )
            .unwrap()
            .to_vec_f32();
        let cos = cosine(&mean, &s.mean_normalized);
        assert!(cos >= 0.99999, "{:?}: embedding cosine {cos}", s.text);
        let cos_batched = cosine(
            &batch_mean[i * hidden_size..(i + 1) * hidden_size],
            &s.mean_normalized,
        );
        assert!(
            cos_batched >= 0.99999,
            "{:?} batched: embedding cosine {cos_batched}",
            s.text
        );
        let cls = be
            .pool(&hidden, batch.seq, &batch.lengths, Pooling::Cls)
            .unwrap()
            .to_vec_f32();
        assert!(cosine(&cls, &s.cls) >= 0.99999, "{:?}: CLS vector", s.text);
    }
}

#[test]
fn embed_command_prints_the_reference_embeddings() {
    let dir = model_dir();
    let golden = golden();
    let (a, b) = (&golden.sentences[1], &golden.sentences[3]);
    let out = Command::new(env!("CARGO_BIN_EXE_kdx"))
        .args(["embed", "--model"])
        .arg(&dir)
        .args([&a.text, &b.text])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vectors: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vectors.len(), 2);
    assert!(cosine(&vectors[0], &a.mean_normalized) >= 0.99999);
    assert!(cosine(&vectors[1], &b.mean_normalized) >= 0.99999);

    let raw = Command::new(env!("CARGO_BIN_EXE_kdx"))
        .args(["embed", "--pool", "cls", "--no-normalize", "--model"])
        .arg(&dir)
        .arg(&a.text)
        .output()
        .unwrap();
    let vectors: Vec<Vec<f32>> = serde_json::from_slice(&raw.stdout).unwrap();
    let max_diff = vectors[0]
        .iter()
        .zip(&a.cls)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff <= 1e-4, "raw CLS max |diff| {max_diff}");
}
