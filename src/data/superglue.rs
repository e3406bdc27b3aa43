//! SuperGLUE tasks from the standard JSONL files (one JSON object per line).

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use super::metrics::Metric;
use super::read::{self, BadLines};
use super::{split_train_dev, Example, Task};

pub(crate) const NAMES: [&str; 5] = ["boolq", "cb", "copa", "rte", "wic"];

struct Spec {
    title: &'static str,
    /// Label values as JSON writes them (strings unquoted); index = label id.
    raw_labels: &'static [&'static str],
    label_names: &'static [&'static str],
    metric: Metric,
}

fn spec(name: &str) -> Spec {
    const BOOL: [&str; 2] = ["false", "true"];
    const BOOL_NAMES: [&str; 2] = ["False", "True"];
    match name {
        "boolq" => Spec {
            title: "BoolQ",
            raw_labels: &BOOL,
            label_names: &BOOL_NAMES,
            metric: Metric::Accuracy,
        },
        "cb" => Spec {
            title: "CB",
            raw_labels: &["entailment", "contradiction", "neutral"],
            label_names: &["entailment", "contradiction", "neutral"],
            metric: Metric::MacroF1,
        },
        "copa" => Spec {
            title: "COPA",
            raw_labels: &["0", "1"],
            label_names: &["choice1", "choice2"],
            metric: Metric::Accuracy,
        },
        "rte" => Spec {
            title: "RTE",
            raw_labels: &["entailment", "not_entailment"],
            label_names: &["entailment", "not_entailment"],
            metric: Metric::Accuracy,
        },
        "wic" => Spec {
            title: "WiC",
            raw_labels: &BOOL,
            label_names: &BOOL_NAMES,
            metric: Metric::Accuracy,
        },
        _ => unreachable!("not a SuperGLUE task: {name}"),
    }
}

/// What the `--data` folder of SuperGLUE task `name` holds, for error messages.
pub(crate) fn expected_files(name: &str) -> String {
    format!(
        "SuperGLUE {} files train.jsonl and val.jsonl",
        spec(name).title
    )
}

/// Train and dev from the official train file (90/10, stratified, fixed seed); test = the official
/// validation file, whose labels the official test file lacks.
pub(crate) fn load(name: &str, dir: &Path, bad: &mut BadLines) -> Result<Task> {
    let s = spec(name);
    let train_all = read_jsonl(name, &s, &dir.join("train.jsonl"), bad)?;
    let test = read_jsonl(name, &s, &dir.join("val.jsonl"), bad)?;
    Ok(split_train_dev(
        name,
        s.label_names.iter().map(|n| n.to_string()).collect(),
        s.metric,
        train_all,
        test,
    ))
}

fn read_jsonl(name: &str, s: &Spec, path: &Path, bad: &mut BadLines) -> Result<Vec<Example>> {
    let expected = format!(
        "the SuperGLUE {} folder holds train.jsonl and val.jsonl",
        s.title
    );
    read::jsonl(path, &expected, bad, |_, obj| parse(name, s, obj))
}

fn parse(name: &str, s: &Spec, obj: &Value) -> std::result::Result<Example, String> {
    let text = |key: &str| read::json_text(obj, key);
    let text = match name {
        "boolq" => read::render(&[
            ("question", text("question")?),
            ("passage", text("passage")?),
        ]),
        "cb" => read::render(&[
            ("hypothesis", text("hypothesis")?),
            ("premise", text("premise")?),
        ]),
        "copa" => read::render(&[
            ("premise", text("premise")?),
            ("choice1", text("choice1")?),
            ("choice2", text("choice2")?),
            ("question", text("question")?),
        ]),
        "rte" => read::render(&[
            ("sentence1", text("premise")?),
            ("sentence2", text("hypothesis")?),
        ]),
        "wic" => {
            let s1 = marked(obj, "sentence1", "start1", "end1")?;
            let s2 = marked(obj, "sentence2", "start2", "end2")?;
            read::render(&[
                ("sentence1", &s1),
                ("sentence2", &s2),
                ("word", text("word")?),
            ])
        }
        _ => unreachable!("not a SuperGLUE task: {name}"),
    };
    let raw = match obj.get("label") {
        None => return Err("missing field 'label'".into()),
        Some(v) => read::json_label(v)?,
    };
    let label = read::label_id(&raw, s.raw_labels)?;
    Ok(Example { text, label })
}

/// WiC's sentence with the target word's span (character offsets `start..end`) in asterisks, as the
/// paper's Appendix B writes it: `It was the *deliberation* of his act …`.
fn marked(
    obj: &Value,
    sentence: &str,
    start: &str,
    end: &str,
) -> std::result::Result<String, String> {
    let Some(Value::String(text)) = obj.get(sentence) else {
        return Err(format!("missing field '{sentence}' (a string)"));
    };
    let offset = |key: &str| match obj.get(key) {
        Some(v) => v
            .as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| format!("field '{key}' is not a character offset: {v}")),
        None => Err(format!("missing field '{key}'")),
    };
    let (a, b) = (offset(start)?, offset(end)?);
    let chars = text.chars().count();
    if a >= b || b > chars {
        return Err(format!(
            "{start}..{end} = {a}..{b} is not a word of {sentence} ({chars} characters)"
        ));
    }
    let byte = |c: usize| text.char_indices().nth(c).map_or(text.len(), |(i, _)| i);
    let (a, b) = (byte(a), byte(b));
    Ok(format!("{}*{}*{}", &text[..a], &text[a..b], &text[b..]))
}
