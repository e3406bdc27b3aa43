//! Tasks and data: loaders, text templates, splits, metrics.
//!
//! A [`Task`] is a list of label names, a main metric and three splits of [`Example`]s, each example one
//! line of text in the `field: value` form of the RetriKT paper's Appendix B (`sentence: …`,
//! `sentence1: … sentence2: …`, `question: … passage: …`, …) with a label id.
//!
//! Where the tasks come from ([`load_task`]):
//! - **Built-in** (`uci-sentiment`, `polarity`): the files `kdx fetch` installs under the weights folder
//!   (fetched on first use). They have no official splits: kdx splits them 70/15/15 train/dev/test,
//!   stratified by label, with the fixed seed [`SPLIT_SEED`], so the splits are the same on every machine
//!   and every run.
//! - **GLUE** (`cola`, `sst2`, `mrpc`, `rte`, `qnli`, `qqp`, `mnli`; `--data DIR` with the standard
//!   `train.tsv` and `dev.tsv`, `dev_matched.tsv` for MNLI) and **SuperGLUE** (`boolq`, `cb`, `copa`,
//!   `rte`, `wic`; `--data DIR` with `train.jsonl` and `val.jsonl`). The official test files have no
//!   labels, so the test split is the official dev (validation) file, and train and dev are the official
//!   train file split 90/10, stratified by label with the same fixed seed. `rte` reads whichever format
//!   the folder holds.
//! - **Custom** (`custom`): `--data FILE` (`.csv` with a header naming `text` and `label` columns, or
//!   `.jsonl` with `"text"` and `"label"` keys; labels are strings or integers), split 70/15/15 as the
//!   built-in tasks; or `--data DIR` with `train.csv` or `train.jsonl` and optional `dev` and `test`
//!   files (`.csv` or `.jsonl`): a missing one is split off train (15% of it each, stratified, fixed
//!   seed). The label names are the distinct labels of the training file, sorted (numerically when all
//!   are integers), at least 2 of them; a dev or test label outside them is a bad line. Texts are
//!   rendered as `sentence: {text}`.
//!
//! Bad input is never dropped silently: a line with a missing field, an unparsable line, a CSV quote
//! left open to the end of the file (which would otherwise swallow the rest of the file into one
//! field) or a label that is not one of the task's is an error naming the file and the 1-based line
//! (for JSON arrays, the 1-based entry); with [`LoadOptions::skip_bad_lines`] such lines are counted
//! in [`Task::skipped_lines`] instead, and one warning with the count goes to stderr. A file that
//! cannot be read to its end is always an error. Blank lines carry no example and are passed over.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Result};

use crate::model::params::Rng;

mod builtin;
mod custom;
mod glue;
pub mod metrics;
mod read;
mod superglue;

use metrics::Metric;

/// The seed of every split kdx makes. A constant of the crate, independent of the training seed: the
/// same data gives the same splits on every machine and in every run.
pub const SPLIT_SEED: u64 = 0x6b64_785f_7370_6c74; // "kdx_splt"

/// One example: its text, rendered with the task's template, and its label id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Example {
    pub text: String,
    pub label: u32,
}

#[derive(Clone, Debug)]
pub struct Task {
    pub name: String,
    /// Index = label id.
    pub label_names: Vec<String>,
    /// The task's main metric.
    pub metric: Metric,
    pub train: Vec<Example>,
    pub dev: Vec<Example>,
    pub test: Vec<Example>,
    /// Bad lines skipped under `skip_bad_lines` (0 otherwise).
    pub skipped_lines: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Dev,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Dev, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Split {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match Split::ALL.into_iter().find(|x| x.name() == s) {
            Some(x) => Ok(x),
            None => bail!("unknown split '{s}': expected train, dev or test"),
        }
    }
}

impl Task {
    pub fn split(&self, s: Split) -> &[Example] {
        match s {
            Split::Train => &self.train,
            Split::Dev => &self.dev,
            Split::Test => &self.test,
        }
    }

    pub fn num_labels(&self) -> usize {
        self.label_names.len()
    }
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// `--data`: the user's folder (GLUE, SuperGLUE, custom) or file (custom). For the built-in tasks, a
    /// folder holding the fetched files instead of `weights_dir/NAME`.
    pub data: Option<PathBuf>,
    /// Where `kdx fetch` installs the built-in data sets.
    pub weights_dir: PathBuf,
    /// Count and skip bad lines instead of failing on the first.
    pub skip_bad_lines: bool,
}

/// Every task name [`load_task`] accepts.
pub fn task_names() -> Vec<&'static str> {
    let mut names = vec![builtin::UCI_SENTIMENT, builtin::POLARITY];
    names.extend(glue::NAMES);
    names.extend(superglue::NAMES.iter().filter(|n| !glue::NAMES.contains(n)));
    names.push(custom::NAME);
    names
}

/// Loads task `name` with its splits (see the module documentation for where each task's data comes
/// from and how its splits are formed).
pub fn load_task(name: &str, opts: &LoadOptions) -> Result<Task> {
    let mut bad = read::BadLines::new(opts.skip_bad_lines);
    let task = match name {
        builtin::UCI_SENTIMENT | builtin::POLARITY => builtin::load(name, opts, &mut bad)?,
        custom::NAME => custom::load(opts, &mut bad)?,
        "rte" => {
            let dir = read::data_dir(
                name,
                opts,
                "GLUE (train.tsv, dev.tsv) or SuperGLUE (train.jsonl, val.jsonl) RTE files",
            )?;
            let glue = dir.join("train.tsv").exists();
            let superglue = dir.join("train.jsonl").exists();
            match (glue, superglue) {
                (true, false) => glue::load(name, &dir, &mut bad)?,
                (false, true) => superglue::load(name, &dir, &mut bad)?,
                (true, true) => bail!(
                    "{} holds both GLUE (train.tsv) and SuperGLUE (train.jsonl) RTE files: point --data at a folder with one of them",
                    dir.display()
                ),
                (false, false) => bail!(
                    "{} has neither train.tsv (GLUE RTE) nor train.jsonl (SuperGLUE RTE): point --data at the folder with the RTE files",
                    dir.display()
                ),
            }
        }
        _ if glue::NAMES.contains(&name) => {
            let dir = read::data_dir(name, opts, &glue::expected_files(name))?;
            glue::load(name, &dir, &mut bad)?
        }
        _ if superglue::NAMES.contains(&name) => {
            let dir = read::data_dir(name, opts, &superglue::expected_files(name))?;
            superglue::load(name, &dir, &mut bad)?
        }
        _ => bail!(
            "unknown task '{name}': expected one of {}",
            task_names().join(", ")
        ),
    };
    Ok(bad.finish(task))
}

/// Splits `examples` into `fractions.len()` parts, stratified by label: of the `n` examples of each
/// label, part `i > 0` gets `round(fractions[i]·n)` and part 0 the rest. The order is shuffled with
/// [`SPLIT_SEED`] before cutting and again within each part, so the result depends only on the input.
pub fn stratified_split(
    examples: Vec<Example>,
    fractions: &[f64],
    num_labels: usize,
) -> Vec<Vec<Example>> {
    let mut rng = Rng::new(SPLIT_SEED);
    let mut by_label: Vec<Vec<Example>> = vec![Vec::new(); num_labels];
    for e in examples {
        let l = e.label as usize;
        if l >= by_label.len() {
            by_label.resize(l + 1, Vec::new());
        }
        by_label[l].push(e);
    }
    let mut parts: Vec<Vec<Example>> = vec![Vec::new(); fractions.len()];
    for mut class in by_label {
        rng.shuffle(&mut class);
        let n = class.len();
        let mut rest = class.into_iter();
        let mut taken = 0;
        let mut counts: Vec<usize> = fractions
            .iter()
            .skip(1)
            .map(|f| {
                let k = ((f * n as f64).round() as usize).min(n - taken);
                taken += k;
                k
            })
            .collect();
        counts.insert(0, n - taken);
        for (part, k) in parts.iter_mut().zip(counts) {
            part.extend(rest.by_ref().take(k));
        }
    }
    for part in &mut parts {
        rng.shuffle(part);
    }
    parts
}

/// 70/15/15 train/dev/test.
const HELD_OUT_SPLIT: [f64; 3] = [0.70, 0.15, 0.15];
/// Official train file → 90/10 train/dev (GLUE, SuperGLUE).
const TRAIN_DEV_SPLIT: [f64; 2] = [0.90, 0.10];

/// A task from an official train file and an official dev (validation) file (GLUE, SuperGLUE): train
/// and dev are the train file split 90/10, stratified, and test is the dev file, as it is.
fn split_train_dev(
    name: &str,
    label_names: Vec<String>,
    metric: Metric,
    official_train: Vec<Example>,
    official_dev: Vec<Example>,
) -> Task {
    let mut parts = stratified_split(official_train, &TRAIN_DEV_SPLIT, label_names.len());
    parts.push(official_dev);
    task_from_parts(name, label_names, metric, parts)
}

/// A task from examples that still need all three splits.
fn split_three(
    name: &str,
    label_names: Vec<String>,
    metric: Metric,
    examples: Vec<Example>,
) -> Task {
    let parts = stratified_split(examples, &HELD_OUT_SPLIT, label_names.len());
    task_from_parts(name, label_names, metric, parts)
}

/// A task from its [train, dev, test] parts.
fn task_from_parts(
    name: &str,
    label_names: Vec<String>,
    metric: Metric,
    parts: Vec<Vec<Example>>,
) -> Task {
    let mut parts = parts.into_iter();
    let mut next = || parts.next().unwrap_or_default();
    let (train, dev, test) = (next(), next(), next());
    Task {
        name: name.to_string(),
        label_names,
        metric,
        train,
        dev,
        test,
        skipped_lines: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(per_label: &[usize]) -> Vec<Example> {
        per_label
            .iter()
            .enumerate()
            .flat_map(|(l, &n)| {
                (0..n).map(move |i| Example {
                    text: format!("{l}-{i}"),
                    label: l as u32,
                })
            })
            .collect()
    }

    #[test]
    fn stratified_split_counts_and_partition() {
        let all = examples(&[100, 41, 7]);
        let parts = stratified_split(all.clone(), &HELD_OUT_SPLIT, 3);
        let count = |p: &Vec<Example>, l: u32| p.iter().filter(|e| e.label == l).count();
        // label 0: 15, 15, 70; label 1: round(6.15) = 6 each, 29 train; label 2: round(1.05) = 1 each.
        assert_eq!(
            [
                count(&parts[0], 0),
                count(&parts[1], 0),
                count(&parts[2], 0)
            ],
            [70, 15, 15]
        );
        assert_eq!(
            [
                count(&parts[0], 1),
                count(&parts[1], 1),
                count(&parts[2], 1)
            ],
            [29, 6, 6]
        );
        assert_eq!(
            [
                count(&parts[0], 2),
                count(&parts[1], 2),
                count(&parts[2], 2)
            ],
            [5, 1, 1]
        );
        let mut got: Vec<Example> = parts.concat();
        let mut want = all.clone();
        got.sort_by(|a, b| a.text.cmp(&b.text));
        want.sort_by(|a, b| a.text.cmp(&b.text));
        assert_eq!(got, want);
        // Same input, same output; and the parts are mixed, not label-sorted.
        assert_eq!(stratified_split(all, &HELD_OUT_SPLIT, 3), parts);
        assert!(parts[0][..20].iter().any(|e| e.label != 0));
    }

    #[test]
    fn tiny_classes_never_overdraw() {
        let parts = stratified_split(examples(&[1, 2, 0]), &HELD_OUT_SPLIT, 3);
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 3);
        let parts = stratified_split(examples(&[5]), &TRAIN_DEV_SPLIT, 1);
        assert_eq!((parts[0].len(), parts[1].len()), (4, 1));
    }

    #[test]
    fn split_names_parse() {
        for s in Split::ALL {
            assert_eq!(s.name().parse::<Split>().unwrap(), s);
        }
        assert!("validation".parse::<Split>().is_err());
    }

    #[test]
    fn every_task_name_is_known_to_the_loader() {
        let names = task_names();
        assert_eq!(names.len(), 14, "{names:?}");
        let opts = LoadOptions {
            data: Some(PathBuf::from("/nonexistent/kdx-data")),
            weights_dir: PathBuf::from("/nonexistent/kdx-weights"),
            skip_bad_lines: false,
        };
        for name in names {
            if name == builtin::UCI_SENTIMENT || name == builtin::POLARITY {
                continue; // would fetch
            }
            let err = load_task(name, &opts).unwrap_err().to_string();
            assert!(!err.contains("unknown task"), "{name}: {err}");
            assert!(err.contains("/nonexistent/kdx-data"), "{name}: {err}");
        }
        let err = load_task("sst-5", &opts).unwrap_err().to_string();
        assert!(
            err.contains("unknown task 'sst-5'") && err.contains("cola"),
            "{err}"
        );
    }
}
