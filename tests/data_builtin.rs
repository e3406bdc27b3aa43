//! The built-in tasks on the real data sets, installed by the same fetch `kdx fetch` runs:
//! sizes, stratified and disjoint splits, and golden fingerprints that pin the exact splits (their
//! contents and order) across machines and releases.

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

/// FNV-1a (64-bit) over the split's `text\tlabel\n` lines, in order.
fn fingerprint(split: &[Example]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for e in split {
        for b in format!("{}\t{}\n", e.text, e.label).bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A split's golden values: its fingerprint and its first three (text, label).
type Golden = (Split, u64, [(&'static str, u32); 3]);

/// The splits are exactly the ones kdx has always made: `golden` holds, per split, the fingerprint
/// and the first three examples. A change here changes every result reported on the task.
fn check_golden(task: &Task, golden: [Golden; 3]) {
    for (split, hash, first) in golden {
        let got = task.split(split);
        let want: Vec<Example> = first
            .iter()
            .map(|&(text, label)| Example {
                text: text.to_string(),
                label,
            })
            .collect();
        assert_eq!(got[..3], want[..], "{} {split}: first examples", task.name);
        assert_eq!(
            fingerprint(got),
            hash,
            "{} {split}: the split's contents or order changed",
            task.name
        );
    }
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
}

#[test]
fn uci_sentiment_splits_are_golden() {
    let task = load_task("uci-sentiment", &options()).unwrap();
    check_golden(
        &task,
        [
            (
                Split::Train,
                0xd068_6ec3_c4b6_62be,
                [
                    ("sentence: I have been very happy with the 510 and have had NO complaints from any one regarding my sound quality on their end.", 1),
                    ("sentence: 2 Thumbs Up!!", 1),
                    ("sentence: Our server was fantastic and when he found out the wife loves roasted garlic and bone marrow, he added extra to our meal and another marrow to go!", 1),
                ],
            ),
            (
                Split::Dev,
                0x2b59_8da2_6e58_b295,
                [
                    ("sentence: * Comes with a strong light that you can use to light up your camera shots, and even flash SOS signals (seriously!", 1),
                    ("sentence: The service was terrible, food was mediocre.", 0),
                    ("sentence: And the accents are absolutely abysmal!", 0),
                ],
            ),
            (
                Split::Test,
                0x24f1_4892_ee5d_6e67,
                [
                    ("sentence: Disapointing Results.", 0),
                    ("sentence: The chicken wings contained the driest chicken meat I have ever eaten.", 0),
                    ("sentence: I highly recommend this case.", 1),
                ],
            ),
        ],
    );
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
}

#[test]
fn polarity_splits_are_golden() {
    let task = load_task("polarity", &options()).unwrap();
    check_golden(
        &task,
        [
            (
                Split::Train,
                0x5d09_5cdd_fa2e_c7b7,
                [
                    ("sentence: an excellent romp that boasts both a heart and a mind .", 1),
                    ("sentence: as an introduction to the man's theories and influence , derrida is all but useless ; as a portrait of the artist as an endlessly inquisitive old man , however , it's invaluable .", 1),
                    ("sentence: bennett's dramatization of her personal descent into post-breakup perdition has a morbid appeal that's tough to shake .", 1),
                ],
            ),
            (
                Split::Dev,
                0xfa6a_14ff_f8bd_1119,
                [
                    ("sentence: too smart to ignore but a little too smugly superior to like , this could be a movie that ends up slapping its target audience in the face by shooting itself in the foot .", 0),
                    ("sentence: this action-thriller/dark comedy is one of the most repellent things to pop up in a cinematic year already littered with celluloid garbage .", 0),
                    ("sentence: the film delivers what it promises : a look at the \" wild ride \" that ensues when brash young men set out to conquer the online world with laptops , cell phones and sketchy business plans .", 1),
                ],
            ),
            (
                Split::Test,
                0x1d17_6be8_2c3a_6a64,
                [
                    ("sentence: the story may not be new , but australian director john polson , making his american feature debut , jazzes it up adroitly .", 1),
                    ("sentence: the entire movie is about a boring , sad man being boring and sad .", 0),
                    ("sentence: a teasing drama whose relentless good-deed/bad-deed reversals are just interesting enough to make a sinner like me pray for an even more interesting , less symmetrical , less obviously cross-shaped creation .", 1),
                ],
            ),
        ],
    );
}
