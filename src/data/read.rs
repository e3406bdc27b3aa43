//! What every loader shares: reading files with clear errors, bad-line accounting, label look-up.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{LoadOptions, Task};

/// Bad lines: an error at the first one, or (with `--skip-bad-lines`) a count and a warning at the end.
pub(crate) struct BadLines {
    skip: bool,
    count: usize,
    first: Option<String>,
}

impl BadLines {
    pub(crate) fn new(skip: bool) -> BadLines {
        BadLines {
            skip,
            count: 0,
            first: None,
        }
    }

    /// `at` is `FILE:LINE` or `FILE: entry N`.
    pub(crate) fn bad(&mut self, at: &str, what: &str) -> Result<()> {
        let message = format!("{at}: {what}");
        if !self.skip {
            bail!(
                "{message} (fix the line, or pass --skip-bad-lines to count and skip such lines)"
            );
        }
        self.count += 1;
        self.first.get_or_insert(message);
        Ok(())
    }

    pub(crate) fn finish(self, mut task: Task) -> Task {
        task.skipped_lines = self.count;
        if let Some(first) = self.first {
            eprintln!(
                "warning: {}: skipped {} bad line{} (the first: {first})",
                task.name,
                self.count,
                if self.count == 1 { "" } else { "s" }
            );
        }
        task
    }
}

/// The folder `--data` names for a task that needs one.
pub(crate) fn data_dir(task: &str, opts: &LoadOptions, expected: &str) -> Result<PathBuf> {
    let Some(dir) = &opts.data else {
        bail!("task {task} reads the user's data files: pass --data DIR, the folder with the {expected}");
    };
    if !dir.is_dir() {
        bail!(
            "--data {}: no such folder (task {task} expects a folder with the {expected})",
            dir.display()
        );
    }
    Ok(dir.clone())
}

/// A file opened for reading past a UTF-8 byte-order mark; `expected` says what should be there.
pub(crate) fn open(path: &Path, expected: &str) -> Result<BufReader<File>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{}: no such file ({expected})", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let start = reader
        .fill_buf()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if start.starts_with(b"\xEF\xBB\xBF") {
        reader.consume(3);
    }
    Ok(reader)
}

/// The non-blank lines of a file, read as they come (GLUE files run to hundreds of megabytes):
/// (1-based line number, the line without its ending, or `Err(())` where it is not UTF-8).
pub(crate) fn lines<'a>(
    path: &'a Path,
    mut reader: impl BufRead + 'a,
) -> impl Iterator<Item = Result<(usize, std::result::Result<String, ()>)>> + 'a {
    let mut n = 0;
    let mut buf = Vec::new();
    std::iter::from_fn(move || loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => {
                return Some(Err(e).with_context(|| format!("cannot read {}", at(path, n + 1))))
            }
        }
        n += 1;
        let raw = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        match std::str::from_utf8(raw) {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => return Some(Ok((n, Ok(line.to_string())))),
            Err(_) => return Some(Ok((n, Err(())))),
        }
    })
}

/// The message for a line that is not UTF-8.
pub(crate) const NOT_UTF8: &str = "not valid UTF-8 text";

/// `FILE:LINE`.
pub(crate) fn at(path: &Path, line: usize) -> String {
    format!("{}:{line}", path.display())
}

/// The label id of `raw` among `accepted` (the values as they appear in the file), or the message of
/// an unknown-label error.
pub(crate) fn label_id(raw: &str, accepted: &[&str]) -> std::result::Result<u32, String> {
    accepted
        .iter()
        .position(|a| *a == raw)
        .map(|i| i as u32)
        .ok_or_else(|| format!("unknown label '{raw}' (expected {})", accepted.join(", ")))
}

/// A JSON scalar as the text a label is matched on: strings as they are, numbers and booleans as JSON
/// writes them.
pub(crate) fn json_label(v: &Value) -> std::result::Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Err("the label is null".into()),
        other => Err(format!("the label is not a string or a number: {other}")),
    }
}

/// A string field of a JSON object, trimmed; missing, non-string and empty fields are errors.
pub(crate) fn json_text<'v>(obj: &'v Value, key: &str) -> std::result::Result<&'v str, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(format!("missing field '{key}'")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("empty field '{key}'")),
        Some(Value::String(s)) => Ok(s.trim()),
        Some(other) => Err(format!("field '{key}' is not a string: {other}")),
    }
}

/// A line of a JSONL file as an object.
pub(crate) fn json_object(line: &str) -> std::result::Result<Value, String> {
    match serde_json::from_str::<Value>(line) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not valid JSON ({e})")),
    }
}

/// One line of task text from `field: value` pairs (the RetriKT paper's Appendix B form), e.g.
/// `sentence1: … sentence2: …`. Values are trimmed, and line breaks inside a value become spaces.
pub(crate) fn render(parts: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (field, value) in parts {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(field);
        out.push_str(": ");
        push_one_line(&mut out, value.trim());
    }
    out
}

fn push_one_line(out: &mut String, value: &str) {
    if !value.contains(['\n', '\r']) {
        out.push_str(value);
        return;
    }
    let pieces = value
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|p| !p.is_empty());
    for (i, piece) in pieces.enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(piece);
    }
}
