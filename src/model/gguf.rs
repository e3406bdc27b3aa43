//! GGUF, llama.cpp's model file (versions 2 and 3, little-endian): header, metadata, tensor table and
//! data section, memory-mapped; and dequantisation of the common ggml block formats to f32.
//!
//! Layout (all integers little-endian):
//! ```text
//! "GGUF"  u32 version  u64 tensor_count  u64 metadata_count
//! metadata_count × { string key, u32 value_type, value }
//! tensor_count   × { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
//! padding to `general.alignment` (default 32), then the data section; tensor offsets are relative to it
//! ```
//! A string is a u64 byte length and UTF-8 bytes; an array is a u32 element type, a u64 count and the
//! elements. Every length and offset is checked against the file before use, so a corrupt or
//! truncated file gives an error naming the file and what is wrong, never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: usize = 4;
/// Arrays of arrays are legal; real files nest at most one level, and a bound keeps a crafted file
/// from exhausting the stack.
const MAX_ARRAY_NESTING: usize = 8;

// ---------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------

/// One metadata value, in the type the file stores.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
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
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// Any integer type, widened (files disagree on the width of counts and ids).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Either float type, or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// The value types of the format, by their id in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type takes: bounds an array's count before reading it.
    fn min_size(self) -> usize {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            // the length prefix
            String => 8,
            // element type + count
            Array => 12,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ggml tensor types
// ---------------------------------------------------------------------------------------------

/// Every ggml tensor type the format defines (ids as in ggml.h). Each has a block size (elements) and
/// a block's byte size, which the reader needs to place tensors whatever their type; only some can be
/// dequantised ([`GgmlType::dequantizer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// Decodes one block (its bytes) into its values.
type BlockDecoder = fn(&[u8], &mut [f32]);

/// Elements per super-block of the k-quants.
const QK_K: usize = 256;

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            40 => NVFP4,
            41 => Q1_0,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block), as ggml's type traits.
    pub fn block_layout(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 4 + 4 + 32),
            IQ4_NL => (32, 2 + 16),
            MXFP4 => (32, 1 + 16),
            NVFP4 => (64, 4 + 32),
            Q1_0 => (128, 2 + 16),
            Q2_K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            Q3_K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            Q4_K => (QK_K, 2 + 2 + QK_K / 2 + 12),
            Q5_K => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            Q6_K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            Q8_K => (QK_K, 4 + QK_K + QK_K / 8),
            IQ2_XXS => (QK_K, 2 + QK_K / 4),
            IQ2_XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ3_XXS => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            IQ1_S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ3_S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ2_S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ4_XS => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            IQ1_M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            TQ1_0 => (QK_K, 2 + 4 * 13),
            TQ2_0 => (QK_K, 2 + 64),
        }
    }

    /// The function that decodes one block, for the types kdx dequantises.
    fn block_decoder(self) -> Option<BlockDecoder> {
        use GgmlType::*;
        Some(match self {
            F32 => decode_f32,
            F16 => decode_f16,
            BF16 => decode_bf16,
            Q8_0 => decode_q8_0,
            Q4_0 => decode_q4_0,
            Q4_1 => decode_q4_1,
            Q4_K => decode_q4_k,
            Q6_K => decode_q6_k,
            _ => return None,
        })
    }

    /// The dequantiser for this type, or an error naming the types that have one.
    pub fn dequantizer(self) -> Result<Dequantizer> {
        let Some(decode_block) = self.block_decoder() else {
            bail!(
                "kdx cannot dequantise ggml type {self}; it reads {}",
                DEQUANTISABLE.map(|t| t.to_string()).join(", ")
            );
        };
        let (block_size, block_bytes) = self.block_layout();
        Ok(Dequantizer {
            ty: self,
            block_size,
            block_bytes,
            decode_block,
        })
    }
}

/// The types [`GgmlType::dequantizer`] supports.
pub const DEQUANTISABLE: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantisation (block layouts as ggml-quants.c)
// ---------------------------------------------------------------------------------------------

/// Decodes whole blocks of one type to f32.
#[derive(Clone, Copy)]
pub struct Dequantizer {
    ty: GgmlType,
    block_size: usize,
    block_bytes: usize,
    decode_block: BlockDecoder,
}

impl Dequantizer {
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Decodes `bytes` (whole blocks) into `out` (as many elements). The two must agree: check with
    /// [`Dequantizer::check_len`] first where they come from outside; a tensor of a [`GgufFile`] always does.
    pub fn decode_into(&self, bytes: &[u8], out: &mut [f32]) {
        debug_assert!(self.check_len(bytes.len(), out.len()).is_ok());
        // Big tensors (token embeddings) are decoded in parallel, a few hundred blocks per task.
        const BLOCKS_PER_TASK: usize = 512;
        bytes
            .par_chunks(self.block_bytes * BLOCKS_PER_TASK)
            .zip(out.par_chunks_mut(self.block_size * BLOCKS_PER_TASK))
            .for_each(|(src, dst)| {
                for (block, values) in src
                    .chunks_exact(self.block_bytes)
                    .zip(dst.chunks_exact_mut(self.block_size))
                {
                    (self.decode_block)(block, values);
                }
            });
    }

    /// Errors unless `n_bytes` of this type hold exactly `n_values` elements.
    pub fn check_len(&self, n_bytes: usize, n_values: usize) -> Result<()> {
        if !n_values.is_multiple_of(self.block_size)
            || n_values / self.block_size * self.block_bytes != n_bytes
        {
            bail!(
                "{} bytes of {} do not hold {n_values} values ({} values per {}-byte block)",
                n_bytes,
                self.ty,
                self.block_size,
                self.block_bytes
            );
        }
        Ok(())
    }
}

/// Dequantises `bytes` of type `ty` (whole blocks) to f32.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    let dq = ty.dequantizer()?;
    if !bytes.len().is_multiple_of(dq.block_bytes) {
        bail!(
            "{} bytes are not a whole number of {ty} blocks ({} bytes each)",
            bytes.len(),
            dq.block_bytes
        );
    }
    let mut out = vec![0.0f32; bytes.len() / dq.block_bytes * dq.block_size];
    dq.decode_into(bytes, &mut out);
    Ok(out)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn decode_f32(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn decode_f16(b: &[u8], y: &mut [f32]) {
    y[0] = f16_at(b, 0);
}

fn decode_bf16(b: &[u8], y: &mut [f32]) {
    y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
}

/// `{ f16 d; i8 q[32] }`: y = d·q.
fn decode_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = (q as i8) as f32 * d;
    }
}

/// `{ f16 d; u8 qs[16] }`: element j < 16 is the low nibble of qs[j], element j + 16 the high one;
/// y = d·(q − 8).
fn decode_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = y.split_at_mut(16);
    for ((&q, lo), hi) in b[2..18].iter().zip(lo).zip(hi) {
        *lo = ((q & 0x0F) as i32 - 8) as f32 * d;
        *hi = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// `{ f16 d; f16 m; u8 qs[16] }`: nibbles as Q4_0, unsigned; y = d·q + m.
fn decode_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let (lo, hi) = y.split_at_mut(16);
    for ((&q, lo), hi) in b[4..20].iter().zip(lo).zip(hi) {
        *lo = (q & 0x0F) as f32 * d + m;
        *hi = (q >> 4) as f32 * d + m;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K super-block, packed into 12 bytes:
/// sub-blocks 0–3 keep theirs in the low 6 bits of bytes j and j + 4; sub-blocks 4–7 split theirs
/// into a low nibble in byte j + 4 and two high bits in the top of bytes j − 4 and j.
fn q4_k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// `{ f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }`: 8 sub-blocks of 32; each run of 32 bytes of qs
/// holds two sub-blocks (low nibbles, then high nibbles); y = d·scale·q − dmin·min.
fn decode_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (pair, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc_lo, m_lo) = q4_k_scale_min(2 * pair, scales);
        let (sc_hi, m_hi) = q4_k_scale_min(2 * pair + 1, scales);
        let (d_lo, min_lo) = (d * sc_lo as f32, dmin * m_lo as f32);
        let (d_hi, min_hi) = (d * sc_hi as f32, dmin * m_hi as f32);
        let (y_lo, y_hi) = y.split_at_mut(32);
        for ((&q, lo), hi) in q.iter().zip(y_lo).zip(y_hi) {
            *lo = d_lo * (q & 0x0F) as f32 - min_lo;
            *hi = d_hi * (q >> 4) as f32 - min_hi;
        }
    }
}

/// `{ u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }`: 6-bit values, low 4 bits in ql and high 2 in
/// qh, in two halves of 128; 16 sub-blocks of 16 with a signed scale each; y = d·scale·(q − 32).
fn decode_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let scale = |k: usize| d * (sc[is + k] as i8) as f32;
            y[l] = scale(0) * q1 as f32;
            y[l + 32] = scale(2) * q2 as f32;
            y[l + 64] = scale(4) * q3 as f32;
            y[l + 96] = scale(6) * q4 as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major (PyTorch) order: the file lists ggml's `ne`, innermost first, and this is reversed.
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// From the start of the data section.
    pub offset: u64,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A memory-mapped GGUF file whose header, metadata and tensor table have been checked.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    data_start: usize,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        if len == 0 {
            bail!("{}: the file is empty, not a GGUF file", path.display());
        }
        // SAFETY: the map is read-only; a file changed underneath while mapped is the user's error,
        // the same contract every memory-mapping model reader has.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let parsed = Header::parse(&mmap)
            .with_context(|| format!("{} is not a valid GGUF file", path.display()))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            data_start: parsed.data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor's bytes in the file (checked to lie inside it when the file was opened).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_start + info.offset as usize;
        &self.mmap[start..start + info.n_bytes]
    }

    /// The tensor as f32 values in row-major order.
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let dq = info
            .ggml_type
            .dequantizer()
            .with_context(|| format!("{}: tensor '{}'", self.path.display(), info.name))?;
        let mut out = vec![0.0f32; info.numel()];
        dq.decode_into(self.tensor_bytes(info), &mut out);
        Ok(out)
    }

    pub fn value(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn wrong_type(&self, key: &str, want: &str, got: &Value) -> anyhow::Error {
        anyhow!(
            "{}: metadata '{key}' should be {want} but is a {}",
            self.path.display(),
            got.type_name()
        )
    }

    /// A non-negative integer of any width; `None` if the key is absent.
    pub fn get_uint(&self, key: &str) -> Result<Option<u64>> {
        self.value(key)
            .map(|v| {
                v.as_i128()
                    .and_then(|i| u64::try_from(i).ok())
                    .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
            })
            .transpose()
    }

    /// A float (or integer) value; `None` if the key is absent.
    pub fn get_float(&self, key: &str) -> Result<Option<f64>> {
        self.value(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.wrong_type(key, "a number", v))
            })
            .transpose()
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.value(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, "a string", v))
            })
            .transpose()
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.value(key)
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                other => Err(self.wrong_type(key, "a bool", other)),
            })
            .transpose()
    }

    /// An array of strings; `None` if the key is absent.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        let Value::Array(items) = v else {
            return Err(self.wrong_type(key, "an array of strings", v));
        };
        items
            .iter()
            .map(|i| {
                i.as_str()
                    .ok_or_else(|| self.wrong_type(key, "an array of strings", i))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An array of integers of any width; `None` if the key is absent.
    pub fn get_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        let Value::Array(items) = v else {
            return Err(self.wrong_type(key, "an array of integers", v));
        };
        items
            .iter()
            .map(|i| {
                i.as_i128()
                    .and_then(|x| i64::try_from(x).ok())
                    .ok_or_else(|| self.wrong_type(key, "an array of integers", i))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// A required metadata key, read with one of the getters above (`g.need(key, GgufFile::get_uint)`):
    /// its absence is an error naming the file and the key.
    pub fn need<'a, T>(
        &'a self,
        key: &str,
        get: fn(&'a GgufFile, &str) -> Result<Option<T>>,
    ) -> Result<T> {
        get(self, key)?
            .ok_or_else(|| anyhow!("{}: metadata '{key}' is missing", self.path.display()))
    }
}

/// What parsing the bytes before the data section yields.
struct Header {
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    data_start: usize,
}

impl Header {
    fn parse(bytes: &[u8]) -> Result<Header> {
        let mut r = Reader { bytes, pos: 0 };
        let magic = r.take(4, "the magic number")?;
        if magic != MAGIC {
            bail!(
                "bad magic {:?} (expected \"GGUF\")",
                String::from_utf8_lossy(magic)
            );
        }
        let version = r.u32("the version")?;
        match version {
            2 | 3 => {}
            1 => bail!(
                "GGUF version 1 is not supported (re-convert the model with a current llama.cpp)"
            ),
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                bail!("this is a big-endian GGUF file; kdx reads little-endian ones only")
            }
            v => bail!("unsupported GGUF version {v} (kdx reads versions 2 and 3)"),
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_metadata = r.u64("the metadata count")?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_metadata {
            let key = r
                .string()
                .with_context(|| format!("metadata entry {i} of {n_metadata}: its key"))?;
            let value = r
                .typed_value(0)
                .with_context(|| format!("metadata '{key}'"))?;
            if metadata.insert(key.clone(), value).is_some() {
                bail!("metadata '{key}' appears twice");
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_i128() {
                Some(a) if a > 0 && (a as u128).is_power_of_two() && a <= u32::MAX as i128 => {
                    a as u64
                }
                _ => bail!("general.alignment is {v:?}; it must be a power of two"),
            },
        };

        // Each entry takes at least a name length, a dimension count, a type and an offset.
        let mut tensors = Vec::with_capacity(r.capacity_for(n_tensors, 8 + 4 + 4 + 8));
        for i in 0..n_tensors {
            let info = r
                .tensor_info()
                .with_context(|| format!("tensor table entry {i} of {n_tensors}"))?;
            tensors.push(info);
        }

        let data_start = align_up(r.pos as u64, alignment);
        let file_len = bytes.len() as u64;
        let mut seen = std::collections::HashSet::new();
        for t in &tensors {
            if !seen.insert(t.name.as_str()) {
                bail!("tensor '{}' appears twice in the tensor table", t.name);
            }
            if !t.offset.is_multiple_of(alignment) {
                bail!(
                    "tensor '{}' starts at offset {}, not a multiple of the alignment {alignment}",
                    t.name,
                    t.offset
                );
            }
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes as u64));
            match end {
                Some(end) if end <= file_len => {}
                _ => bail!(
                    "tensor '{}' ({} bytes at data offset {}) runs past the end of the file ({file_len} bytes): the file is truncated",
                    t.name,
                    t.n_bytes,
                    t.offset
                ),
            }
        }
        Ok(Header {
            version,
            alignment,
            metadata,
            tensors,
            // Within the file (or equal to its length) whenever a tensor exists, by the check above.
            data_start: data_start.min(file_len) as usize,
        })
    }
}

fn align_up(x: u64, alignment: u64) -> u64 {
    x.div_ceil(alignment) * alignment
}

/// A position in the bytes before the data section; every read is checked against the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!(
                "the file ends at byte {} but {what} needs {n} bytes from byte {}: the file is truncated",
                self.bytes.len(),
                self.pos
            );
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A capacity to reserve for `count` items of at least `min_size` bytes each: never more than
    /// what the rest of the file could hold, whatever count a corrupt file claims.
    fn capacity_for(&self, count: u64, min_size: usize) -> usize {
        (count.min(usize::MAX as u64) as usize).min(self.remaining() / min_size)
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64("a string length")?;
        if len > self.remaining() as u64 {
            bail!(
                "a string at byte {} claims {len} bytes but only {} remain: the file is truncated or corrupt",
                self.pos - 8,
                self.remaining()
            );
        }
        let start = self.pos;
        let raw = self.take(len as usize, "a string")?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| anyhow!("the string at byte {start} is not valid UTF-8"))
    }

    fn typed_value(&mut self, depth: usize) -> Result<Value> {
        let id = self.u32("a value type")?;
        let ty = ValueType::from_id(id).ok_or_else(|| anyhow!("unknown value type {id}"))?;
        self.value(ty, depth)
    }

    fn value(&mut self, ty: ValueType, depth: usize) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>("a uint8")?[0]),
            ValueType::I8 => Value::I8(self.array::<1>("an int8")?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array("a uint16")?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array("an int16")?)),
            ValueType::U32 => Value::U32(self.u32("a uint32")?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array("an int32")?)),
            ValueType::U64 => Value::U64(self.u64("a uint64")?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array("an int64")?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array("a float32")?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array("a float64")?)),
            ValueType::Bool => match self.array::<1>("a bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("a bool at byte {} holds {b}, not 0 or 1", self.pos - 1),
            },
            ValueType::String => Value::String(self.string()?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_NESTING {
                    bail!("arrays nested more than {MAX_ARRAY_NESTING} deep");
                }
                let id = self.u32("an array's element type")?;
                let elem = ValueType::from_id(id)
                    .ok_or_else(|| anyhow!("unknown array element type {id}"))?;
                let count = self.u64("an array length")?;
                let fits = count
                    .checked_mul(elem.min_size() as u64)
                    .is_some_and(|n| n <= self.remaining() as u64);
                if !fits {
                    bail!(
                        "an array at byte {} claims {count} elements but only {} bytes remain: the file is truncated or corrupt",
                        self.pos - 12,
                        self.remaining()
                    );
                }
                let mut items = Vec::with_capacity(count as usize);
                for i in 0..count {
                    items.push(
                        self.value(elem, depth + 1)
                            .with_context(|| format!("array element {i} of {count}"))?,
                    );
                }
                Value::Array(items)
            }
        })
    }

    fn tensor_info(&mut self) -> Result<TensorInfo> {
        let name = self.string().context("the tensor name")?;
        let in_tensor = |e: anyhow::Error| e.context(format!("tensor '{name}'"));
        let n_dims = self.u32("the dimension count").map_err(in_tensor)? as usize;
        if n_dims > MAX_DIMS {
            bail!("tensor '{name}' has {n_dims} dimensions; ggml allows at most {MAX_DIMS}");
        }
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            ne.push(self.u64("a dimension").map_err(in_tensor)?);
        }
        let type_id = self.u32("the tensor type").map_err(in_tensor)?;
        let offset = self.u64("the tensor offset").map_err(in_tensor)?;
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| anyhow!("tensor '{name}' has unknown ggml type {type_id}"))?;

        let numel = ne.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let (block_size, block_bytes) = ggml_type.block_layout();
        let n_bytes = numel
            .map(|n| n / block_size as u64)
            .and_then(|blocks| blocks.checked_mul(block_bytes as u64))
            .and_then(|b| usize::try_from(b).ok());
        let (Some(_), Some(n_bytes)) = (numel, n_bytes) else {
            bail!("tensor '{name}' has dimensions {ne:?}, too large to address");
        };
        // Blocks run along the innermost dimension (rows never share a block).
        let row = ne.first().copied().unwrap_or(1);
        if !row.is_multiple_of(block_size as u64) {
            bail!(
                "tensor '{name}' is {ggml_type} (blocks of {block_size}) but its rows have {row} elements, not a multiple of {block_size}"
            );
        }
        let shape = ne
            .iter()
            .rev()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| anyhow!("tensor '{name}' has dimensions {ne:?}, too large to address"))?;
        Ok(TensorInfo {
            name,
            shape,
            ggml_type,
            offset,
            n_bytes,
        })
    }
}
