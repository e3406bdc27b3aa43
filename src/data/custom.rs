//! A user's own labelled text: CSV with `text` and `label` columns, or JSONL with `"text"` and
//! `"label"` keys.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde_json::Value;

use super::metrics::Metric;
use super::read::{self, BadLines};
use super::{split_three, stratified_split, Example, LoadOptions, Task};

pub(crate) const NAME: &str = "custom";

const EXPECTED: &str = "a .csv file with a header naming `text` and `label` columns, a .jsonl file \
     with \"text\" and \"label\" keys, or a folder with train.csv or train.jsonl and optional dev and \
     test files (.csv or .jsonl)";

/// Share of the training file split off for each missing dev or test file.
const HELD_OUT: f64 = 0.15;

/// An example before its label has an id.
struct Raw {
    text: String,
    label: String,
    at: String,
}

pub(crate) fn load(opts: &LoadOptions, bad: &mut BadLines) -> Result<Task> {
    let Some(path) = &opts.data else {
        bail!("task {NAME} reads your own data: pass --data with {EXPECTED}");
    };
    if path.is_dir() {
        return load_dir(path, bad);
    }
    if !path.exists() {
        bail!(
            "--data {}: no such file or folder (task {NAME} expects {EXPECTED})",
            path.display()
        );
    }
    let raw = read_any(path, bad)?;
    let label_names = label_names(&raw, path)?;
    let examples = with_ids(raw, &label_names, bad)?;
    Ok(split_three(NAME, label_names, Metric::Accuracy, examples))
}

fn load_dir(dir: &Path, bad: &mut BadLines) -> Result<Task> {
    let Some(train_path) = find(dir, "train")? else {
        bail!(
            "{}: has neither train.csv nor train.jsonl (task {NAME} expects {EXPECTED})",
            dir.display()
        );
    };
    let train = read_any(&train_path, bad)?;
    let label_names = label_names(&train, &train_path)?;
    let train = with_ids(train, &label_names, bad)?;
    let mut given = |split: &str| -> Result<Option<Vec<Example>>> {
        match find(dir, split)? {
            Some(path) => {
                let raw = read_any(&path, bad)?;
                Ok(Some(with_ids(raw, &label_names, bad)?))
            }
            None => Ok(None),
        }
    };
    let (dev, test) = (given("dev")?, given("test")?);
    let k = label_names.len();
    let (train, dev, test) = match (dev, test) {
        (Some(dev), Some(test)) => (train, dev, test),
        (Some(dev), None) => {
            let [train, test] = two(stratified_split(train, &[1.0 - HELD_OUT, HELD_OUT], k));
            (train, dev, test)
        }
        (None, Some(test)) => {
            let [train, dev] = two(stratified_split(train, &[1.0 - HELD_OUT, HELD_OUT], k));
            (train, dev, test)
        }
        (None, None) => return Ok(split_three(NAME, label_names, Metric::Accuracy, train)),
    };
    Ok(Task {
        name: NAME.to_string(),
        label_names,
        metric: Metric::Accuracy,
        train,
        dev,
        test,
        skipped_lines: 0,
    })
}

fn two(parts: Vec<Vec<Example>>) -> [Vec<Example>; 2] {
    let mut it = parts.into_iter();
    [it.next().unwrap_or_default(), it.next().unwrap_or_default()]
}

/// `dir/split.csv` or `dir/split.jsonl`.
fn find(dir: &Path, split: &str) -> Result<Option<PathBuf>> {
    let csv = dir.join(format!("{split}.csv"));
    let jsonl = dir.join(format!("{split}.jsonl"));
    match (csv.exists(), jsonl.exists()) {
        (true, true) => bail!(
            "{}: holds both {split}.csv and {split}.jsonl; keep one",
            dir.display()
        ),
        (true, false) => Ok(Some(csv)),
        (false, true) => Ok(Some(jsonl)),
        (false, false) => Ok(None),
    }
}

fn read_any(path: &Path, bad: &mut BadLines) -> Result<Vec<Raw>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => read_csv(path, bad),
        Some("jsonl") => read_jsonl(path, bad),
        _ => bail!(
            "{}: not a .csv or .jsonl file (task {NAME} expects {EXPECTED})",
            path.display()
        ),
    }
}

/// The sorted distinct labels: numerically when every label is an integer. Fewer than 2 is an error.
fn label_names(raw: &[Raw], path: &Path) -> Result<Vec<String>> {
    if raw.is_empty() {
        bail!(
            "{}: no examples (task {NAME} expects {EXPECTED})",
            path.display()
        );
    }
    let mut names: Vec<String> = raw.iter().map(|r| r.label.clone()).collect();
    names.sort();
    names.dedup();
    if let [only] = names.as_slice() {
        bail!(
            "{}: needs at least 2 labels, found only '{only}' (a classifier needs examples of every class it is to tell apart)",
            path.display()
        );
    }
    let numbers: Option<Vec<i64>> = names.iter().map(|n| n.parse().ok()).collect();
    if let Some(numbers) = numbers {
        let mut pairs: Vec<(i64, String)> = numbers.into_iter().zip(names).collect();
        pairs.sort();
        names = pairs.into_iter().map(|(_, n)| n).collect();
    }
    Ok(names)
}

fn with_ids(raw: Vec<Raw>, label_names: &[String], bad: &mut BadLines) -> Result<Vec<Example>> {
    let accepted: Vec<&str> = label_names.iter().map(String::as_str).collect();
    let mut out = Vec::with_capacity(raw.len());
    for r in raw {
        match read::label_id(&r.label, &accepted) {
            Ok(label) => out.push(Example {
                text: r.text,
                label,
            }),
            Err(msg) => bad.bad(&r.at, &msg)?,
        }
    }
    Ok(out)
}

fn read_csv(path: &Path, bad: &mut BadLines) -> Result<Vec<Raw>> {
    let mut file = read::CsvFile::open(path, EXPECTED)?;
    let (header_line, header) = file.header()?;
    let column = |name: &str| -> Result<usize> {
        match header.iter().position(|h| h == name) {
            Some(i) => Ok(i),
            None => bail!(
                "{}: the header has no '{name}' column (found: {}); a custom data set's CSV needs `text` and `label` columns",
                read::at(path, header_line),
                header.join(", ")
            ),
        }
    };
    let (text_col, label_col) = (column("text")?, column("label")?);
    file.records(bad, |line, record| {
        let cell = |i: usize, name: &str| -> std::result::Result<&str, String> {
            let Some(bytes) = record.get(i) else {
                return Err(format!(
                    "missing field '{name}' ({} fields, the header has {})",
                    record.len(),
                    header.len()
                ));
            };
            match std::str::from_utf8(bytes) {
                Ok(s) if s.trim().is_empty() => Err(format!("empty field '{name}'")),
                Ok(s) => Ok(s.trim()),
                Err(_) => Err(format!("field '{name}' is {}", read::NOT_UTF8)),
            }
        };
        let text = cell(text_col, "text")?;
        let label = cell(label_col, "label")?;
        Ok(Raw {
            text: read::render(&[("sentence", text)]),
            label: label.to_string(),
            at: read::at(path, line),
        })
    })
}

fn read_jsonl(path: &Path, bad: &mut BadLines) -> Result<Vec<Raw>> {
    read::jsonl(path, EXPECTED, bad, |line, obj| {
        let text = read::json_text(obj, "text")?;
        let label = match obj.get("label") {
            None | Some(Value::Null) => return Err("missing field 'label'".to_string()),
            Some(Value::String(s)) if s.trim().is_empty() => {
                return Err("empty field 'label'".to_string())
            }
            Some(Value::String(s)) => s.trim().to_string(),
            Some(Value::Number(x)) if x.is_i64() || x.is_u64() => x.to_string(),
            Some(other) => {
                return Err(format!(
                    "the label must be a string or an integer, found {other}"
                ))
            }
        };
        Ok(Raw {
            text: read::render(&[("sentence", text)]),
            label,
            at: read::at(path, line),
        })
    })
}
