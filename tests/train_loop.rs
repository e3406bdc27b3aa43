//! The training loop on a tiny BERT and a synthetic task it must learn: accuracy reached, KD that
//! follows the teacher, resume equal to an uninterrupted run (after a pause or a kill), early
//! stopping, protection of existing runs, and Hugging Face export/import.

use std::collections::BTreeSet;
use std::path::Path;

use kdx::backend::backend;
use kdx::data::metrics::Metric;
use kdx::model::classifier::{Head, SequenceClassifier};
use kdx::model::config::BertConfig;
use kdx::model::export::{load_classifier, save_classifier};
use kdx::model::params::{ParamStore, Rng};
use kdx::train::trainer::{
    evaluate, train, Encoded, Outcome, RunDir, Targets, TrainConfig, TrainData,
};
use kdx::Device;

fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 40,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 16,
        ..BertConfig::minilm_l6()
    }
}

/// Label 1 iff token 7 occurs; sequences start with [CLS]=1 and end with [SEP]=2.
fn examples(n: usize, seed: u64) -> (Vec<Encoded>, Vec<u32>) {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let len = 3 + rng.below(9) as usize;
            let mut ids: Vec<u32> = (0..len).map(|_| 8 + rng.below(32) as u32).collect();
            let label = (i % 2) as u32;
            if label == 1 {
                let at = rng.below(len as u64) as usize;
                ids[at] = 7;
            }
            let mut all = vec![1];
            all.extend(ids);
            all.push(2);
            let types = vec![0; all.len()];
            ((all, types), label)
        })
        .unzip()
}

fn data() -> TrainData {
    let (train, train_labels) = examples(192, 1);
    // 60 dev examples: accuracies like 53/60 are inexact in binary, so saved scores must round-trip.
    let (dev, dev_labels) = examples(60, 2);
    TrainData {
        train,
        train_labels,
        dev,
        dev_labels,
        num_labels: 2,
        metric: Metric::Accuracy,
        pad_id: 0,
    }
}

/// 192 examples in updates of 2 × 16: 6 updates per epoch.
const EPOCHS: usize = 12;
const TOTAL: u64 = 6 * EPOCHS as u64;

fn config(stop_after: Option<u64>) -> TrainConfig {
    TrainConfig {
        epochs: EPOCHS,
        batch_size: 16,
        lr: 2e-3,
        weight_decay: 0.01,
        warmup_ratio: 0.1,
        max_grad_norm: 1.0,
        grad_accum: 2,
        eval_every: 10,
        patience: 0,
        seed: 5,
        stop_after,
    }
}

fn fresh_model() -> (SequenceClassifier, ParamStore) {
    let mut params = ParamStore::new();
    let model = SequenceClassifier::register(&tiny_config(), 2, Head::Mean, &mut params);
    params.initialise(3).unwrap();
    (model, params)
}

/// A minimal WordPiece tokenizer.json (the synthetic examples are already ids; exports need one).
const TOKENIZER: &str = r###"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
    "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
    "model":{"type":"WordPiece","unk_token":"[UNK]","continuing_subword_prefix":"##","max_input_chars_per_word":100,
    "vocab":{"[UNK]":0,"a":1,"b":2}}}"###;

/// Trains in `dir`, exporting the best model to `dir/best` as the CLI does.
fn run_with(
    dir: &Path,
    cfg: &TrainConfig,
    resume: bool,
    params: &mut ParamStore,
) -> anyhow::Result<Outcome> {
    let be = backend(Device::Cpu).unwrap();
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER)?;
    let (model, _) = fresh_model();
    let run = RunDir(dir.to_path_buf());
    let labels = vec!["no".to_string(), "yes".to_string()];
    let save_best = |p: &ParamStore| save_classifier(&run.best(), &model, p, &labels, dir);
    train(
        be,
        &model,
        params,
        &data(),
        &Targets::Labels,
        cfg,
        &run,
        resume,
        save_best,
    )
}

fn run(dir: &Path, stop_after: Option<u64>, resume: bool, params: &mut ParamStore) -> Outcome {
    run_with(dir, &config(stop_after), resume, params).unwrap()
}

fn bits(p: &ParamStore) -> Vec<u32> {
    p.iter()
        .flat_map(|(_, t)| t.to_vec_f32())
        .map(f32::to_bits)
        .collect()
}

#[test]
fn learns_the_task_and_resume_equals_uninterrupted() {
    let be = backend(Device::Cpu).unwrap();
    let whole = tempfile::tempdir().unwrap();
    let (model, mut reference) = fresh_model();
    let outcome = run(whole.path(), None, false, &mut reference);
    assert_eq!((outcome.steps, outcome.total_steps), (TOTAL, TOTAL));
    let d = data();
    let dev = evaluate(be, &model, &reference, &d.dev, &d.dev_labels, 0).unwrap();
    assert!(dev["accuracy"] >= 0.95, "dev accuracy {}", dev["accuracy"]);
    let metrics = std::fs::read_to_string(whole.path().join("metrics.jsonl")).unwrap();
    // Evaluations at every epoch end (each 6 steps) and every 10 steps.
    let evals = (1..=TOTAL).filter(|s| s % 6 == 0 || s % 10 == 0).count();
    assert_eq!(metrics.lines().count(), evals, "{metrics}");
    let reference_best = load_classifier(&whole.path().join("best"), 16).unwrap();

    // Paused mid-epoch (step 17) or right after an evaluation (step 30), then resumed.
    for stop in [17, 30] {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut params) = fresh_model();
        let paused = run(dir.path(), Some(stop), false, &mut params);
        assert!(paused.paused && paused.steps == stop);
        let (_, mut fresh) = fresh_model(); // a new process: the parameters come from the checkpoint
        let resumed = run(dir.path(), None, true, &mut fresh);
        assert_eq!(resumed.steps, TOTAL);
        assert_eq!(
            bits(&fresh),
            bits(&reference),
            "resumed from step {stop}: parameters differ"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap(),
            metrics
        );
        assert_eq!(
            (resumed.best_step, resumed.best_dev),
            (outcome.best_step, outcome.best_dev)
        );
        let best = load_classifier(&dir.path().join("best"), 16).unwrap();
        assert_eq!(bits(&best.params), bits(&reference_best.params));
    }

    // Killed: the run got to step 36, but its last checkpoint is from step 24 (evaluations after it
    // were logged); resuming from that checkpoint must drop those lines and redo the steps.
    let dir = tempfile::tempdir().unwrap();
    let (_, mut params) = fresh_model();
    run(dir.path(), Some(24), false, &mut params);
    let at_24 = std::fs::read(dir.path().join("checkpoint.safetensors")).unwrap();
    run(dir.path(), Some(36), true, &mut params);
    std::fs::write(dir.path().join("checkpoint.safetensors"), at_24).unwrap();
    let (_, mut fresh) = fresh_model();
    run(dir.path(), None, true, &mut fresh);
    assert_eq!(bits(&fresh), bits(&reference));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap(),
        metrics
    );
}

#[test]
fn early_stopping_survives_a_resume() {
    let mut cfg = config(None);
    cfg.patience = 2;
    cfg.lr = 3e-2; // too high: the dev metric stalls and the run stops early
    let whole = tempfile::tempdir().unwrap();
    let (_, mut reference) = fresh_model();
    let outcome = run_with(whole.path(), &cfg, false, &mut reference).unwrap();
    assert!(
        outcome.stopped_early && outcome.steps < TOTAL,
        "{outcome:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (_, mut params) = fresh_model();
    let pause = TrainConfig {
        stop_after: Some(outcome.steps - 3),
        ..cfg.clone()
    };
    run_with(dir.path(), &pause, false, &mut params).unwrap();
    let (_, mut fresh) = fresh_model();
    let resumed = run_with(dir.path(), &cfg, true, &mut fresh).unwrap();
    assert_eq!(
        (resumed.steps, resumed.stopped_early),
        (outcome.steps, true)
    );
    assert_eq!(bits(&fresh), bits(&reference));
}

#[test]
fn runs_are_not_overwritten_or_resumed_with_other_settings() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut params) = fresh_model();
    run(dir.path(), Some(7), false, &mut params);
    let err = run_with(dir.path(), &config(None), false, &mut params)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already holds a run") && err.contains("--resume"),
        "{err}"
    );
    let other = TrainConfig {
        lr: 1e-3,
        ..config(None)
    };
    let err = run_with(dir.path(), &other, true, &mut params)
        .unwrap_err()
        .to_string();
    assert!(err.contains("other settings"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let err = run_with(empty.path(), &config(None), true, &mut params)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no checkpoint"), "{err}");
}

#[test]
fn distillation_follows_the_teacher_not_the_labels() {
    let be = backend(Device::Cpu).unwrap();
    let d = data();
    // The teacher contradicts the gold label on every 4th training example; with α = 1 the student
    // learns only from the teacher, so it must side with it there.
    let flipped = |i: usize| i.is_multiple_of(4);
    let teacher_label = |i: usize| {
        if flipped(i) {
            1 - d.train_labels[i]
        } else {
            d.train_labels[i]
        }
    };
    let teacher: Vec<f32> = (0..d.train.len())
        .flat_map(|i| {
            if teacher_label(i) == 1 {
                [-4.0, 4.0]
            } else {
                [4.0, -4.0]
            }
        })
        .collect();
    let (model, mut params) = fresh_model();
    let dir = tempfile::tempdir().unwrap();
    let targets = Targets::Distill {
        teacher_logits: &teacher,
        alpha: 1.0,
        temperature: 1.0,
    };
    let cfg = TrainConfig {
        epochs: 30,
        ..config(None)
    };
    train(
        be,
        &model,
        &mut params,
        &d,
        &targets,
        &cfg,
        &RunDir(dir.path().to_path_buf()),
        false,
        |_| Ok(()),
    )
    .unwrap();
    let subset: Vec<usize> = (0..d.train.len()).filter(|&i| flipped(i)).collect();
    let x: Vec<Encoded> = subset.iter().map(|&i| d.train[i].clone()).collect();
    let as_teacher: Vec<u32> = subset.iter().map(|&i| teacher_label(i)).collect();
    let agreement = evaluate(be, &model, &params, &x, &as_teacher, 0).unwrap()["accuracy"];
    assert!(
        agreement >= 0.8,
        "the student agrees with the teacher on {agreement} of its flipped examples"
    );
}

#[test]
fn diverging_training_stops_with_the_step() {
    let be = backend(Device::Cpu).unwrap();
    let (model, mut params) = fresh_model();
    let cfg = TrainConfig {
        lr: 1e30,
        max_grad_norm: 0.0,
        ..config(None)
    };
    let dir = tempfile::tempdir().unwrap();
    let err = train(
        be,
        &model,
        &mut params,
        &data(),
        &Targets::Labels,
        &cfg,
        &RunDir(dir.path().to_path_buf()),
        false,
        |_| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("at step") && err.contains("diverged"), "{err}");
}

#[test]
fn saved_classifier_has_transformers_names_and_loads_back() {
    let be = backend(Device::Cpu).unwrap();
    for head in [Head::Mean, Head::Pooler] {
        let mut params = ParamStore::new();
        let model = SequenceClassifier::register(&tiny_config(), 3, head, &mut params);
        params.initialise(9).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("best");
        let labels = vec!["neutral".to_string(), "negative".into(), "positive".into()];
        // The tokenizer comes from a folder that has one.
        let tok_dir = dir.path().join("tok");
        std::fs::create_dir_all(&tok_dir).unwrap();
        std::fs::write(tok_dir.join("tokenizer.json"), TOKENIZER).unwrap();
        save_classifier(&out, &model, &params, &labels, &tok_dir).unwrap();
        save_classifier(&out, &model, &params, &labels, &tok_dir).unwrap(); // replacing works too

        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let names: BTreeSet<String> = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap()
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        let mut want: BTreeSet<String> = ["classifier.weight", "classifier.bias"]
            .map(String::from)
            .into();
        for n in [
            "word_embeddings.weight",
            "position_embeddings.weight",
            "token_type_embeddings.weight",
            "LayerNorm.weight",
            "LayerNorm.bias",
        ] {
            want.insert(format!("bert.embeddings.{n}"));
        }
        for l in 0..2 {
            for n in [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "attention.output.LayerNorm",
                "intermediate.dense",
                "output.dense",
                "output.LayerNorm",
            ] {
                want.insert(format!("bert.encoder.layer.{l}.{n}.weight"));
                want.insert(format!("bert.encoder.layer.{l}.{n}.bias"));
            }
        }
        if head == Head::Pooler {
            want.extend([
                "bert.pooler.dense.weight".to_string(),
                "bert.pooler.dense.bias".to_string(),
            ]);
        }
        assert_eq!(names, want);

        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["architectures"][0], "BertForSequenceClassification");
        assert_eq!(config["id2label"]["2"], "positive");
        assert_eq!(config["label2id"]["negative"], 1);
        assert_eq!(config["hidden_size"], 32);

        let loaded = load_classifier(&out, 16).unwrap();
        assert_eq!(loaded.label_names, labels);
        assert_eq!(loaded.model.head, head);
        assert_eq!(bits(&loaded.params), bits(&params));
        let (ex, y) = examples(8, 4);
        let a = evaluate(be, &model, &params, &ex, &y, 0).unwrap();
        let b = evaluate(be, &loaded.model, &loaded.params, &ex, &y, 0).unwrap();
        assert_eq!(a, b);
    }
}
