//! GLUE tasks from the standard TSV files: tab-separated, no quoting (quotes are literal text), a
//! header line except for CoLA.

use std::path::Path;

use anyhow::{bail, Result};

use super::metrics::Metric;
use super::read::{self, BadLines};
use super::{split_train_dev, Example, Task};

pub(crate) const NAMES: [&str; 7] = ["cola", "sst2", "mrpc", "rte", "qnli", "qqp", "mnli"];

struct Spec {
    title: &'static str,
    /// The official dev file, which kdx uses as the test split.
    dev_file: &'static str,
    /// The column names where the file has no header line (CoLA).
    headerless: Option<&'static [&'static str]>,
    /// Template fields in order: (field name in the text, column name).
    fields: &'static [(&'static str, &'static str)],
    /// The label column's name.
    label: &'static str,
    /// Label values as the file writes them; index = label id.
    raw_labels: &'static [&'static str],
    label_names: &'static [&'static str],
    metric: Metric,
}

const ENTAILMENT: [&str; 2] = ["entailment", "not_entailment"];
const BINARY: [&str; 2] = ["0", "1"];

fn spec(name: &str) -> Spec {
    match name {
        "cola" => Spec {
            title: "CoLA",
            dev_file: "dev.tsv",
            headerless: Some(&["source", "label", "original_label", "sentence"]),
            fields: &[("sentence", "sentence")],
            label: "label",
            raw_labels: &BINARY,
            label_names: &["unacceptable", "acceptable"],
            metric: Metric::Mcc,
        },
        "sst2" => Spec {
            title: "SST-2",
            dev_file: "dev.tsv",
            headerless: None,
            fields: &[("sentence", "sentence")],
            label: "label",
            raw_labels: &BINARY,
            label_names: &["negative", "positive"],
            metric: Metric::Accuracy,
        },
        "mrpc" => Spec {
            title: "MRPC",
            dev_file: "dev.tsv",
            headerless: None,
            fields: &[("sentence1", "#1 String"), ("sentence2", "#2 String")],
            label: "Quality",
            raw_labels: &BINARY,
            label_names: &["not_equivalent", "equivalent"],
            metric: Metric::F1,
        },
        "rte" => Spec {
            title: "RTE",
            dev_file: "dev.tsv",
            headerless: None,
            fields: &[("sentence1", "sentence1"), ("sentence2", "sentence2")],
            label: "label",
            raw_labels: &ENTAILMENT,
            label_names: &ENTAILMENT,
            metric: Metric::Accuracy,
        },
        "qnli" => Spec {
            title: "QNLI",
            dev_file: "dev.tsv",
            headerless: None,
            fields: &[("question", "question"), ("sentence", "sentence")],
            label: "label",
            raw_labels: &ENTAILMENT,
            label_names: &ENTAILMENT,
            metric: Metric::Accuracy,
        },
        "qqp" => Spec {
            title: "QQP",
            dev_file: "dev.tsv",
            headerless: None,
            fields: &[("question1", "question1"), ("question2", "question2")],
            label: "is_duplicate",
            raw_labels: &BINARY,
            label_names: &["not_duplicate", "duplicate"],
            metric: Metric::F1,
        },
        "mnli" => Spec {
            title: "MNLI",
            dev_file: "dev_matched.tsv",
            headerless: None,
            // Hypothesis first, as the paper writes CB.
            fields: &[("hypothesis", "sentence2"), ("premise", "sentence1")],
            label: "gold_label",
            raw_labels: &["entailment", "neutral", "contradiction"],
            label_names: &["entailment", "neutral", "contradiction"],
            metric: Metric::Accuracy,
        },
        _ => unreachable!("not a GLUE task: {name}"),
    }
}

/// What the `--data` folder of GLUE task `name` holds, for error messages.
pub(crate) fn expected_files(name: &str) -> String {
    let s = spec(name);
    format!("GLUE {} files train.tsv and {}", s.title, s.dev_file)
}

/// Train and dev from the official train file (90/10, stratified, fixed seed); test = the official
/// dev file, whose labels the official test file lacks.
pub(crate) fn load(name: &str, dir: &Path, bad: &mut BadLines) -> Result<Task> {
    let s = spec(name);
    let train_all = read_tsv(&s, &dir.join("train.tsv"), bad)?;
    let test = read_tsv(&s, &dir.join(s.dev_file), bad)?;
    Ok(split_train_dev(
        name,
        s.label_names.iter().map(|n| n.to_string()).collect(),
        s.metric,
        train_all,
        test,
    ))
}

fn read_tsv(s: &Spec, path: &Path, bad: &mut BadLines) -> Result<Vec<Example>> {
    let reader = read::open(
        path,
        &format!(
            "the GLUE {} folder holds train.tsv and {}",
            s.title, s.dev_file
        ),
    )?;
    let mut lines = read::lines(path, reader);
    let (columns, header_at): (Vec<String>, String) = match s.headerless {
        Some(columns) => (
            columns.iter().map(|c| c.to_string()).collect(),
            path.display().to_string(),
        ),
        None => {
            let Some((n, header)) = lines.next().transpose()? else {
                bail!(
                    "{}: empty file (expected GLUE {}'s header line and examples)",
                    path.display(),
                    s.title
                );
            };
            let Ok(header) = header else {
                bail!("{}: the header is {}", read::at(path, n), read::NOT_UTF8);
            };
            (
                header.split('\t').map(|c| c.trim().to_string()).collect(),
                read::at(path, n),
            )
        }
    };
    let find = |want: &str| -> Result<usize> {
        match columns.iter().position(|h| *h == want) {
            Some(i) => Ok(i),
            None => bail!(
                "{header_at}: the header has no '{want}' column (found: {}); is this GLUE's {} {}?",
                columns.join(", "),
                s.title,
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
        }
    };
    let fields = s
        .fields
        .iter()
        .map(|&(f, c)| Ok((f, find(c)?)))
        .collect::<Result<Vec<_>>>()?;
    let label = find(s.label)?;
    let mut out = Vec::new();
    for item in lines {
        let (n, line) = item?;
        let Ok(line) = line else {
            bad.bad(&read::at(path, n), read::NOT_UTF8)?;
            continue;
        };
        match parse_line(s, &line, &columns, &fields, label) {
            Ok(e) => out.push(e),
            Err(msg) => bad.bad(&read::at(path, n), &msg)?,
        }
    }
    Ok(out)
}

fn parse_line(
    s: &Spec,
    line: &str,
    columns: &[String],
    fields: &[(&str, usize)],
    label: usize,
) -> std::result::Result<Example, String> {
    let cells: Vec<&str> = line.split('\t').collect();
    let width = columns.len();
    if cells.len() < width {
        return Err(format!(
            "missing field '{}' ({} tab-separated fields, expected {width})",
            columns[cells.len()],
            cells.len()
        ));
    }
    if cells.len() > width {
        return Err(format!(
            "{} tab-separated fields, expected {width} (a tab inside a text?)",
            cells.len()
        ));
    }
    let mut parts = Vec::with_capacity(fields.len());
    for &(field, i) in fields {
        let value = cells[i].trim();
        if value.is_empty() {
            return Err(format!("empty field '{field}'"));
        }
        parts.push((field, value));
    }
    let label = read::label_id(cells[label].trim(), s.raw_labels)?;
    Ok(Example {
        text: read::render(&parts),
        label,
    })
}
