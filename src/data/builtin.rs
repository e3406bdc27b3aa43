//! The built-in tasks, on the data sets `kdx fetch` installs: `uci-sentiment` and `polarity`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use super::metrics::Metric;
use super::read::{self, BadLines};
use super::{split_three, Example, LoadOptions, Task};

pub(crate) const UCI_SENTIMENT: &str = "uci-sentiment";
pub(crate) const POLARITY: &str = "polarity";

const UCI_FILES: [&str; 3] = ["amazon.json", "imdb.json", "yelp.json"];
const POLARITY_FILE: &str = "polarity-en-pang&lee2.csv";

pub(crate) fn load(name: &str, opts: &LoadOptions, bad: &mut BadLines) -> Result<Task> {
    let dir = folder(name, opts)?;
    let labels = vec!["negative".to_string(), "positive".to_string()];
    let examples = if name == UCI_SENTIMENT {
        let mut all = Vec::new();
        for file in UCI_FILES {
            all.extend(uci_file(&dir.join(file), bad)?);
        }
        all
    } else {
        polarity_file(&dir.join(POLARITY_FILE), bad)?
    };
    Ok(split_three(name, labels, Metric::Accuracy, examples))
}

/// `--data DIR` where given, else the `kdx fetch` folder, installed now if missing.
fn folder(name: &str, opts: &LoadOptions) -> Result<PathBuf> {
    if opts.data.is_some() {
        return read::data_dir(name, opts, &format!("files `kdx fetch {name}` installs"));
    }
    crate::model::fetch::fetch(name, &opts.weights_dir)
        .with_context(|| format!("task {name} needs its data set: `kdx fetch {name}` failed"))
}

/// One UCI file: a JSON array of `{"text": …, "class": 0 | 1}`, closed by an empty
/// `{"text": "", "class": null}` entry that carries no example.
fn uci_file(path: &Path, bad: &mut BadLines) -> Result<Vec<Example>> {
    let expected = format!(
        "one of {} of `kdx fetch {UCI_SENTIMENT}`",
        UCI_FILES.join(", ")
    );
    let reader = read::open(path, &expected)?;
    let entries: Vec<Value> = serde_json::from_reader(reader).with_context(|| {
        format!(
            "{}: not a JSON array of {{\"text\", \"class\"}} objects",
            path.display()
        )
    })?;
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let is_terminator = entry.get("text").and_then(Value::as_str) == Some("")
            && entry.get("class").is_some_and(Value::is_null);
        if is_terminator {
            continue;
        }
        match uci_entry(entry) {
            Ok(e) => out.push(e),
            Err(msg) => bad.bad(&format!("{}: entry {}", path.display(), i + 1), &msg)?,
        }
    }
    Ok(out)
}

fn uci_entry(entry: &Value) -> std::result::Result<Example, String> {
    if !entry.is_object() {
        return Err(format!("not a JSON object: {entry}"));
    }
    let text = read::json_text(entry, "text")?;
    let raw = match entry.get("class") {
        None => return Err("missing field 'class'".into()),
        Some(v) => read::json_label(v)?,
    };
    let label = read::label_id(&raw, &["0", "1"])?;
    Ok(Example {
        text: read::render(&[("sentence", text)]),
        label,
    })
}

/// Pang & Lee's CSV: no header, `label,text` rows with label `-1` or `1`, quoted texts that may hold
/// newlines and doubled quotes.
fn polarity_file(path: &Path, bad: &mut BadLines) -> Result<Vec<Example>> {
    let expected = format!("the file `kdx fetch {POLARITY}` installs");
    read::CsvFile::open(path, &expected)?.records(bad, |_, record| polarity_row(record))
}

fn polarity_row(record: &csv::ByteRecord) -> std::result::Result<Example, String> {
    if record.len() != 2 {
        return Err(format!("{} fields, expected 2 (label, text)", record.len()));
    }
    let field = |i: usize| std::str::from_utf8(&record[i]).map_err(|_| read::NOT_UTF8.to_string());
    let label = read::label_id(field(0)?.trim(), &["-1", "1"])?;
    let text = field(1)?.trim();
    if text.is_empty() {
        return Err("empty text".into());
    }
    Ok(Example {
        text: read::render(&[("sentence", text)]),
        label,
    })
}
