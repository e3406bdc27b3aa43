//! The built-in tasks on the real data sets, installed by the same fetch `kdx fetch` runs:
//! sizes, stratified and disjoint splits, and splits that are the same on every load.

use std::path::PathBuf;

use kdx::data::{load_task, Example, LoadOptions, Split, Task};

fn options() -> LoadOptions {
    LoadOptions {
        data: None,
        weights_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights"),
        skip_bad_lines: false,
    }
}

fn sorted(mut v: Vec<Example>) -> Vec<Example> {
    v.sort_by(|a, b| (a.label, &a.text).cmp(&(b.label, &b.text)));
    v
}

/// Every split holds `round(fraction · n)` of each label's `n` examples, give or take one, and the
/// three splits together are exactly `all`.
fn check_splits(task: &Task, all: Vec<Example>, per_label: usize) {
    assert_eq!(task.num_labels(), 2);
    assert_eq!(task.label_names, ["negative", "positive"]);
    assert_eq!(task.skipped_lines, 0);
    for (split, fraction) in [
        (Split::Train, 0.70),
        (Split::Dev, 0.15),
        (Split::Test, 0.15),
    ] {
        let want = (fraction * per_label as f64).round() as i64;
        for label in 0..2 {
            let got = task
                .split(split)
                .iter()
                .filter(|e| e.label == label)
                .count() as i64;
            assert!(
                (got - want).abs() <= 1,
                "{} {split}: {got} examples of label {label}, stratified gives {want}",
                task.name
            );
        }
        // Shuffled within the split, not sorted by label.
        let first: Vec<u32> = task.split(split)[..40].iter().map(|e| e.label).collect();
        assert!(
            first.contains(&0) && first.contains(&1),
            "{split}: {first:?}"
        );
    }
    let union = [task.train.clone(), task.dev.clone(), task.test.clone()].concat();
    assert_eq!(union.len(), 2 * per_label);
    assert!(
        sorted(union) == sorted(all),
        "{}: the splits are not a partition of the data",
        task.name
    );
}

#[test]
fn uci_sentiment_is_3000_sentences_in_fixed_stratified_splits() {
    let task = load_task("uci-sentiment", &options()).unwrap();
    assert_eq!(task.metric.name(), "accuracy");
    // The raw files, read independently of the loader.
    let dir = options().weights_dir.join("uci-sentiment");
    let mut all = Vec::new();
    for file in ["amazon.json", "imdb.json", "yelp.json"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let entries: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(entries.len(), 1001, "{file}");
        for e in entries {
            let text = e["text"].as_str().unwrap();
            if text.is_empty() {
                assert!(e["class"].is_null());
                continue;
            }
            all.push(Example {
                text: format!("sentence: {}", text.trim()),
                label: e["class"].as_u64().unwrap() as u32,
            });
        }
    }
    assert_eq!(all.len(), 3000);
    check_splits(&task, all, 1500);
    assert_eq!(
        (task.train.len(), task.dev.len(), task.test.len()),
        (2100, 450, 450)
    );

    let again = load_task("uci-sentiment", &options()).unwrap();
    assert!(again.train == task.train && again.dev == task.dev && again.test == task.test);
}

#[test]
fn polarity_is_4000_sentences_in_fixed_stratified_splits() {
    let task = load_task("polarity", &options()).unwrap();
    let path = options()
        .weights_dir
        .join("polarity/polarity-en-pang&lee2.csv");
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(path)
        .unwrap();
    let all: Vec<Example> = reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            Example {
                text: format!("sentence: {}", r[1].trim()),
                label: match r[0].trim_start_matches('\u{feff}') {
                    "-1" => 0,
                    "1" => 1,
                    other => panic!("label {other}"),
                },
            }
        })
        .collect();
    assert_eq!(all.len(), 4000);
    check_splits(&task, all, 2000);
    assert_eq!(
        (task.train.len(), task.dev.len(), task.test.len()),
        (2800, 600, 600)
    );
    // The 4000 sentences are distinct, so the splits share no text.
    let train: std::collections::HashSet<&str> =
        task.train.iter().map(|e| e.text.as_str()).collect();
    assert!(task.test.iter().all(|e| !train.contains(e.text.as_str())));
    assert!(task.dev.iter().all(|e| !train.contains(e.text.as_str())));
    assert!(task.train[0].text.starts_with("sentence: ") && !task.train[0].text.ends_with(' '));

    let again = load_task("polarity", &options()).unwrap();
    assert!(again.train == task.train && again.dev == task.dev && again.test == task.test);
}
