//! The task loaders on small fixtures written in the standard formats (GLUE TSV, SuperGLUE JSONL, a
//! user's CSV/JSONL): rendered texts, label ids, split sizes, and what bad lines do.

use std::path::{Path, PathBuf};

use kdx::data::metrics::Metric;
use kdx::data::{load_task, Example, LoadOptions, Split, Task};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(rel)
}

fn options(data: &Path, skip_bad_lines: bool) -> LoadOptions {
    LoadOptions {
        data: Some(data.to_path_buf()),
        // Never used by these tasks: a fetch would fail loudly here.
        weights_dir: PathBuf::from("/nonexistent/kdx-weights"),
        skip_bad_lines,
    }
}

fn load(name: &str, rel: &str) -> Task {
    load_task(name, &options(&fixture(rel), false))
        .unwrap_or_else(|e| panic!("{name} on {rel}: {e:#}"))
}

fn load_err(name: &str, data: &Path) -> String {
    match load_task(name, &options(data, false)) {
        Ok(_) => panic!("{name} on {} loaded", data.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn ex(text: &str, label: u32) -> Example {
    Example {
        text: text.to_string(),
        label,
    }
}

fn sizes(t: &Task) -> (usize, usize, usize) {
    (t.train.len(), t.dev.len(), t.test.len())
}

/// Train and dev (shuffled) hold `e` somewhere.
fn has(t: &Task, e: Example) {
    assert!(
        t.train.contains(&e) || t.dev.contains(&e),
        "{}: no {e:?} in train or dev",
        t.name
    );
}

/// The rendered text is one line of `field: value` pairs, trimmed.
fn well_formed(t: &Task) {
    for s in Split::ALL {
        for e in t.split(s) {
            assert!(
                !e.text.contains(['\n', '\r', '\t']) && e.text.trim() == e.text,
                "{}: {:?}",
                t.name,
                e.text
            );
            assert!((e.label as usize) < t.num_labels());
        }
    }
    assert_eq!(t.skipped_lines, 0);
}

// ---- GLUE -------------------------------------------------------------------------------------

#[test]
fn cola() {
    let t = load("cola", "glue/CoLA");
    well_formed(&t);
    assert_eq!(t.label_names, ["unacceptable", "acceptable"]);
    assert_eq!(t.metric, Metric::Mcc);
    // Official train (5 + 5) split 90/10 per label; official dev = test, in file order.
    assert_eq!(sizes(&t), (8, 2, 3));
    assert_eq!(
        t.test[0],
        ex(
            "sentence: The sailors rode the breeze clear of the rocks.",
            1
        )
    );
    assert_eq!(
        t.test[1],
        ex(
            "sentence: The sailors rode the breeze clear from rocks the.",
            0
        )
    );
    has(&t, ex("sentence: They drank the pub.", 0));
    has(
        &t,
        ex(
            "sentence: Our friends won't buy this analysis, let alone the next one we propose.",
            1,
        ),
    );
    assert_eq!(t.dev.iter().filter(|e| e.label == 0).count(), 1);
}

#[test]
fn sst2_trims_the_trailing_space() {
    let t = load("sst2", "glue/SST-2");
    well_formed(&t);
    assert_eq!(t.label_names, ["negative", "positive"]);
    assert_eq!(t.metric, Metric::Accuracy);
    assert_eq!(sizes(&t), (8, 2, 2));
    has(
        &t,
        ex("sentence: hide new secretions from the parental units", 0),
    );
    assert_eq!(
        t.test[0],
        ex(
            "sentence: it 's a charming and often affecting journey .",
            1
        )
    );
}

#[test]
fn mrpc_with_a_byte_order_mark_and_literal_quotes() {
    let t = load("mrpc", "glue/MRPC");
    well_formed(&t);
    assert_eq!(t.label_names, ["not_equivalent", "equivalent"]);
    assert_eq!(t.metric, Metric::F1);
    assert_eq!(sizes(&t), (8, 2, 2));
    assert_eq!(t.test[1], ex("sentence1: Magnarelli said Racicot hated the Iraqi regime and looked forward to using his long years of training in the war . sentence2: His wife said he was \" 100 percent behind George Bush \" and looked forward to using his years of training in the war .", 0));
    // An unbalanced quote at the start of a field is text, not CSV quoting.
    has(&t, ex("sentence1: \"The foods that are good for the heart are also good for the brain , he said . sentence2: The Nasdaq had a weekly gain of 17.27 , or 1.2 percent , closing at 1,520.15 on Friday .", 1));
}

#[test]
fn glue_rte() {
    let t = load("rte", "glue/RTE");
    well_formed(&t);
    assert_eq!(t.label_names, ["entailment", "not_entailment"]);
    assert_eq!(sizes(&t), (8, 2, 2));
    // The paper's Appendix B.5 example.
    assert_eq!(t.test[0], ex("sentence1: A smaller proportion of Yugoslavia's Italians were settled in Slovenia (at the 1991 national census, some 3000 inhabitants of Slovenia declared themselves as ethnic Italians). sentence2: Slovenia has 3,000 inhabitants.", 0));
    assert_eq!(
        t.test[1],
        ex(
            "sentence1: The name \"Dark Side\" was chosen by the band. sentence2: The band chose the name.",
            1
        )
    );
    has(&t, ex("sentence1: Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44. sentence2: Christopher Reeve had an accident.", 1));
}

#[test]
fn qnli_with_crlf_line_endings() {
    let t = load("qnli", "glue/QNLI");
    well_formed(&t);
    assert_eq!(t.label_names, ["entailment", "not_entailment"]);
    assert_eq!(sizes(&t), (8, 2, 2));
    assert_eq!(t.test[0], ex("question: What came into force after the new constitution was herald? sentence: As of that day, the new constitution heralding the Second Republic came into force.", 0));
    assert_eq!(t.test[1].label, 1);
}

#[test]
fn qqp() {
    let t = load("qqp", "glue/QQP");
    well_formed(&t);
    assert_eq!(t.label_names, ["not_duplicate", "duplicate"]);
    assert_eq!(t.metric, Metric::F1);
    assert_eq!(sizes(&t), (8, 2, 2));
    has(
        &t,
        ex(
            "question1: How do I control my horny emotions? question2: How do you control your horniness?",
            1,
        ),
    );
    assert_eq!(
        t.test[0],
        ex(
            "question1: Why are African-Americans so beautiful? question2: Why are hispanics so beautiful?",
            0
        )
    );
}

#[test]
fn mnli_finds_its_columns_by_name_and_tests_on_dev_matched() {
    let t = load("mnli", "glue/MNLI");
    well_formed(&t);
    assert_eq!(t.label_names, ["entailment", "neutral", "contradiction"]);
    assert_eq!(t.metric, Metric::Accuracy);
    assert_eq!(sizes(&t), (12, 3, 3));
    assert_eq!(t.test[1], ex("hypothesis: The Government Executive articles housed on the website are not able to be searched. premise: This site includes a list of all award winners and a searchable database of Government Executive articles.", 2));
    assert_eq!(
        t.test[0],
        ex(
            "hypothesis: Everyone really likes the newest benefits premise: The new rights are nice enough",
            1
        )
    );
    has(
        &t,
        ex("hypothesis: Heterosexuals. premise: Gays and lesbians.", 2),
    );
    for label in 0..3 {
        assert_eq!(t.dev.iter().filter(|e| e.label == label).count(), 1);
    }
}

// ---- SuperGLUE ---------------------------------------------------------------------------------

#[test]
fn boolq() {
    let t = load("boolq", "superglue/BoolQ");
    well_formed(&t);
    assert_eq!(t.label_names, ["False", "True"]);
    assert_eq!(sizes(&t), (8, 2, 1));
    assert_eq!(t.test[0], ex("question: can you have a skunk as a pet in canada passage: Skunks as pets -- Canadian pet skunks must be purchased from a USDA-certified breeder in the United States. It is illegal to keep striped skunks as pets in Canada.", 1));
    has(&t, ex("question: is elder scrolls online the same as skyrim passage: As with other games in The Elder Scrolls series, the game is set on the continent of Tamriel. The events of the game occur a millennium before those of The Elder Scrolls V: Skyrim.", 0));
}

#[test]
fn cb() {
    let t = load("cb", "superglue/CB");
    well_formed(&t);
    assert_eq!(t.label_names, ["entailment", "contradiction", "neutral"]);
    assert_eq!(t.metric, Metric::MacroF1);
    assert_eq!(sizes(&t), (12, 3, 2));
    // The paper's Appendix B.2 example.
    assert_eq!(t.test[0], ex("hypothesis: Valence was helping premise: Valence the void-brain, Valence the virtuous valet. Why couldn’t the figger choose his own portion of titanic anatomy to shaft? Did he think he was helping?", 1));
    assert_eq!(t.test[1].label, 0);
    has(
        &t,
        ex(
            "hypothesis: Jasper loved her premise: Did she realise that Jasper loved her? She would never know.",
            2,
        ),
    );
}

#[test]
fn copa() {
    let t = load("copa", "superglue/COPA");
    well_formed(&t);
    assert_eq!(t.label_names, ["choice1", "choice2"]);
    // 6 of label 0, 4 of label 1: round(0.6) = 1 and round(0.4) = 0 to dev.
    assert_eq!(sizes(&t), (9, 1, 1));
    // The paper's Appendix B.4 example.
    assert_eq!(t.test[0], ex("premise: Political violence broke out in the nation. choice1: Many citizens relocated to the capitol. choice2: Many citizens took refuge in other territories. question: effect", 1));
    has(&t, ex("premise: My body cast a shadow over the grass. choice1: The sun was rising. choice2: The grass was cut. question: cause", 0));
}

#[test]
fn superglue_rte() {
    let t = load("rte", "superglue/RTE");
    well_formed(&t);
    assert_eq!(t.label_names, ["entailment", "not_entailment"]);
    assert_eq!(sizes(&t), (8, 2, 1));
    assert_eq!(t.test[0], ex("sentence1: A smaller proportion of Yugoslavia’s Italians were settled in Slovenia (at the 1991 national census, some 3000 inhabitants of Slovenia declared themselves as ethnic Italians). sentence2: Slovenia has 3,000 inhabitants.", 1));
}

#[test]
fn wic_marks_the_word_by_character_offsets() {
    let t = load("wic", "superglue/WiC");
    well_formed(&t);
    assert_eq!(t.label_names, ["False", "True"]);
    assert_eq!(sizes(&t), (8, 2, 1));
    // The paper's Appendix B.6 example.
    assert_eq!(t.test[0], ex("sentence1: It was the *deliberation* of his act that was insulting. sentence2: The *deliberations* of the jury. word: deliberation", 1));
    has(&t, ex("sentence1: Do you want to come over to my *place* later? sentence2: A political system with no *place* for the less prominent groups. word: place", 0));
    // Offsets count characters, not bytes: 'é' and '’' come before the word.
    has(
        &t,
        ex(
            "sentence1: The café’s *break* room was tiny. sentence2: He took a *break* from work. word: break",
            1,
        ),
    );
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

/// The 90/10 split of an official train file is pinned across machines and releases: the same
/// folder gives exactly these splits, in this order.
#[test]
fn the_glue_train_dev_split_is_golden() {
    let t = load("mnli", "glue/MNLI");
    assert_eq!(
        t.train[..3],
        [
            ex("hypothesis: Slate had an opinion on Jackson's findings. premise: (Read  for Slate 's take on Jackson's findings.)", 0),
            ex("hypothesis: The tourist information office is at the end of Rue des Francs-Bourgeois. premise: At the end of Rue des Francs-Bourgeois is what many consider to be the city's most handsome residential square.", 1),
            ex("hypothesis: Everyone really likes the newest benefits premise: The new rights are nice enough", 2),
        ]
    );
    assert_eq!(
        t.dev,
        [
            ex("hypothesis: All of the questions were interesting according to a focus group consulted on the subject. premise: It's not that the questions they asked weren't interesting or legitimate.", 2),
            ex("hypothesis: You lose the things to the following level if the people recall. premise: you know during the season and i guess at at your level uh you lose them to the next level if if they decide to recall the the parent team the Braves decide to call to recall a guy from triple A then a double A guy goes up to replace him and a single A guy goes up to replace him", 0),
            ex("hypothesis: The 12th Dynasty was when Thebes lost power. premise: Thebes held onto power until the 12th Dynasty.", 1),
        ]
    );
    assert_eq!(fingerprint(&t.train), 0xe05a_35bc_af70_8767);
    assert_eq!(fingerprint(&t.dev), 0x69ef_bfc0_c943_9ed8);
    assert_eq!(fingerprint(&t.test), 0x3f4b_3267_dfa1_9ad8);
}

// ---- custom -----------------------------------------------------------------------------------

#[test]
fn custom_csv_with_quotes_commas_and_newlines() {
    let t = load("custom", "custom/reviews.csv");
    well_formed(&t);
    assert_eq!(t.name, "custom");
    assert_eq!(t.label_names, ["neg", "pos"]);
    // 10 per label: 70/15/15 → 6/2/2 each.
    assert_eq!(sizes(&t), (12, 4, 4));
    let all = [t.train.clone(), t.dev.clone(), t.test.clone()].concat();
    for e in [
        ex("sentence: The screen is \"stunning\", honestly.", 1),
        ex("sentence: Setup took five minutes and it just worked.", 1),
        ex("sentence: They call it \"waterproof\"; it is not.", 0),
        ex("sentence: Great battery life, lasts two days.", 1),
    ] {
        assert!(all.contains(&e), "{e:?}");
    }
    for s in Split::ALL {
        assert_eq!(
            t.split(s).iter().filter(|e| e.label == 0).count() * 2,
            t.split(s).len()
        );
    }
}

#[test]
fn custom_jsonl_integer_labels_sort_numerically() {
    let t = load("custom", "custom/ratings.jsonl");
    well_formed(&t);
    assert_eq!(t.label_names, ["1", "2", "10"]);
    assert_eq!(sizes(&t), (9, 3, 3));
    let all = [t.train.clone(), t.dev.clone(), t.test.clone()].concat();
    assert!(all.contains(&ex("sentence: A perfect ten.", 2)));
    assert!(all.contains(&ex("sentence: Terrible, avoid.", 0)));
}

#[test]
fn custom_folder_splits_the_missing_dev_off_train() {
    let t = load("custom", "custom/split");
    well_formed(&t);
    assert_eq!(t.label_names, ["ham", "spam"]);
    // train.jsonl: 10 + 10, 15% of each label to dev; test.csv as given, in order.
    assert_eq!(sizes(&t), (16, 4, 2));
    assert_eq!(
        t.test,
        [
            ex("sentence: You are a winner, reply YES", 1),
            ex("sentence: Lunch tomorrow?", 0)
        ]
    );
}

// ---- bad input --------------------------------------------------------------------------------

#[test]
fn an_unknown_label_names_file_and_line() {
    let dir = fixture("bad/RTE");
    let err = load_err("rte", &dir);
    let want = format!(
        "{}:4: unknown label 'maybe' (expected entailment, not_entailment)",
        dir.join("train.tsv").display()
    );
    assert!(err.contains(&want), "{err}\nwant: {want}");
    assert!(err.contains("--skip-bad-lines"), "{err}");

    let t = load_task("rte", &options(&dir, true)).unwrap();
    // Line 4 (unknown label) and line 6 (a missing field) are skipped, the other 4 kept.
    assert_eq!(t.skipped_lines, 2);
    assert_eq!(t.train.len() + t.dev.len(), 4);
    assert_eq!(
        t.test,
        [ex("sentence1: He left early. sentence2: He left.", 0)]
    );
}

#[test]
fn a_missing_tsv_field_names_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("train.tsv"),
        "sentence\tlabel\ngood film\t1\nno label here\nbad film\t0\n",
    )
    .unwrap();
    std::fs::write(tmp.path().join("dev.tsv"), "sentence\tlabel\nfine\t1\n").unwrap();
    let err = load_err("sst2", tmp.path());
    let want = format!(
        "{}:3: missing field 'label'",
        tmp.path().join("train.tsv").display()
    );
    assert!(err.contains(&want), "{err}\nwant: {want}");

    // A tab inside a text would shift the columns: refused, not misread.
    std::fs::write(
        tmp.path().join("train.tsv"),
        "sentence\tlabel\ngood\tfilm\t1\n",
    )
    .unwrap();
    let err = load_err("sst2", tmp.path());
    assert!(
        err.contains("train.tsv:2: 3 tab-separated fields, expected 2"),
        "{err}"
    );
}

#[test]
fn bad_jsonl_lines_are_counted_when_skipped() {
    let dir = fixture("bad/CB");
    let err = load_err("cb", &dir);
    assert!(
        err.contains(&format!(
            "{}:3: not valid JSON",
            dir.join("train.jsonl").display()
        )),
        "{err}"
    );
    let t = load_task("cb", &options(&dir, true)).unwrap();
    // Line 3 (cut short) and line 5 (no label).
    assert_eq!(t.skipped_lines, 2);
    assert_eq!(t.train.len() + t.dev.len(), 4);
    assert_eq!(t.test.len(), 1);
}

#[test]
fn a_bad_json_array_entry_names_file_and_entry() {
    // The built-in uci-sentiment loader on a folder of the same JSON files (`--data DIR`).
    let dir = fixture("bad/uci");
    let err = load_err("uci-sentiment", &dir);
    let want = format!(
        "{}: entry 3: unknown label '2' (expected 0, 1)",
        dir.join("amazon.json").display()
    );
    assert!(err.contains(&want), "{err}\nwant: {want}");
    let t = load_task("uci-sentiment", &options(&dir, true)).unwrap();
    // amazon entry 3 (class 2) and imdb entry 3 (no text); the empty closing entries are not counted.
    assert_eq!(t.skipped_lines, 2);
    assert_eq!(t.train.len() + t.dev.len() + t.test.len(), 14);
    assert!(t
        .split(Split::Train)
        .iter()
        .all(|e| e.text.starts_with("sentence: ")));
}

#[test]
fn bad_custom_lines() {
    let csv = fixture("bad/custom.csv");
    let err = load_err("custom", &csv);
    assert!(
        err.contains(&format!("{}:4: missing field 'label'", csv.display())),
        "{err}"
    );
    let t = load_task("custom", &options(&csv, true)).unwrap();
    assert_eq!(t.skipped_lines, 2); // line 4 (no label), line 5 (no text)
    assert_eq!(t.train.len() + t.dev.len() + t.test.len(), 4);

    let jsonl = fixture("bad/custom.jsonl");
    let err = load_err("custom", &jsonl);
    assert!(
        err.contains(&format!(
            "{}:2: the label must be a string or an integer",
            jsonl.display()
        )),
        "{err}"
    );
    let t = load_task("custom", &options(&jsonl, true)).unwrap();
    assert_eq!(t.skipped_lines, 2); // line 2 (label 0.5), line 3 (empty text)
    assert_eq!(t.label_names, ["neg", "pos"]);

    // A dev label that train never has.
    let dir = fixture("bad/custom_dir");
    let err = load_err("custom", &dir);
    let want = format!(
        "{}:2: unknown label 'neutral' (expected neg, pos)",
        dir.join("dev.jsonl").display()
    );
    assert!(err.contains(&want), "{err}\nwant: {want}");
    let t = load_task("custom", &options(&dir, true)).unwrap();
    assert_eq!(t.skipped_lines, 1);
    assert_eq!(t.dev, [ex("sentence: Okay phone.", 1)]);
}

#[test]
fn an_unclosed_csv_quote_is_a_bad_line_not_a_swallowed_file() {
    // Line 4 opens a quote that nothing closes: the CSV parser alone would read lines 4 to 9 as one
    // text and drop the 4 examples after it without a word.
    let csv = fixture("bad/unclosed_quote.csv");
    let err = load_err("custom", &csv);
    let want = format!("{}:4: unclosed quote starting here", csv.display());
    assert!(err.contains(&want), "{err}\nwant: {want}");
    let t = load_task("custom", &options(&csv, true)).unwrap();
    assert_eq!(t.skipped_lines, 1);
    assert_eq!(t.train.len() + t.dev.len() + t.test.len(), 2);

    // The same in the built-in polarity loader (`--data DIR` with the fetched file's name).
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("polarity-en-pang&lee2.csv");
    let mut text = String::new();
    for i in 0..10 {
        text.push_str(&format!("1,\"good film {i}\"\n-1,bad film {i}\n"));
    }
    text.push_str("1,\"a stray quote\n");
    for i in 0..5 {
        text.push_str(&format!("1,fine film {i}\n"));
    }
    std::fs::write(&file, text).unwrap();
    let err = load_err("polarity", tmp.path());
    let want = format!("{}:21: unclosed quote starting here", file.display());
    assert!(err.contains(&want), "{err}\nwant: {want}");
    let t = load_task("polarity", &options(tmp.path(), true)).unwrap();
    assert_eq!(t.skipped_lines, 1);
    assert_eq!(t.train.len() + t.dev.len() + t.test.len(), 20);
}

#[test]
fn custom_data_needs_two_labels() {
    let csv = fixture("bad/one_label.csv");
    let err = load_err("custom", &csv);
    let want = format!(
        "{}: needs at least 2 labels, found only 'pos'",
        csv.display()
    );
    assert!(err.contains(&want), "{err}\nwant: {want}");

    // In a folder, the training file decides, even where dev holds another label.
    let tmp = tempfile::tempdir().unwrap();
    let train = tmp.path().join("train.jsonl");
    std::fs::write(
        &train,
        "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 1}\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("dev.jsonl"),
        "{\"text\": \"c\", \"label\": 0}\n",
    )
    .unwrap();
    let err = load_err("custom", tmp.path());
    let want = format!(
        "{}: needs at least 2 labels, found only '1'",
        train.display()
    );
    assert!(err.contains(&want), "{err}\nwant: {want}");
}

#[test]
fn missing_files_and_folders_say_what_belongs_there() {
    let err = load_err("cola", Path::new("/nonexistent/glue/CoLA"));
    assert!(
        err.contains("no such folder") && err.contains("train.tsv") && err.contains("dev.tsv"),
        "{err}"
    );
    let err = load_err("mnli", &fixture("glue/QQP"));
    assert!(
        err.contains("QQP/train.tsv:1: the header has no 'sentence2' column (found: id, qid1"),
        "{err}"
    );
    let err = load_err("sst2", &fixture("superglue/BoolQ"));
    assert!(err.contains("train.tsv: no such file"), "{err}");
    let err = load_err("boolq", &fixture("glue/SST-2"));
    assert!(
        err.contains("train.jsonl: no such file") && err.contains("val.jsonl"),
        "{err}"
    );
    // CoLA's headerless file is no MNLI file.
    let err = load_err("mnli", &fixture("glue/CoLA"));
    assert!(err.contains("no 'sentence2' column"), "{err}");
    let err = load_err("rte", &fixture("custom"));
    assert!(
        err.contains("train.tsv") && err.contains("train.jsonl"),
        "{err}"
    );
    let err = load_err("custom", &fixture("superglue"));
    assert!(err.contains("train.csv nor train.jsonl"), "{err}");

    let no_data = LoadOptions {
        data: None,
        weights_dir: PathBuf::from("/nonexistent"),
        skip_bad_lines: false,
    };
    let err = load_task("qnli", &no_data).unwrap_err().to_string();
    assert!(err.contains("--data") && err.contains("QNLI"), "{err}");
}
