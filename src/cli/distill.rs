//! `kdx distill`: train a small student from a fine-tuned teacher.

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use super::common::{
    backend_with, check_labels, encode, finish, model_dir, paused, score_best, train_data, Report,
    TaskArgs, TrainArgs,
};
use crate::model::export::{init_classifier, load_classifier, save_classifier};
use crate::train::trainer::{evaluate, predict, train, Outcome, RunDir, Targets, TrainConfig};

#[derive(Clone, Copy, Debug, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Method {
    /// Vanilla KD (Hinton et al.): (1−α)·CE + α·τ²·KL(teacher ‖ student) at temperature τ
    Kd,
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value = "kd")]
    method: Method,
    /// The teacher: a `kdx finetune` run folder (or a classifier's Hugging Face folder)
    #[arg(long)]
    teacher: PathBuf,
    /// Teacher assistant: a run distilled from the teacher; when given, the student learns from it
    #[arg(long)]
    ta: Option<PathBuf>,
    /// Hugging Face encoder folder the student starts from (its embeddings and bottom layers)
    #[arg(long)]
    student: PathBuf,
    /// Layers the student keeps (the bottom ones)
    #[arg(long)]
    student_layers: usize,
    /// Weight of the distillation term (1 − α goes to the gold labels)
    #[arg(long, default_value_t = 0.5)]
    alpha: f32,
    /// Softmax temperature of the distillation term
    #[arg(long, default_value_t = 2.0)]
    temperature: f32,
    #[command(flatten)]
    task: TaskArgs,
    /// Run folder: best/, metrics.jsonl, checkpoint, report.json
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Serialize)]
struct Details<'a> {
    teacher: PathBuf,
    teacher_test: std::collections::BTreeMap<String, f64>,
    ta: Option<PathBuf>,
    student: &'a std::path::Path,
    student_layers: usize,
    alpha: f32,
    temperature: f32,
    head: String,
    #[serde(flatten)]
    outcome: Outcome,
    config: TrainConfig,
}

pub fn run(args: Args) -> Result<()> {
    let be = backend_with(args.train.device, args.train.gemm)?;
    let task = args.task.load()?;
    let config = args.train.config();
    let teacher_dir = model_dir(&args.teacher)?;
    let teacher = load_classifier(&teacher_dir, args.train.max_len)?;
    check_labels(&teacher_dir, &teacher.label_names, &task)?;
    let (test_x, test_y) = encode(&teacher.text, &task.test)?;
    let pad = teacher.model.encoder.config.pad_token_id;
    let teacher_test = evaluate(be, &teacher.model, &teacher.params, &test_x, &test_y, pad)?;
    let source = match &args.ta {
        Some(ta) => {
            let dir = model_dir(ta)?;
            let ta = load_classifier(&dir, args.train.max_len)?;
            check_labels(&dir, &ta.label_names, &task)?;
            ta
        }
        None => teacher,
    };
    eprintln!("computing soft targets with {} …", source.dir.display());
    let (source_x, _) = encode(&source.text, &task.train)?;
    let source_pad = source.model.encoder.config.pad_token_id;
    let teacher_logits =
        predict(be, &source.model, &source.params, &source_x, source_pad, 64)?.to_vec_f32();

    let (model, mut params, text) = init_classifier(
        &args.student,
        task.num_labels(),
        args.train.head,
        Some(args.student_layers),
        args.train.max_len,
        config.seed,
    )?;
    let data = train_data(&text, &task, model.encoder.config.pad_token_id)?;
    let targets = Targets::Distill {
        teacher_logits: &teacher_logits,
        alpha: args.alpha,
        temperature: args.temperature,
    };
    let run = RunDir(args.out.clone());
    let save_best =
        |p: &_| save_classifier(&run.best(), &model, p, &task.label_names, &args.student);
    let outcome = train(
        be,
        &model,
        &mut params,
        &data,
        &targets,
        &config,
        &run,
        args.train.resume,
        save_best,
    )?;
    if paused(&outcome) {
        return Ok(());
    }
    let (dev, test) = score_best(be, &run, &task, args.train.max_len)?;
    let details = Details {
        teacher: teacher_dir,
        teacher_test,
        ta: args.ta.clone(),
        student: &args.student,
        student_layers: args.student_layers,
        alpha: args.alpha,
        temperature: args.temperature,
        head: args.train.head.to_string(),
        outcome,
        config,
    };
    let method = match args.method {
        Method::Kd if args.ta.is_some() => "kd-ta",
        Method::Kd => "kd",
    };
    finish(
        &run,
        &Report {
            task: &task.name,
            method,
            dev,
            test,
            details,
        },
        task.metric.name(),
    )
}
