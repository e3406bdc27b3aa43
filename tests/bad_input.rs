//! Bad model files get clear errors naming the file and the tensor.

use std::collections::HashMap;
use std::path::Path;

use kdx::model::config::BertConfig;
use kdx::model::EncoderModel;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 10,
        hidden_size: 4,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 6,
        max_position_embeddings: 8,
        ..BertConfig::minilm_l6()
    }
}

/// Every tensor a 1-layer encoder needs, named with `prefix`, with `skip` left out and `resize`
/// given a wrong first dimension.
fn write_model(dir: &Path, prefix: &str, skip: Option<&str>, resize: Option<&str>) {
    let c = tiny_config();
    std::fs::write(dir.join("config.json"), serde_json::to_string(&c).unwrap()).unwrap();
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![c.vocab_size, h],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![c.max_position_embeddings, h],
        ),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for (name, out, inp) in [
        ("attention.self.query", h, h),
        ("attention.self.key", h, h),
        ("attention.self.value", h, h),
        ("attention.output.dense", h, h),
        ("intermediate.dense", i, h),
        ("output.dense", h, i),
    ] {
        shapes.push((format!("encoder.layer.0.{name}.weight"), vec![out, inp]));
        shapes.push((format!("encoder.layer.0.{name}.bias"), vec![out]));
    }
    for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
        shapes.push((format!("encoder.layer.0.{name}.weight"), vec![h]));
        shapes.push((format!("encoder.layer.0.{name}.bias"), vec![h]));
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .filter(|(n, _)| Some(n.as_str()) != skip)
        .map(|(n, mut s)| {
            if Some(n.as_str()) == resize {
                s[0] += 1;
            }
            let bytes = (0..s.iter().product::<usize>())
                .flat_map(|k| (k as f32 * 0.01).to_le_bytes())
                .collect();
            (format!("{prefix}{n}"), s, bytes)
        })
        .collect();
    let views: HashMap<String, TensorView> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    // A minimal WordPiece tokenizer.json.
    let tokenizer = r###"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
        "model":{"type":"WordPiece","unk_token":"[UNK]","continuing_subword_prefix":"##","max_input_chars_per_word":100,
        "vocab":{"[UNK]":0,"a":1,"b":2}}}"###;
    std::fs::write(dir.join("tokenizer.json"), tokenizer).unwrap();
}

fn load_err(dir: &Path) -> String {
    format!(
        "{:#}",
        EncoderModel::load(dir).err().expect("loading should fail")
    )
}

#[test]
fn both_name_layouts_load() {
    for prefix in ["", "bert."] {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), prefix, None, None);
        let model = EncoderModel::load(dir.path()).unwrap();
        assert_eq!(model.encoder.config.num_hidden_layers, 1);
        let batch = model.text.batch(&["a b a"]).unwrap();
        assert_eq!(batch.ids, vec![1, 2, 1]);
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_model(
        dir.path(),
        "bert.",
        Some("encoder.layer.0.output.dense.bias"),
        None,
    );
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("bert.encoder.layer.0.output.dense.bias"),
        "{err}"
    );
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn shape_that_contradicts_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_model(
        dir.path(),
        "",
        None,
        Some("encoder.layer.0.intermediate.dense.weight"),
    );
    let err = load_err(dir.path());
    assert!(
        err.contains("encoder.layer.0.intermediate.dense.weight")
            && err.contains("[7, 4]")
            && err.contains("[6, 4]"),
        "{err}"
    );
}

#[test]
fn truncated_and_corrupt_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), "", None, None);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated or corrupt"),
        "{err}"
    );
    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
}

#[test]
fn config_problems_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), "", None, None);
    std::fs::write(dir.path().join("config.json"), r#"{"hidden_size": 4}"#).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json"), "{err}");
    let mut c = tiny_config();
    c.hidden_act = "relu".into();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&c).unwrap(),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json") && err.contains("relu"), "{err}");
    assert!(load_err(&dir.path().join("nope")).contains("does not exist"));
}
