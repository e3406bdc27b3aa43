//! A Llama GGUF file → a Hugging Face `LlamaForCausalLM` folder: `config.json`, `model.safetensors`
//! (dequantised to f32 or bf16, HF tensor names), `tokenizer.json` rebuilt from the GGUF's byte-level
//! BPE vocabulary, `tokenizer_config.json` and `generation_config.json`.
//!
//! llama.cpp's converter reorders the rows of every Q and K projection so that RoPE rotates adjacent
//! pairs (x0, x1), (x2, x3), … of each head; Hugging Face Llama rotates the two halves of each head
//! against each other. The rows are put back here, so the folder loads and runs in transformers.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::export::replace_dir;
use super::gguf::{Dequantizer, GgufFile, TensorInfo};
use crate::train::checkpoint::{parent_dir, shared_temp, sync_dir, write_atomic};

/// The dtype of the written weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    F32,
    BF16,
}

impl OutDtype {
    fn safetensors(self) -> safetensors::Dtype {
        match self {
            OutDtype::F32 => safetensors::Dtype::F32,
            OutDtype::BF16 => safetensors::Dtype::BF16,
        }
    }

    fn size(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::BF16 => 2,
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::BF16 => "bfloat16",
        }
    }
}

impl FromStr for OutDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(OutDtype::F32),
            "bf16" | "bfloat16" => Ok(OutDtype::BF16),
            _ => bail!("unknown dtype '{s}': expected f32 or bf16"),
        }
    }
}

/// Converts `gguf` into the Hugging Face folder `out`, atomically: the files are written into a
/// temporary folder beside `out`, which then replaces it. An `out` holding files is only replaced
/// when `replace` is set.
pub fn convert_gguf(gguf: &Path, out: &Path, dtype: OutDtype, replace: bool) -> Result<()> {
    let file = GgufFile::open(gguf)?;
    if out.exists() && !out.is_dir() {
        bail!(
            "{} exists and is not a folder; choose another --out",
            out.display()
        );
    }
    if out.exists() {
        let occupied = std::fs::read_dir(out)
            .with_context(|| format!("cannot read {}", out.display()))?
            .next()
            .is_some();
        if occupied && !replace {
            bail!(
                "{} already exists and is not empty; choose another --out or pass --force to replace it",
                out.display()
            );
        }
    }
    let parent = parent_dir(out);
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = shared_temp(true)
        .prefix(".converting-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a temporary folder in {}", parent.display()))?;
    write_hf_llama(&file, staging.path(), dtype)?;
    replace_dir(staging.keep(), out)
}

/// Writes the Hugging Face files for `gguf` into the existing folder `dir` (not atomically: callers
/// write into a staging folder and move it into place).
pub fn write_hf_llama(gguf: &GgufFile, dir: &Path, dtype: OutDtype) -> Result<()> {
    let spec = LlamaSpec::from_gguf(gguf)?;
    let tensors = plan_tensors(gguf, &spec)?;
    let vocab = Vocab::from_gguf(gguf)?;
    if vocab.tokens.len() > spec.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the embedding only {} rows",
            gguf.path().display(),
            vocab.tokens.len(),
            spec.vocab_size
        );
    }
    let tokenizer = vocab
        .tokenizer_json()
        .with_context(|| format!("{}: cannot build tokenizer.json", gguf.path().display()))?;

    write_json(&dir.join("config.json"), &spec.config_json(dtype))?;
    write_json(
        &dir.join("generation_config.json"),
        &spec.generation_config_json(),
    )?;
    write_json(&dir.join("tokenizer.json"), &tokenizer)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &vocab.tokenizer_config_json(spec.max_position_embeddings),
    )?;
    write_weights(gguf, &tensors, dtype, &dir.join("model.safetensors"))?;
    sync_dir(dir)
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// An f32 from the file as the JSON number of its shortest decimal form (1e-5, not
/// 9.999999747378752e-6).
fn json_f32(x: f64) -> Value {
    let shortest = (x as f32).to_string();
    json!(shortest.parse::<f64>().unwrap_or(x))
}

// ---------------------------------------------------------------------------------------------
// Hyper-parameters
// ---------------------------------------------------------------------------------------------

/// The Llama hyper-parameters stored in the GGUF metadata (`llama.*`, `tokenizer.ggml.*_token_id`).
#[derive(Clone, Debug)]
pub struct LlamaSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Value>,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u64>,
    pub eos_token_id: Option<u64>,
    pub pad_token_id: Option<u64>,
}

impl LlamaSpec {
    pub fn from_gguf(g: &GgufFile) -> Result<LlamaSpec> {
        let file = g.path().display();
        let arch = g.need("general.architecture", GgufFile::get_str)?;
        if arch != "llama" {
            bail!(
                "{file}: architecture '{arch}' is not supported; kdx converts 'llama' GGUF files"
            );
        }
        let uint = |key: &str| -> Result<usize> {
            Ok(g.need(&format!("llama.{key}"), GgufFile::get_uint)? as usize)
        };
        let opt_uint = |key: &str| -> Result<Option<usize>> {
            Ok(g.get_uint(&format!("llama.{key}"))?.map(|v| v as usize))
        };
        let hidden_size = uint("embedding_length")?;
        let heads = uint("attention.head_count")?;
        let kv_heads = opt_uint("attention.head_count_kv")?.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            bail!("{file}: {heads} attention heads cannot share {kv_heads} key-value heads evenly");
        }
        let head_dim = match opt_uint("attention.key_length")? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(heads) => hidden_size / heads,
            None => bail!("{file}: hidden size {hidden_size} is not a multiple of {heads} heads"),
        };
        if let Some(v) = opt_uint("attention.value_length")? {
            if v != head_dim {
                bail!("{file}: value heads of {v} and key heads of {head_dim}: Hugging Face Llama needs them equal");
            }
        }
        if let Some(r) = opt_uint("rope.dimension_count")? {
            if r != head_dim {
                bail!("{file}: RoPE covers {r} of {head_dim} head dimensions; Hugging Face Llama rotates whole heads");
            }
        }
        if !head_dim.is_multiple_of(2) {
            bail!("{file}: head size {head_dim} is odd; RoPE needs pairs");
        }
        if g.tensor("rope_freqs.weight").is_some() {
            bail!("{file}: has per-frequency RoPE factors (rope_freqs.weight, Llama 3.1 style), which kdx does not convert");
        }
        let rope_scaling = match g.get_str("llama.rope.scaling.type")? {
            None | Some("none") => None,
            Some("linear") => Some(json!({
                "rope_type": "linear",
                "factor": g.need("llama.rope.scaling.factor", GgufFile::get_float)?,
            })),
            Some(other) => bail!(
                "{file}: RoPE scaling '{other}' is not supported (kdx converts none and linear)"
            ),
        };
        let embed = g
            .tensor("token_embd.weight")
            .with_context(|| format!("{file}: has no token_embd.weight"))?;
        let vocab_size = match opt_uint("vocab_size")? {
            Some(v) => v,
            None => embed.shape[0],
        };
        let token_id = |key: &str| g.get_uint(&format!("tokenizer.ggml.{key}_token_id"));
        Ok(LlamaSpec {
            hidden_size,
            intermediate_size: uint("feed_forward_length")?,
            num_hidden_layers: uint("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: g.need(
                "llama.attention.layer_norm_rms_epsilon",
                GgufFile::get_float,
            )?,
            // llama.cpp's default where the file does not say
            rope_theta: g.get_float("llama.rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling,
            vocab_size,
            max_position_embeddings: uint("context_length")?,
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            bos_token_id: token_id("bos")?,
            eos_token_id: token_id("eos")?,
            pad_token_id: token_id("padding")?,
        })
    }

    pub fn config_json(&self, dtype: OutDtype) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": json_f32(self.rms_norm_eps),
            "rope_theta": json_f32(self.rope_theta),
            "rope_scaling": self.rope_scaling,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "torch_dtype": dtype.torch_name(),
        })
    }

    pub fn generation_config_json(&self) -> Value {
        json!({
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------------

/// What a GGUF tensor is in a Llama model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Embed,
    FinalNorm,
    Output,
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

/// The roles each layer needs, with their GGUF names (after `blk.N.`).
const LAYER_ROLES: [(&str, Role); 9] = [
    ("attn_norm.weight", Role::AttnNorm),
    ("attn_q.weight", Role::Q),
    ("attn_k.weight", Role::K),
    ("attn_v.weight", Role::V),
    ("attn_output.weight", Role::O),
    ("ffn_norm.weight", Role::FfnNorm),
    ("ffn_gate.weight", Role::Gate),
    ("ffn_up.weight", Role::Up),
    ("ffn_down.weight", Role::Down),
];

impl Role {
    /// The role and layer of a GGUF tensor name; `None` for names a Llama model does not have.
    fn of(name: &str) -> Option<(Role, Option<usize>)> {
        match name {
            "token_embd.weight" => return Some((Role::Embed, None)),
            "output_norm.weight" => return Some((Role::FinalNorm, None)),
            "output.weight" => return Some((Role::Output, None)),
            _ => {}
        }
        let rest = name.strip_prefix("blk.")?;
        let (layer, suffix) = rest.split_once('.')?;
        let layer = layer.parse().ok()?;
        LAYER_ROLES
            .iter()
            .find(|(s, _)| *s == suffix)
            .map(|&(_, role)| (role, Some(layer)))
    }

    fn hf_name(self, layer: Option<usize>) -> String {
        let l = layer.unwrap_or(0);
        match self {
            Role::Embed => "model.embed_tokens.weight".into(),
            Role::FinalNorm => "model.norm.weight".into(),
            Role::Output => "lm_head.weight".into(),
            Role::AttnNorm => format!("model.layers.{l}.input_layernorm.weight"),
            Role::FfnNorm => format!("model.layers.{l}.post_attention_layernorm.weight"),
            Role::Q => format!("model.layers.{l}.self_attn.q_proj.weight"),
            Role::K => format!("model.layers.{l}.self_attn.k_proj.weight"),
            Role::V => format!("model.layers.{l}.self_attn.v_proj.weight"),
            Role::O => format!("model.layers.{l}.self_attn.o_proj.weight"),
            Role::Gate => format!("model.layers.{l}.mlp.gate_proj.weight"),
            Role::Up => format!("model.layers.{l}.mlp.up_proj.weight"),
            Role::Down => format!("model.layers.{l}.mlp.down_proj.weight"),
        }
    }

    /// The row-major shape the spec implies.
    fn shape(self, s: &LlamaSpec) -> Vec<usize> {
        let (h, ffn) = (s.hidden_size, s.intermediate_size);
        let (q, kv) = (
            s.num_attention_heads * s.head_dim,
            s.num_key_value_heads * s.head_dim,
        );
        match self {
            Role::Embed | Role::Output => vec![s.vocab_size, h],
            Role::FinalNorm | Role::AttnNorm | Role::FfnNorm => vec![h],
            Role::Q => vec![q, h],
            Role::K | Role::V => vec![kv, h],
            Role::O => vec![h, q],
            Role::Gate | Role::Up => vec![ffn, h],
            Role::Down => vec![h, ffn],
        }
    }

    /// Heads whose rows llama.cpp interleaved for its RoPE (Q and K only).
    fn rope_heads(self, s: &LlamaSpec) -> Option<usize> {
        match self {
            Role::Q => Some(s.num_attention_heads),
            Role::K => Some(s.num_key_value_heads),
            _ => None,
        }
    }
}

/// A GGUF tensor on its way into `model.safetensors`.
struct PlannedTensor<'a> {
    hf_name: String,
    info: &'a TensorInfo,
    dequantizer: Dequantizer,
    rope_heads: Option<usize>,
}

/// Maps every tensor of the file to its HF name, checking that each exists once with the shape the
/// spec implies and can be dequantised, before anything is written.
fn plan_tensors<'a>(g: &'a GgufFile, spec: &LlamaSpec) -> Result<Vec<PlannedTensor<'a>>> {
    let file = g.path().display();
    let mut planned = Vec::new();
    let mut found = BTreeSet::new();
    for info in g.tensors() {
        let Some((role, layer)) = Role::of(&info.name) else {
            bail!(
                "{file}: tensor '{}' has no counterpart in Hugging Face Llama (biases and extra tensors are not supported)",
                info.name
            );
        };
        if let Some(l) = layer {
            if l >= spec.num_hidden_layers {
                bail!(
                    "{file}: tensor '{}' is in layer {l}, but llama.block_count is {}",
                    info.name,
                    spec.num_hidden_layers
                );
            }
        }
        let want = role.shape(spec);
        if info.shape != want {
            bail!(
                "{file}: tensor '{}' has shape {:?}, but the metadata implies {want:?}",
                info.name,
                info.shape
            );
        }
        let dequantizer = info
            .ggml_type
            .dequantizer()
            .with_context(|| format!("{file}: tensor '{}'", info.name))?;
        found.insert((role, layer));
        planned.push(PlannedTensor {
            hf_name: role.hf_name(layer),
            info,
            dequantizer,
            rope_heads: role.rope_heads(spec),
        });
    }
    let mut needed = vec![
        (Role::Embed, None, "token_embd.weight".to_string()),
        (Role::FinalNorm, None, "output_norm.weight".to_string()),
    ];
    for l in 0..spec.num_hidden_layers {
        for (suffix, role) in LAYER_ROLES {
            needed.push((role, Some(l), format!("blk.{l}.{suffix}")));
        }
    }
    for (role, layer, gguf_name) in needed {
        if !found.contains(&(role, layer)) {
            bail!("{file}: tensor '{gguf_name}' is missing");
        }
    }
    Ok(planned)
}

/// Puts the rows of a GGUF Q or K projection (`rows` × `cols`, `heads` heads) back in Hugging Face
/// order. llama.cpp stores row `2j + i` of a head what HF keeps at row `i·d/2 + j` (`d` the head size,
/// `i` ∈ {0, 1}, `j` < d/2): the inverse of `permute` in its convert_hf_to_gguf.py.
pub fn rope_rows_to_hf(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0f32; values.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let hf = h * head_dim + i * half + j;
                let gguf = h * head_dim + 2 * j + i;
                out[hf * cols..(hf + 1) * cols]
                    .copy_from_slice(&values[gguf * cols..(gguf + 1) * cols]);
            }
        }
    }
    out
}

/// One output tensor, dequantised only when the safetensors writer asks for its bytes, so that at
/// most one tensor is held in f32 at a time.
struct LazyTensor<'a> {
    gguf: &'a GgufFile,
    planned: &'a PlannedTensor<'a>,
    dtype: OutDtype,
    progress: &'a ProgressBar,
}

impl safetensors::View for LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.safetensors()
    }

    fn shape(&self) -> &[usize] {
        &self.planned.info.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let info = self.planned.info;
        let mut values = vec![0.0f32; info.numel()];
        self.planned
            .dequantizer
            .decode_into(self.gguf.tensor_bytes(info), &mut values);
        if let Some(heads) = self.planned.rope_heads {
            values = rope_rows_to_hf(&values, heads, info.shape[1]);
        }
        let bytes = match self.dtype {
            OutDtype::F32 => bytemuck::cast_slice::<f32, u8>(&values).to_vec(),
            OutDtype::BF16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        };
        self.progress.inc(info.n_bytes as u64);
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.planned.info.numel() * self.dtype.size()
    }
}

fn write_weights(
    gguf: &GgufFile,
    tensors: &[PlannedTensor<'_>],
    dtype: OutDtype,
    path: &Path,
) -> Result<()> {
    let total: u64 = tensors.iter().map(|t| t.info.n_bytes as u64).sum();
    let progress = ProgressBar::new(total);
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} dequantising {wide_bar} {binary_bytes}/{binary_total_bytes}",
        )
        .expect("valid progress template"),
    );
    let views = tensors.iter().map(|planned| {
        (
            planned.hf_name.clone(),
            LazyTensor {
                gguf,
                planned,
                dtype,
                progress: &progress,
            },
        )
    });
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    progress.finish_and_clear();
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot flush {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_NORMAL: i64 = 1;
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// The byte-level BPE vocabulary of a GGUF file (`tokenizer.ggml.model` = `gpt2`).
struct Vocab<'a> {
    tokens: Vec<&'a str>,
    merges: Vec<(&'a str, &'a str)>,
    types: Vec<i64>,
    pre: &'a str,
    add_bos: bool,
    add_eos: bool,
    bos: Option<usize>,
    eos: Option<usize>,
    unk: Option<usize>,
    pad: Option<usize>,
    chat_template: Option<&'a str>,
}

impl<'a> Vocab<'a> {
    fn from_gguf(g: &'a GgufFile) -> Result<Vocab<'a>> {
        let file = g.path().display();
        let model = g.need("tokenizer.ggml.model", GgufFile::get_str)?;
        if model != "gpt2" {
            bail!("{file}: tokenizer model '{model}' is not supported; kdx converts byte-level BPE ('gpt2') tokenizers");
        }
        let tokens = g.need("tokenizer.ggml.tokens", GgufFile::get_str_array)?;
        let types = match g.get_int_array("tokenizer.ggml.token_type")? {
            Some(t) if t.len() == tokens.len() => t,
            Some(t) => bail!(
                "{file}: tokenizer.ggml.token_type has {} entries for {} tokens",
                t.len(),
                tokens.len()
            ),
            None => vec![TOKEN_NORMAL; tokens.len()],
        };
        let mut seen = HashMap::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            if let Some(first) = seen.insert(*t, id) {
                bail!("{file}: token {t:?} appears twice (ids {first} and {id}); a BPE vocabulary maps each string to one id");
            }
        }
        let merges = g
            .need("tokenizer.ggml.merges", GgufFile::get_str_array)?
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                // As llama.cpp: the separator is the first space after the first character (a
                // byte-level token never holds a literal space, but a merge's left side may be one).
                let split = m
                    .char_indices()
                    .skip(1)
                    .find(|&(_, c)| c == ' ')
                    .map(|(at, _)| (&m[..at], &m[at + 1..]));
                split.with_context(|| {
                    format!("{file}: merge {i} ({m:?}) is not two tokens separated by a space")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let id = |key: &str| -> Result<Option<usize>> {
            let Some(id) = g.get_uint(&format!("tokenizer.ggml.{key}_token_id"))? else {
                return Ok(None);
            };
            if id as usize >= tokens.len() {
                bail!(
                    "{file}: tokenizer.ggml.{key}_token_id is {id}, past the {} tokens",
                    tokens.len()
                );
            }
            Ok(Some(id as usize))
        };
        Ok(Vocab {
            pre: g.get_str("tokenizer.ggml.pre")?.unwrap_or("default"),
            add_bos: g.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
            add_eos: g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            bos: id("bos")?,
            eos: id("eos")?,
            unk: id("unknown")?,
            pad: id("padding")?,
            chat_template: g.get_str("tokenizer.chat_template")?,
            tokens,
            merges,
            types,
        })
    }

    /// Tokens matched whole in the text before BPE runs: control and user-defined tokens, and the
    /// special ids; all but user-defined ones are special (skipped when decoding).
    fn added_tokens(&self) -> Vec<(usize, bool)> {
        let named = [self.bos, self.eos, self.unk, self.pad];
        (0..self.tokens.len())
            .filter_map(|id| {
                let t = self.types[id];
                let special = t == TOKEN_CONTROL || t == TOKEN_UNKNOWN || named.contains(&Some(id));
                (special || t == TOKEN_USER_DEFINED).then_some((id, special))
            })
            .collect()
    }

    fn tokenizer_json(&self) -> Result<TokenizerJson<'_>> {
        let added_tokens = self
            .added_tokens()
            .into_iter()
            .map(|(id, special)| {
                json!({
                    "id": id,
                    "content": self.tokens[id],
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": special,
                })
            })
            .collect();
        let (pre_tokenizer, ignore_merges) = pre_tokenizer(self.pre)?;
        Ok(TokenizerJson {
            version: "1.0",
            truncation: None,
            padding: None,
            added_tokens,
            normalizer: None,
            pre_tokenizer,
            post_processor: self.post_processor(),
            decoder: json!({
                "type": "ByteLevel",
                "add_prefix_space": true,
                "trim_offsets": true,
                "use_regex": true,
            }),
            model: BpeJson {
                kind: "BPE",
                dropout: None,
                unk_token: None,
                continuing_subword_prefix: None,
                end_of_word_suffix: None,
                fuse_unk: false,
                byte_fallback: false,
                ignore_merges,
                vocab: VocabInIdOrder(&self.tokens),
                merges: &self.merges,
            },
        })
    }

    /// BOS/EOS around each sequence where the GGUF asks for them; otherwise byte-level offsets only.
    fn post_processor(&self) -> Value {
        let bos = self.bos.filter(|_| self.add_bos);
        let eos = self.eos.filter(|_| self.add_eos);
        if bos.is_none() && eos.is_none() {
            return json!({
                "type": "ByteLevel",
                "add_prefix_space": true,
                "trim_offsets": false,
                "use_regex": true,
            });
        }
        let special = |id: usize, type_id: u32| json!({"SpecialToken": {"id": self.tokens[id], "type_id": type_id}});
        let sequence =
            |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
        let wrap = |name: &str, type_id: u32| {
            let mut v = Vec::new();
            v.extend(bos.map(|b| special(b, type_id)));
            v.push(sequence(name, type_id));
            v.extend(eos.map(|e| special(e, type_id)));
            v
        };
        let single = wrap("A", 0);
        let mut pair = wrap("A", 0);
        pair.extend(wrap("B", 1));
        let special_tokens: Map<String, Value> = [bos, eos]
            .into_iter()
            .flatten()
            .map(|id| {
                let t = self.tokens[id];
                (t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}))
            })
            .collect();
        json!({
            "type": "TemplateProcessing",
            "single": single,
            "pair": pair,
            "special_tokens": special_tokens,
        })
    }

    fn tokenizer_config_json(&self, max_len: usize) -> Value {
        let added: Map<String, Value> = self
            .added_tokens()
            .into_iter()
            .map(|(id, special)| {
                (
                    id.to_string(),
                    json!({
                        "content": self.tokens[id],
                        "lstrip": false,
                        "normalized": false,
                        "rstrip": false,
                        "single_word": false,
                        "special": special,
                    }),
                )
            })
            .collect();
        let name = |id: Option<usize>| id.map(|i| self.tokens[i]);
        json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "add_prefix_space": false,
            "added_tokens_decoder": added,
            "bos_token": name(self.bos),
            "eos_token": name(self.eos),
            "unk_token": name(self.unk),
            "pad_token": name(self.pad),
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": false,
            "model_max_length": max_len,
        })
    }
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value (llama.cpp's regexes, as Hugging Face writes
/// them), and whether BPE takes a whole word found in the vocabulary as is (`ignore_merges`).
fn pre_tokenizer(pre: &str) -> Result<(Value, bool)> {
    // GPT-2's split: ByteLevel's own regex.
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split_then_bytes = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    };
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" => (byte_level(true), false),
        // Each digit alone (\p{N}), then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "codeshell" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" => (split_then_bytes(LLAMA3), true),
        "qwen2" => (split_then_bytes(QWEN2), false),
        other => bail!(
            "tokenizer.ggml.pre '{other}' is not supported; kdx converts default/gpt2, smollm/starcoder, llama-bpe and qwen2"
        ),
    })
}

/// `tokenizer.json`, fields in the order the tokenizers library writes them.
#[derive(Serialize)]
struct TokenizerJson<'a> {
    version: &'static str,
    truncation: Option<Value>,
    padding: Option<Value>,
    added_tokens: Vec<Value>,
    normalizer: Option<Value>,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: BpeJson<'a>,
}

#[derive(Serialize)]
struct BpeJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: VocabInIdOrder<'a>,
    merges: &'a [(&'a str, &'a str)],
}

/// The vocabulary as a JSON object token → id, written in id order.
struct VocabInIdOrder<'a>(&'a [&'a str]);

impl Serialize for VocabInIdOrder<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().enumerate().map(|(id, t)| (*t, id)))
    }
}
