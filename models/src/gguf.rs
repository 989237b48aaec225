//! GGUF (versions 2 and 3, little-endian) reading, memory-mapped and zero-copy, plus a
//! small writer ([`GgufBuilder`]) for tests and synthetic models.
//!
//! Layout of a GGUF file, all integers little-endian:
//!
//! ```text
//! "GGUF"  u32 version  u64 n_tensors  u64 n_kv
//! n_kv ×      { string key, u32 value type, value }
//! n_tensors × { string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset }
//! padding to `general.alignment` (default 32)
//! tensor data; each tensor at data start + its offset
//! ```
//!
//! A string is a u64 byte length and that many bytes; an array value is a u32 element
//! type, a u64 count and the elements. `ne[0]` is the contiguous (row) dimension.
//!
//! Loading never trusts the file: every read is bounds-checked, every count is weighed
//! against the bytes left before anything is allocated, and every tensor's data range is
//! computed with checked arithmetic and must lie inside the file. Any input gives either
//! a [`GgufFile`] or a one-line [`GgufError`], never a panic.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_kernels::GgmlType;
use kiln_runtime::{HostBytes, WeightSource};

/// The bytes of a model file: a memory map or an owned buffer.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;

const MAGIC: &[u8; 4] = b"GGUF";
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// How deeply arrays may nest (real files nest at most once; the limit keeps a hostile
/// file from exhausting the stack).
const MAX_ARRAY_DEPTH: usize = 8;

/// Errors reading a GGUF file. Messages are one line.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("not a GGUF file (magic {0})")]
    BadMagic(String),
    #[error("unsupported GGUF version {0}")]
    UnsupportedVersion(u32),
    #[error("big-endian GGUF files are not supported")]
    BigEndian,
    #[error("truncated file: {0}")]
    Truncated(String),
    #[error("corrupt GGUF file: {0}")]
    Corrupt(String),
    #[error("duplicate metadata key `{0}`")]
    DuplicateKey(String),
    #[error("duplicate tensor `{0}`")]
    DuplicateTensor(String),
    #[error("tensor `{name}` has unknown type id {id}")]
    UnknownType { name: String, id: u32 },
    #[error("tensor `{name}` has type {ty} (id {id}), which kiln does not support")]
    UnsupportedType { name: String, id: u32, ty: &'static str },
    #[error("tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("tensor `{name}` data (bytes {start}..{end}) lies past the end of the file ({len} bytes)")]
    TensorPastEnd {
        name: String,
        start: u128,
        end: u128,
        len: usize,
    },
    #[error("no tensor named `{0}`")]
    MissingTensor(String),
    #[error("missing metadata key `{0}`")]
    MissingKey(String),
    #[error("metadata key `{key}` is {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------

/// A metadata value.
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
    /// GGUF strings are bytes; invalid UTF-8 is replaced with U+FFFD.
    String(String),
    Array(ArrayValue),
}

/// A metadata array, stored by element type (a 262144-entry vocabulary is one
/// `Vec<String>`, not 262144 boxed values).
#[derive(Clone, Debug, PartialEq)]
pub enum ArrayValue {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    /// An array of arrays; each inner array has its own element type.
    Array(Vec<ArrayValue>),
}

/// GGUF value type ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
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

    /// The fewest bytes one value of this type takes in a file.
    fn min_size(self) -> usize {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 4 + 8,
        }
    }
}

/// Converts any integer value to `T` when it fits.
fn int_to<T: TryFrom<u64> + TryFrom<i64>>(v: &Value) -> Option<T> {
    match *v {
        Value::U8(x) => T::try_from(x as u64).ok(),
        Value::U16(x) => T::try_from(x as u64).ok(),
        Value::U32(x) => T::try_from(x as u64).ok(),
        Value::U64(x) => T::try_from(x).ok(),
        Value::I8(x) => T::try_from(x as i64).ok(),
        Value::I16(x) => T::try_from(x as i64).ok(),
        Value::I32(x) => T::try_from(x as i64).ok(),
        Value::I64(x) => T::try_from(x).ok(),
        _ => None,
    }
}

/// Converts every element of an integer array to `T`, if all fit.
fn int_array_to<T: TryFrom<u64> + TryFrom<i64>>(a: &ArrayValue) -> Option<Vec<T>> {
    fn each<S: Copy, T>(v: &[S], f: impl Fn(S) -> Option<T>) -> Option<Vec<T>> {
        v.iter().map(|&x| f(x)).collect()
    }
    match a {
        ArrayValue::U8(v) => each(v, |x| T::try_from(x as u64).ok()),
        ArrayValue::U16(v) => each(v, |x| T::try_from(x as u64).ok()),
        ArrayValue::U32(v) => each(v, |x| T::try_from(x as u64).ok()),
        ArrayValue::U64(v) => each(v, |x| T::try_from(x).ok()),
        ArrayValue::I8(v) => each(v, |x| T::try_from(x as i64).ok()),
        ArrayValue::I16(v) => each(v, |x| T::try_from(x as i64).ok()),
        ArrayValue::I32(v) => each(v, |x| T::try_from(x as i64).ok()),
        ArrayValue::I64(v) => each(v, |x| T::try_from(x).ok()),
        _ => None,
    }
}

impl Value {
    /// The GGUF name of this value's type: "u32", "string", "array of f32", ...
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(a) => a.type_name(),
        }
    }

    /// Any unsigned integer, or a non-negative signed one.
    pub fn as_u64(&self) -> Option<u64> {
        int_to(self)
    }

    /// Any integer that fits in an i64.
    pub fn as_i64(&self) -> Option<i64> {
        int_to(self)
    }

    /// An f32 or f64 (narrowed), or an integer (converted).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(x) => Some(x),
            Value::F64(x) => Some(x as f32),
            _ => self
                .as_i64()
                .map(|x| x as f32)
                .or_else(|| self.as_u64().map(|x| x as f32)),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&ArrayValue> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl ArrayValue {
    pub fn len(&self) -> usize {
        match self {
            ArrayValue::U8(v) => v.len(),
            ArrayValue::I8(v) => v.len(),
            ArrayValue::U16(v) => v.len(),
            ArrayValue::I16(v) => v.len(),
            ArrayValue::U32(v) => v.len(),
            ArrayValue::I32(v) => v.len(),
            ArrayValue::U64(v) => v.len(),
            ArrayValue::I64(v) => v.len(),
            ArrayValue::F32(v) => v.len(),
            ArrayValue::F64(v) => v.len(),
            ArrayValue::Bool(v) => v.len(),
            ArrayValue::String(v) => v.len(),
            ArrayValue::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// "array of u8", "array of string", ...
    pub fn type_name(&self) -> &'static str {
        match self {
            ArrayValue::U8(_) => "array of u8",
            ArrayValue::I8(_) => "array of i8",
            ArrayValue::U16(_) => "array of u16",
            ArrayValue::I16(_) => "array of i16",
            ArrayValue::U32(_) => "array of u32",
            ArrayValue::I32(_) => "array of i32",
            ArrayValue::U64(_) => "array of u64",
            ArrayValue::I64(_) => "array of i64",
            ArrayValue::F32(_) => "array of f32",
            ArrayValue::F64(_) => "array of f64",
            ArrayValue::Bool(_) => "array of bool",
            ArrayValue::String(_) => "array of string",
            ArrayValue::Array(_) => "array of array",
        }
    }

    /// The elements as strings, when this is a string array.
    pub fn as_strs(&self) -> Option<&[String]> {
        match self {
            ArrayValue::String(v) => Some(v),
            _ => None,
        }
    }

    /// The elements as f32: float arrays (f64 narrowed) or integer arrays (converted).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        match self {
            ArrayValue::F32(v) => Some(v.clone()),
            ArrayValue::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            _ => int_array_to::<i64>(self)
                .map(|v| v.into_iter().map(|x| x as f32).collect())
                .or_else(|| int_array_to::<u64>(self).map(|v| v.into_iter().map(|x| x as f32).collect())),
        }
    }

    /// The elements as i32, when this is an integer array whose elements all fit.
    pub fn to_i32(&self) -> Option<Vec<i32>> {
        int_array_to(self)
    }

    /// The elements as u32, when this is an integer array whose elements all fit.
    pub fn to_u32(&self) -> Option<Vec<u32>> {
        int_array_to(self)
    }

    /// The elements as u64, when this is an integer array whose elements all fit.
    pub fn to_u64(&self) -> Option<Vec<u64>> {
        int_array_to(self)
    }

    fn element_type(&self) -> ValueType {
        match self {
            ArrayValue::U8(_) => ValueType::U8,
            ArrayValue::I8(_) => ValueType::I8,
            ArrayValue::U16(_) => ValueType::U16,
            ArrayValue::I16(_) => ValueType::I16,
            ArrayValue::U32(_) => ValueType::U32,
            ArrayValue::I32(_) => ValueType::I32,
            ArrayValue::U64(_) => ValueType::U64,
            ArrayValue::I64(_) => ValueType::I64,
            ArrayValue::F32(_) => ValueType::F32,
            ArrayValue::F64(_) => ValueType::F64,
            ArrayValue::Bool(_) => ValueType::Bool,
            ArrayValue::String(_) => ValueType::String,
            ArrayValue::Array(_) => ValueType::Array,
        }
    }
}

impl fmt::Display for Value {
    /// Scalars as themselves, strings quoted, arrays by their first few elements.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U8(x) => write!(f, "{x}"),
            Value::I8(x) => write!(f, "{x}"),
            Value::U16(x) => write!(f, "{x}"),
            Value::I16(x) => write!(f, "{x}"),
            Value::U32(x) => write!(f, "{x}"),
            Value::I32(x) => write!(f, "{x}"),
            Value::U64(x) => write!(f, "{x}"),
            Value::I64(x) => write!(f, "{x}"),
            Value::F32(x) => write!(f, "{x}"),
            Value::F64(x) => write!(f, "{x}"),
            Value::Bool(x) => write!(f, "{x}"),
            Value::String(s) => write!(f, "{s:?}"),
            Value::Array(a) => write!(f, "{a}"),
        }
    }
}

impl fmt::Display for ArrayValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 8;
        fn list<T>(f: &mut fmt::Formatter<'_>, v: &[T], show: impl Fn(&T) -> String) -> fmt::Result {
            f.write_str("[")?;
            for (i, x) in v.iter().take(SHOWN).enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                f.write_str(&show(x))?;
            }
            if v.len() > SHOWN {
                write!(f, ", ... ({} elements)", v.len())?;
            }
            f.write_str("]")
        }
        match self {
            ArrayValue::U8(v) => list(f, v, |x| x.to_string()),
            ArrayValue::I8(v) => list(f, v, |x| x.to_string()),
            ArrayValue::U16(v) => list(f, v, |x| x.to_string()),
            ArrayValue::I16(v) => list(f, v, |x| x.to_string()),
            ArrayValue::U32(v) => list(f, v, |x| x.to_string()),
            ArrayValue::I32(v) => list(f, v, |x| x.to_string()),
            ArrayValue::U64(v) => list(f, v, |x| x.to_string()),
            ArrayValue::I64(v) => list(f, v, |x| x.to_string()),
            ArrayValue::F32(v) => list(f, v, |x| x.to_string()),
            ArrayValue::F64(v) => list(f, v, |x| x.to_string()),
            ArrayValue::Bool(v) => list(f, v, |x| x.to_string()),
            ArrayValue::String(v) => list(f, v, |x| format!("{x:?}")),
            ArrayValue::Array(v) => list(f, v, |x| x.to_string()),
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Value {
                Value::$variant(x)
            }
        }
        impl From<Vec<$t>> for ArrayValue {
            fn from(v: Vec<$t>) -> ArrayValue {
                ArrayValue::$variant(v)
            }
        }
        impl From<Vec<$t>> for Value {
            fn from(v: Vec<$t>) -> Value {
                Value::Array(ArrayValue::$variant(v))
            }
        }
        impl From<&[$t]> for Value {
            fn from(v: &[$t]) -> Value {
                Value::Array(ArrayValue::$variant(v.to_vec()))
            }
        }
    )*};
}

value_from!(
    u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32,
    u64 => U64, i64 => I64, f32 => F32, f64 => F64, bool => Bool, String => String,
);

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_owned())
    }
}

impl From<Vec<&str>> for Value {
    fn from(v: Vec<&str>) -> Value {
        Value::Array(ArrayValue::String(v.into_iter().map(str::to_owned).collect()))
    }
}

impl From<&[&str]> for Value {
    fn from(v: &[&str]) -> Value {
        Value::Array(ArrayValue::String(v.iter().map(|s| (*s).to_owned()).collect()))
    }
}

impl From<ArrayValue> for Value {
    fn from(a: ArrayValue) -> Value {
        Value::Array(a)
    }
}

impl From<Vec<ArrayValue>> for Value {
    fn from(v: Vec<ArrayValue>) -> Value {
        Value::Array(ArrayValue::Array(v))
    }
}

// ---------------------------------------------------------------------------------------
// Tensor infos
// ---------------------------------------------------------------------------------------

/// One tensor's entry in the file: its shape, type and where its data lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGUF (ggml `ne`) order: `dims[0]` is the contiguous row length.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section, as stored.
    pub offset: u64,
    /// Where the data lies in the file (absolute byte range, checked to be inside it).
    pub range: Range<usize>,
}

impl TensorInfo {
    /// Elements per row: `dims[0]` (1 for a 0-dimensional tensor).
    pub fn cols(&self) -> usize {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows: the product of `dims[1..]` (1 for a vector).
    pub fn rows(&self) -> usize {
        self.dims.iter().skip(1).product()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// Size of the data in bytes.
    pub fn n_bytes(&self) -> usize {
        self.range.len()
    }
}

/// The ggml names of type ids that exist in ggml but that kiln cannot read.
fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

/// A bounds-checked cursor over the file.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes; `what` (called only on failure) says what was being read.
    fn take(&mut self, n: usize, what: impl FnOnce() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated(format!(
                "{} needs {n} bytes at byte {} but the file has {} bytes",
                what(),
                self.pos,
                self.buf.len()
            )));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> Result<[u8; N]> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in the rest of
    /// the file, so that a corrupt count can never cause a huge allocation.
    fn check_count(&self, count: u64, min_size: usize, what: impl FnOnce() -> String) -> Result<usize> {
        let fits = usize::try_from(count)
            .ok()
            .filter(|&n| n.checked_mul(min_size).is_some_and(|bytes| bytes <= self.remaining()));
        fits.ok_or_else(|| {
            GgufError::Truncated(format!(
                "{} claims {count} entries of at least {min_size} bytes at byte {} but only {} bytes remain",
                what(),
                self.pos,
                self.remaining()
            ))
        })
    }

    fn string(&mut self, what: impl Fn() -> String) -> Result<String> {
        let len = self.u64(|| format!("length of {}", what()))?;
        let len = self.check_count(len, 1, || format!("string {}", what()))?;
        let bytes = self.take(len, &what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value_type(&mut self, what: impl Fn() -> String) -> Result<ValueType> {
        let id = self.u32(|| format!("type of {}", what()))?;
        ValueType::from_id(id).ok_or_else(|| GgufError::Corrupt(format!("{} has unknown value type {id}", what())))
    }

    fn value(&mut self, ty: ValueType, what: &dyn Fn() -> String) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => Value::Bool(self.array::<1>(what)?[0] != 0),
            ValueType::String => Value::String(self.string(what)?),
            ValueType::Array => Value::Array(self.array_value(what, 1)?),
        })
    }

    fn array_value(&mut self, what: &dyn Fn() -> String, depth: usize) -> Result<ArrayValue> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::Corrupt(format!(
                "{} nests arrays more than {MAX_ARRAY_DEPTH} deep",
                what()
            )));
        }
        let ty = self.value_type(|| format!("array elements of {}", what()))?;
        let count = self.u64(|| format!("array length of {}", what()))?;
        let n = self.check_count(count, ty.min_size(), || format!("array {}", what()))?;

        /// Reads `n` fixed-size little-endian numbers in one bounds check.
        fn numbers<const N: usize, T>(
            r: &mut Reader<'_>,
            n: usize,
            what: &dyn Fn() -> String,
            conv: fn([u8; N]) -> T,
        ) -> Result<Vec<T>> {
            // `n * N` cannot overflow: check_count bounded it by the bytes left.
            let bytes = r.take(n * N, what)?;
            Ok(bytes
                .chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    conv(a)
                })
                .collect())
        }

        Ok(match ty {
            ValueType::U8 => ArrayValue::U8(self.take(n, what)?.to_vec()),
            ValueType::I8 => ArrayValue::I8(numbers(self, n, what, i8::from_le_bytes)?),
            ValueType::U16 => ArrayValue::U16(numbers(self, n, what, u16::from_le_bytes)?),
            ValueType::I16 => ArrayValue::I16(numbers(self, n, what, i16::from_le_bytes)?),
            ValueType::U32 => ArrayValue::U32(numbers(self, n, what, u32::from_le_bytes)?),
            ValueType::I32 => ArrayValue::I32(numbers(self, n, what, i32::from_le_bytes)?),
            ValueType::U64 => ArrayValue::U64(numbers(self, n, what, u64::from_le_bytes)?),
            ValueType::I64 => ArrayValue::I64(numbers(self, n, what, i64::from_le_bytes)?),
            ValueType::F32 => ArrayValue::F32(numbers(self, n, what, f32::from_le_bytes)?),
            ValueType::F64 => ArrayValue::F64(numbers(self, n, what, f64::from_le_bytes)?),
            ValueType::Bool => ArrayValue::Bool(self.take(n, what)?.iter().map(|&b| b != 0).collect()),
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(|| format!("element {i} of {}", what()))?);
                }
                ArrayValue::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    let inner = || format!("element {i} of {}", what());
                    v.push(self.array_value(&inner, depth + 1)?);
                }
                ArrayValue::Array(v)
            }
        })
    }
}

/// A GGUF file: its metadata and tensor directory, with the bytes kept mapped so tensors
/// can be handed out as views.
pub struct GgufFile {
    bytes: SharedBytes,
    version: u32,
    metadata: Vec<(String, Value)>,
    keys: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: usize,
    data_start: usize,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("len", &self.len())
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Memory-maps a file read-only; an empty file gives an empty buffer.
pub(crate) fn map_file(path: &Path) -> std::io::Result<SharedBytes> {
    let file = File::open(path)?;
    // SAFETY: the map is read-only. Model files are not expected to change while kiln
    // runs; as with every mmap-based loader, truncating one under us is not supported.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    Ok(Arc::new(map))
}

impl GgufFile {
    /// Memory-maps and parses the file at `path`.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let bytes = map_file(path).map_err(|source| GgufError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(bytes)
    }

    /// Parses a GGUF file held in memory. Tensors are views into `bytes`.
    pub fn from_bytes(bytes: SharedBytes) -> Result<GgufFile> {
        let buf: &[u8] = (*bytes).as_ref();
        let mut r = Reader { buf, pos: 0 };

        // Header.
        let magic = &buf[..buf.len().min(4)];
        if magic.len() < 4 && MAGIC.starts_with(magic) {
            return Err(GgufError::Truncated(format!(
                "{} bytes is too short for a GGUF header",
                buf.len()
            )));
        }
        if magic != MAGIC {
            return Err(GgufError::BadMagic(format!("b\"{}\"", magic.escape_ascii())));
        }
        r.pos = 4;
        let version = r.u32(|| "version".into())?;
        match version {
            2 | 3 => {}
            v if matches!(v.swap_bytes(), 2 | 3) => return Err(GgufError::BigEndian),
            v => return Err(GgufError::UnsupportedVersion(v)),
        }
        let n_tensors = r.u64(|| "tensor count".into())?;
        let n_kv = r.u64(|| "metadata count".into())?;

        // Metadata. Each entry takes at least a key length, a type and one byte.
        let n_kv = r.check_count(n_kv, 8 + 4 + 1, || "metadata count".into())?;
        let mut metadata = Vec::with_capacity(n_kv);
        let mut keys = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = r.string(|| format!("metadata key {i}"))?;
            let what = || format!("metadata `{key}`");
            let ty = r.value_type(what)?;
            let value = r.value(ty, &what)?;
            if keys.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey(key));
            }
            metadata.push((key, value));
        }

        let alignment = match keys.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let v = &metadata[i].1;
                match v.as_u64().and_then(|a| usize::try_from(a).ok()) {
                    Some(a) if a.is_power_of_two() => a,
                    _ => {
                        return Err(GgufError::Corrupt(format!(
                            "general.alignment {v} is not a power of two"
                        )))
                    }
                }
            }
        };

        // Tensor infos. Each takes at least a name length, n_dims, a type and an offset.
        let n_tensors = r.check_count(n_tensors, 8 + 4 + 4 + 8, || "tensor count".into())?;
        let mut raw = Vec::with_capacity(n_tensors);
        let mut by_name = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = r.string(|| format!("name of tensor {i}"))?;
            let what = || format!("tensor `{name}`");
            let n_dims = r.u32(|| format!("dimension count of {}", what()))?;
            if n_dims > MAX_DIMS {
                return Err(GgufError::BadTensor {
                    name,
                    reason: format!("{n_dims} dimensions, at most {MAX_DIMS} are allowed"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(|| format!("dimensions of {}", what()))?);
            }
            let type_id = r.u32(|| format!("type of {}", what()))?;
            let offset = r.u64(|| format!("data offset of {}", what()))?;
            if by_name.insert(name.clone(), i).is_some() {
                return Err(GgufError::DuplicateTensor(name));
            }
            raw.push((name, dims, type_id, offset));
        }

        // Data section.
        let data_start = r.pos.checked_next_multiple_of(alignment).unwrap_or(usize::MAX);
        let tensors = raw
            .into_iter()
            .map(|(name, dims, type_id, offset)| {
                tensor_info(name, dims, type_id, offset, alignment, data_start, buf.len())
            })
            .collect::<Result<Vec<_>>>()?;

        Ok(GgufFile {
            bytes,
            version,
            metadata,
            keys,
            tensors,
            by_name,
            alignment,
            data_start,
        })
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Where the data section starts in the file.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// Size of the file in bytes.
    pub fn len(&self) -> usize {
        (*self.bytes).as_ref().len()
    }

    /// Always false for a parsed file (the header alone takes 24 bytes).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        (*self.bytes).as_ref()
    }

    /// Metadata entries in file order.
    pub fn metadata(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> + '_ {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.keys.get(key).map(|&i| &self.metadata[i].1)
    }

    /// An integer value that fits in u64 (any integer type, negative ones excluded).
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// An integer value that fits in u32.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get_u64(key)?.try_into().ok()
    }

    /// An integer value that fits in usize.
    pub fn get_usize(&self, key: &str) -> Option<usize> {
        self.get_u64(key)?.try_into().ok()
    }

    /// An integer value that fits in i64.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }

    /// An f32 or f64 value (narrowed to f32), or an integer one (converted).
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    pub fn get_array(&self, key: &str) -> Option<&ArrayValue> {
        self.get(key)?.as_array()
    }

    /// A string array (e.g. `tokenizer.ggml.tokens`), without copying.
    pub fn get_str_array(&self, key: &str) -> Option<&[String]> {
        self.get_array(key)?.as_strs()
    }

    /// A float array (f64 narrowed) or integer array (converted), e.g. `tokenizer.ggml.scores`.
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        self.get_array(key)?.to_f32()
    }

    /// An integer array whose elements all fit in i32, e.g. `tokenizer.ggml.token_type`.
    pub fn get_i32_array(&self, key: &str) -> Option<Vec<i32>> {
        self.get_array(key)?.to_i32()
    }

    /// An integer array whose elements all fit in u32.
    pub fn get_u32_array(&self, key: &str) -> Option<Vec<u32>> {
        self.get_array(key)?.to_u32()
    }

    /// `general.architecture` ("llama", "gemma3", "qwen2", ...).
    pub fn architecture(&self) -> Result<&str> {
        const KEY: &str = "general.architecture";
        let v = self.get(KEY).ok_or_else(|| GgufError::MissingKey(KEY.into()))?;
        v.as_str().ok_or_else(|| GgufError::WrongType {
            key: KEY.into(),
            expected: "string",
            found: v.type_name(),
        })
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor's data as a view into the file (no copy).
    pub fn tensor_bytes(&self, name: &str) -> Option<HostBytes> {
        self.tensor(name).map(|info| self.view(info))
    }

    fn view(&self, info: &TensorInfo) -> HostBytes {
        HostBytes::new(self.bytes.clone(), info.range.clone())
            .expect("tensor ranges are checked against the file when it is parsed")
    }

    /// A tensor as a weight: `cols = dims[0]`, `rows` = the product of the other
    /// dimensions, bytes a view into the file (no copy).
    pub fn weight(&self, name: &str) -> Result<WeightSource> {
        let info = self.tensor(name).ok_or_else(|| GgufError::MissingTensor(name.into()))?;
        Ok(WeightSource {
            name: info.name.clone(),
            ty: info.ty,
            rows: info.rows(),
            cols: info.cols(),
            bytes: self.view(info),
        })
    }
}

/// Validates one tensor's type, shape and data range.
fn tensor_info(
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    offset: u64,
    alignment: usize,
    data_start: usize,
    file_len: usize,
) -> Result<TensorInfo> {
    let ty = match GgmlType::from_id(type_id) {
        Some(ty) => ty,
        None => {
            return Err(match ggml_type_name(type_id) {
                Some(ty) => GgufError::UnsupportedType { name, id: type_id, ty },
                None => GgufError::UnknownType { name, id: type_id },
            })
        }
    };
    let bad = |name: String, reason: String| Err(GgufError::BadTensor { name, reason });
    let Ok(dims) = dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
    else {
        return bad(name, format!("dimensions {dims:?} do not fit in memory"));
    };
    let cols = dims.first().copied().unwrap_or(1);
    if cols / ty.block_size() * ty.block_size() != cols {
        return bad(
            name,
            format!(
                "row length {cols} is not a whole number of {ty} blocks of {}",
                ty.block_size()
            ),
        );
    }
    // Not `GgmlType::row_bytes`, which does not check for overflow.
    let row_bytes = (cols / ty.block_size()).checked_mul(ty.type_size());
    let size = dims
        .iter()
        .skip(1)
        .try_fold(row_bytes, |acc, &d| acc?.checked_mul(d).map(Some))
        .flatten();
    // The element count must fit too, for callers that multiply dims out.
    let elements = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let (Some(size), Some(_)) = (size, elements) else {
        return bad(name, format!("dimensions {dims:?} are too large"));
    };
    // `alignment` is a power of two.
    if offset & (alignment as u64 - 1) != 0 {
        return bad(
            name,
            format!("data offset {offset} is not a multiple of the alignment {alignment}"),
        );
    }
    let start = data_start as u128 + offset as u128;
    let end = start + size as u128;
    if end > file_len as u128 {
        return Err(GgufError::TensorPastEnd {
            name,
            start,
            end,
            len: file_len,
        });
    }
    // Both fit in usize now: end <= file_len.
    let range = start as usize..end as usize;
    Ok(TensorInfo {
        name,
        dims,
        ty,
        offset,
        range,
    })
}

// ---------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------

/// Writes GGUF files in memory: metadata and tensors, laid out as llama.cpp does (each
/// tensor's data aligned, offsets in order). For tests and synthetic models.
///
/// ```
/// use kiln_models::gguf::{GgufBuilder, GgufFile};
/// use std::sync::Arc;
///
/// let bytes = GgufBuilder::new()
///     .metadata("general.architecture", "llama")
///     .metadata("llama.block_count", 2u32)
///     .tensor_f32("output_norm.weight", &[4], &[1.0, 1.0, 1.0, 1.0])
///     .build();
/// let file = GgufFile::from_bytes(Arc::new(bytes)).unwrap();
/// assert_eq!(file.architecture().unwrap(), "llama");
/// assert_eq!(file.weight("output_norm.weight").unwrap().cols, 4);
/// ```
#[derive(Clone, Debug)]
pub struct GgufBuilder {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<BuilderTensor>,
}

#[derive(Clone, Debug)]
struct BuilderTensor {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
}

impl Default for GgufBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufBuilder {
    /// An empty version-3 file.
    pub fn new() -> Self {
        GgufBuilder {
            version: 3,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Sets the version written in the header (the layout of 2 and 3 is the same).
    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Sets `general.alignment` (a power of two), which the data layout follows.
    pub fn alignment(&mut self, alignment: u32) -> &mut Self {
        self.metadata("general.alignment", alignment)
    }

    /// Sets a metadata entry, replacing one with the same key.
    pub fn metadata(&mut self, key: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        let (key, value) = (key.into(), value.into());
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Adds a tensor of `dims` (GGUF order: `dims[0]` is the row length) whose data is
    /// already encoded as `ty`.
    ///
    /// # Panics
    /// If `data` is not exactly the size `dims` and `ty` call for.
    pub fn tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[usize],
        ty: GgmlType,
        data: impl Into<Vec<u8>>,
    ) -> &mut Self {
        let (name, data) = (name.into(), data.into());
        let cols = dims.first().copied().unwrap_or(1);
        let size = ty
            .row_bytes(cols)
            .map(|row| row * dims.iter().skip(1).product::<usize>());
        assert_eq!(
            size,
            Some(data.len()),
            "GgufBuilder: tensor `{name}` of {ty} {dims:?} given {} bytes",
            data.len()
        );
        self.tensors.push(BuilderTensor {
            name,
            dims: dims.iter().map(|&d| d as u64).collect(),
            type_id: ty.id(),
            data,
        });
        self
    }

    /// Adds an F32 tensor.
    ///
    /// # Panics
    /// If `data` does not hold exactly the product of `dims` elements.
    pub fn tensor_f32(&mut self, name: impl Into<String>, dims: &[usize], data: &[f32]) -> &mut Self {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, dims, GgmlType::F32, bytes)
    }

    /// The file's bytes.
    pub fn build(&self) -> Vec<u8> {
        self.build_with_layout().0
    }

    /// The file's bytes and, for each tensor, the position of its offset field (tests
    /// patch it to build corrupt files).
    fn build_with_layout(&self) -> (Vec<u8>, Vec<usize>) {
        let alignment = self
            .metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .map_or(DEFAULT_ALIGNMENT, |a| a as usize)
            .max(1);
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            write_value(&mut out, value);
        }
        let mut offset_fields = Vec::with_capacity(self.tensors.len());
        let mut offset = 0usize;
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            offset_fields.push(out.len());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + t.data.len()).next_multiple_of(alignment);
        }
        if !self.tensors.is_empty() {
            out.resize(out.len().next_multiple_of(alignment), 0);
            for t in &self.tensors {
                out.extend_from_slice(&t.data);
                out.resize(out.len().next_multiple_of(alignment), 0);
            }
        }
        (out, offset_fields)
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &Value) -> ValueType {
    match v {
        Value::U8(_) => ValueType::U8,
        Value::I8(_) => ValueType::I8,
        Value::U16(_) => ValueType::U16,
        Value::I16(_) => ValueType::I16,
        Value::U32(_) => ValueType::U32,
        Value::I32(_) => ValueType::I32,
        Value::U64(_) => ValueType::U64,
        Value::I64(_) => ValueType::I64,
        Value::F32(_) => ValueType::F32,
        Value::F64(_) => ValueType::F64,
        Value::Bool(_) => ValueType::Bool,
        Value::String(_) => ValueType::String,
        Value::Array(_) => ValueType::Array,
    }
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(&(value_type(v) as u32).to_le_bytes());
    match v {
        Value::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => write_string(out, s),
        Value::Array(a) => write_array(out, a),
    }
}

fn write_array(out: &mut Vec<u8>, a: &ArrayValue) {
    out.extend_from_slice(&(a.element_type() as u32).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    fn each<T: Copy, const N: usize>(out: &mut Vec<u8>, v: &[T], f: fn(T) -> [u8; N]) {
        for &x in v {
            out.extend_from_slice(&f(x));
        }
    }
    match a {
        ArrayValue::U8(v) => out.extend_from_slice(v),
        ArrayValue::I8(v) => each(out, v, i8::to_le_bytes),
        ArrayValue::U16(v) => each(out, v, u16::to_le_bytes),
        ArrayValue::I16(v) => each(out, v, i16::to_le_bytes),
        ArrayValue::U32(v) => each(out, v, u32::to_le_bytes),
        ArrayValue::I32(v) => each(out, v, i32::to_le_bytes),
        ArrayValue::U64(v) => each(out, v, u64::to_le_bytes),
        ArrayValue::I64(v) => each(out, v, i64::to_le_bytes),
        ArrayValue::F32(v) => each(out, v, f32::to_le_bytes),
        ArrayValue::F64(v) => each(out, v, f64::to_le_bytes),
        ArrayValue::Bool(v) => out.extend(v.iter().map(|&b| b as u8)),
        ArrayValue::String(v) => v.iter().for_each(|s| write_string(out, s)),
        ArrayValue::Array(v) => v.iter().for_each(|inner| write_array(out, inner)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::from_bytes(Arc::new(bytes))
    }

    fn err(bytes: Vec<u8>) -> String {
        match parse(bytes) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    /// One entry of every value type, including empty and nested arrays.
    fn every_value() -> Vec<(&'static str, Value)> {
        vec![
            ("general.architecture", Value::from("llama")),
            ("u8", Value::U8(200)),
            ("i8", Value::I8(-100)),
            ("u16", Value::U16(60000)),
            ("i16", Value::I16(-30000)),
            ("u32", Value::U32(4_000_000_000)),
            ("i32", Value::I32(-2_000_000_000)),
            ("u64", Value::U64(u64::MAX)),
            ("i64", Value::I64(i64::MIN)),
            ("f32", Value::F32(1.5e-6)),
            ("f64", Value::F64(-2.25)),
            ("true", Value::Bool(true)),
            ("false", Value::Bool(false)),
            ("string", Value::from("héllo ▁world")),
            ("empty_string", Value::from("")),
            ("a_u8", Value::from(vec![1u8, 2, 255])),
            ("a_i8", Value::from(vec![-1i8, 2])),
            ("a_u16", Value::from(vec![1u16, 65535])),
            ("a_i16", Value::from(vec![-1i16, 7])),
            ("a_u32", Value::from(vec![1u32, 4_000_000_000])),
            ("a_i32", Value::from(vec![-1i32, 5, 1 << 30])),
            ("a_u64", Value::from(vec![u64::MAX, 3])),
            ("a_i64", Value::from(vec![i64::MIN, 3])),
            ("a_f32", Value::from(vec![0.5f32, -1.0, f32::INFINITY])),
            ("a_f64", Value::from(vec![0.25f64, 1e300])),
            ("a_bool", Value::from(vec![true, false, true])),
            ("a_str", Value::from(vec!["<s>", "", "▁the", "\n"])),
            ("a_empty", Value::from(Vec::<f32>::new())),
            (
                "a_nested",
                Value::from(vec![
                    ArrayValue::from(vec![1u32, 2]),
                    ArrayValue::from(vec!["x".to_string()]),
                    ArrayValue::Array(vec![ArrayValue::from(vec![true])]),
                    ArrayValue::I64(vec![]),
                ]),
            ),
        ]
    }

    fn builder_with_every_value() -> GgufBuilder {
        let mut b = GgufBuilder::new();
        for (k, v) in every_value() {
            b.metadata(k, v);
        }
        b
    }

    /// A small file with metadata and tensors of several types and ranks.
    fn sample() -> GgufBuilder {
        let mut b = builder_with_every_value();
        let q8: Vec<u8> = (0..2 * 34).map(|i| i as u8).collect();
        b.tensor_f32("token_embd.weight", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
            .tensor("blk.0.attn_q.weight", &[32, 2], GgmlType::Q8_0, q8)
            .tensor_f32("output_norm.weight", &[5], &[0.5; 5])
            .tensor("blk.0.ffn_gate_exps.weight", &[2, 2, 2], GgmlType::F16, vec![7u8; 16]);
        b
    }

    #[test]
    fn every_value_type_round_trips() {
        for version in [2, 3] {
            let f = parse(builder_with_every_value().version(version).build()).unwrap();
            assert_eq!(f.version(), version);
            let want = every_value();
            assert_eq!(f.metadata().len(), want.len());
            for ((k, v), (fk, fv)) in want.iter().zip(f.metadata()) {
                assert_eq!((*k, v), (fk, fv));
                assert_eq!(f.get(k), Some(v), "{k}");
            }
            assert!(f.tensors().is_empty());
        }
    }

    #[test]
    fn accessors_convert_what_fits() {
        let f = parse(builder_with_every_value().build()).unwrap();
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.get_u64("u8"), Some(200));
        assert_eq!(f.get_u32("u16"), Some(60000));
        assert_eq!(f.get_usize("u32"), Some(4_000_000_000));
        assert_eq!(f.get_u64("u64"), Some(u64::MAX));
        assert_eq!(f.get_u32("u64"), None, "does not fit");
        assert_eq!(f.get_u64("i8"), None, "negative");
        assert_eq!(f.get_i64("i64"), Some(i64::MIN));
        assert_eq!(f.get_i64("u64"), None);
        assert_eq!(f.get_f32("f32"), Some(1.5e-6));
        assert_eq!(f.get_f32("f64"), Some(-2.25));
        assert_eq!(f.get_f32("u16"), Some(60000.0));
        assert_eq!(f.get_f32("string"), None);
        assert_eq!(f.get_bool("true"), Some(true));
        assert_eq!(f.get_bool("u8"), None);
        assert_eq!(f.get_str("string"), Some("héllo ▁world"));
        assert_eq!(f.get_str("u8"), None);
        assert_eq!(f.get_str("missing"), None);
        assert_eq!(f.get_str_array("a_str").unwrap(), ["<s>", "", "▁the", "\n"]);
        assert_eq!(f.get_str_array("a_u8"), None);
        assert_eq!(f.get_f32_array("a_f32").unwrap()[..2], [0.5, -1.0]);
        assert_eq!(f.get_f32_array("a_f64").unwrap(), [0.25, f32::INFINITY]);
        assert_eq!(f.get_f32_array("a_i32").unwrap(), [-1.0, 5.0, (1 << 30) as f32]);
        assert_eq!(f.get_f32_array("a_empty").unwrap(), Vec::<f32>::new());
        assert_eq!(f.get_i32_array("a_i32").unwrap(), [-1, 5, 1 << 30]);
        assert_eq!(f.get_i32_array("a_u8").unwrap(), [1, 2, 255]);
        assert_eq!(f.get_i32_array("a_u32"), None, "4e9 does not fit in i32");
        assert_eq!(f.get_u32_array("a_u32").unwrap(), [1, 4_000_000_000]);
        assert_eq!(f.get_u32_array("a_i32"), None, "-1 is not a u32");
        assert_eq!(f.get_array("a_nested").unwrap().len(), 4);
        assert_eq!(f.get("a_bool").unwrap().type_name(), "array of bool");
        assert_eq!(f.get("u8").unwrap().to_string(), "200");
        assert_eq!(f.get("a_str").unwrap().to_string(), r#"["<s>", "", "▁the", "\n"]"#);
        let long = Value::from((0..20u32).collect::<Vec<_>>()).to_string();
        assert_eq!(long, "[0, 1, 2, 3, 4, 5, 6, 7, ... (20 elements)]");
    }

    #[test]
    fn architecture_errors_name_the_key() {
        let f = parse(GgufBuilder::new().build()).unwrap();
        assert_eq!(
            f.architecture().unwrap_err().to_string(),
            "missing metadata key `general.architecture`"
        );
        let f = parse(GgufBuilder::new().metadata("general.architecture", 3u32).build()).unwrap();
        assert_eq!(
            f.architecture().unwrap_err().to_string(),
            "metadata key `general.architecture` is u32, expected string"
        );
    }

    #[test]
    fn tensors_are_views_into_the_file() {
        for alignment in [None, Some(1), Some(8), Some(64)] {
            let mut b = sample();
            if let Some(a) = alignment {
                b.alignment(a);
            }
            let f = parse(b.build()).unwrap();
            let align = alignment.map_or(32, |a| a as usize);
            assert_eq!(f.alignment(), align);
            assert_eq!(f.data_start() % align, 0);
            let names: Vec<_> = f.tensors().iter().map(|t| t.name.as_str()).collect();
            assert_eq!(
                names,
                [
                    "token_embd.weight",
                    "blk.0.attn_q.weight",
                    "output_norm.weight",
                    "blk.0.ffn_gate_exps.weight"
                ]
            );

            let w = f.weight("token_embd.weight").unwrap();
            assert_eq!((w.ty, w.rows, w.cols), (GgmlType::F32, 2, 3));
            let floats: Vec<f32> = w
                .bytes
                .as_slice()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(floats, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
            // Zero copy: the view points into the file's own bytes.
            let file = f.bytes().as_ptr_range();
            assert!(file.contains(&w.bytes.as_slice().as_ptr()));
            w.validate().unwrap();

            let q = f.weight("blk.0.attn_q.weight").unwrap();
            assert_eq!((q.ty, q.rows, q.cols), (GgmlType::Q8_0, 2, 32));
            assert_eq!(q.bytes.as_slice(), (0..68).map(|i| i as u8).collect::<Vec<_>>());
            q.validate().unwrap();

            let n = f.weight("output_norm.weight").unwrap();
            assert_eq!((n.rows, n.cols), (1, 5));
            n.validate().unwrap();

            let e = f.tensor("blk.0.ffn_gate_exps.weight").unwrap();
            assert_eq!(e.dims, [2, 2, 2]);
            assert_eq!((e.rows(), e.cols(), e.n_elements(), e.n_bytes()), (4, 2, 8, 16));
            assert_eq!(e.offset % align as u64, 0);
            let ew = f.weight(&e.name).unwrap();
            assert_eq!((ew.rows, ew.cols), (4, 2));
            assert_eq!(ew.bytes.as_slice(), [7u8; 16]);
            ew.validate().unwrap();

            assert!(f.tensor("nope").is_none() && f.tensor_bytes("nope").is_none());
            assert_eq!(
                f.tensor_bytes("output_norm.weight").unwrap().as_slice(),
                n.bytes.as_slice()
            );
            assert_eq!(f.weight("nope").err().unwrap().to_string(), "no tensor named `nope`");
        }
    }

    #[test]
    fn open_maps_a_file() {
        let path = std::env::temp_dir().join(format!("kiln-gguf-test-{}.gguf", std::process::id()));
        std::fs::write(&path, sample().build()).unwrap();
        let f = GgufFile::open(&path);
        std::fs::remove_file(&path).unwrap();
        let f = f.unwrap();
        assert_eq!(f.tensors().len(), 4);
        // The map outlives the file on disk and the GgufFile itself.
        let w = f.weight("output_norm.weight").unwrap();
        drop(f);
        assert_eq!(w.bytes.as_slice()[..4], 0.5f32.to_le_bytes());

        let missing = GgufFile::open(Path::new("/nonexistent/kiln.gguf"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("cannot read `/nonexistent/kiln.gguf`: "),
            "{missing}"
        );
    }

    #[test]
    fn bad_header() {
        assert_eq!(
            err(b"PK\x03\x04rest of a zip file".to_vec()),
            r#"not a GGUF file (magic b"PK\x03\x04")"#
        );
        assert_eq!(
            err(b"GG".to_vec()),
            "truncated file: 2 bytes is too short for a GGUF header"
        );
        assert_eq!(err(b"GX".to_vec()), r#"not a GGUF file (magic b"GX")"#);
        let mut v1 = GgufBuilder::new().build();
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(err(v1), "unsupported GGUF version 1");
        let mut v4 = GgufBuilder::new().build();
        v4[4..8].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(err(v4), "unsupported GGUF version 4");
        let mut be = GgufBuilder::new().build();
        be[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(err(be), "big-endian GGUF files are not supported");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let full = sample().build();
        parse(full.clone()).unwrap();
        // The last tensor's data ends before the final padding: cuts inside the padding
        // still hold every tensor, so they parse.
        let end_of_data = parse(full.clone())
            .unwrap()
            .tensors()
            .iter()
            .map(|t| t.range.end)
            .max()
            .unwrap();
        for len in 0..full.len() {
            let result = parse(full[..len].to_vec());
            if len < end_of_data {
                let e = result.err().unwrap_or_else(|| panic!("prefix of {len} bytes parsed"));
                assert!(!e.to_string().contains('\n'));
            } else {
                assert!(result.is_ok());
            }
        }
    }

    #[test]
    fn mutated_files_never_panic() {
        let full = sample().build();
        // Every byte set to a few interesting values.
        for i in 0..full.len() {
            for b in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut m = full.clone();
                m[i] = b;
                let _ = parse(m);
            }
        }
        // And random multi-byte damage (xorshift, fixed seed).
        let mut s = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for round in 0..40_000 {
            let mut m = full.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % m.len() as u64) as usize;
                if round % 2 == 0 {
                    m[i] = next() as u8;
                } else {
                    // A whole (unaligned) 64-bit field: lengths, counts, dims, offsets.
                    let v = match next() % 4 {
                        0 => next(),
                        1 => next() % 64,
                        2 => u64::MAX - next() % 64,
                        _ => 1 << (next() % 64),
                    };
                    let end = (i + 8).min(m.len());
                    m[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
                }
            }
            let cut = m.len() - (next() % 64) as usize;
            m.truncate(cut);
            if let Ok(f) = parse(m) {
                for t in f.tensors() {
                    f.weight(&t.name).unwrap().validate().unwrap();
                }
            }
        }
    }

    #[test]
    fn tensor_past_the_end() {
        let mut b = GgufBuilder::new();
        b.tensor_f32("x", &[4], &[1.0; 4]);
        let (bytes, offsets) = b.build_with_layout();
        let len = bytes.len();
        let data_start = parse(bytes.clone()).unwrap().data_start();

        let mut past = bytes.clone();
        past[offsets[0]..offsets[0] + 8].copy_from_slice(&32u64.to_le_bytes());
        let (a, z) = (data_start + 32, data_start + 48);
        assert_eq!(
            err(past),
            format!("tensor `x` data (bytes {a}..{z}) lies past the end of the file ({len} bytes)")
        );

        // Offsets that would overflow 64-bit arithmetic.
        let mut huge = bytes.clone();
        huge[offsets[0]..offsets[0] + 8].copy_from_slice(&(!31u64).to_le_bytes());
        assert!(err(huge).contains("lies past the end of the file"));

        let mut misaligned = bytes.clone();
        misaligned[offsets[0]..offsets[0] + 8].copy_from_slice(&4u64.to_le_bytes());
        assert_eq!(
            err(misaligned),
            "tensor `x`: data offset 4 is not a multiple of the alignment 32"
        );

        // The data itself cut short.
        assert!(err(bytes[..data_start + 8].to_vec()).contains("lies past the end"));
    }

    fn raw_tensor(name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> BuilderTensor {
        BuilderTensor {
            name: name.into(),
            dims: dims.to_vec(),
            type_id,
            data,
        }
    }

    #[test]
    fn bad_tensor_types_and_shapes() {
        let mut b = GgufBuilder::new();
        b.tensors.push(raw_tensor("blk.0.attn_q.weight", &[4], 99, vec![0; 16]));
        assert_eq!(err(b.build()), "tensor `blk.0.attn_q.weight` has unknown type id 99");

        let mut b = GgufBuilder::new();
        b.tensors.push(raw_tensor("t", &[256], 23, vec![0; 136]));
        assert_eq!(
            err(b.build()),
            "tensor `t` has type IQ4_XS (id 23), which kiln does not support"
        );

        let mut b = GgufBuilder::new();
        b.tensors
            .push(raw_tensor("q", &[33, 1], GgmlType::Q8_0.id(), vec![0; 34]));
        assert_eq!(
            err(b.build()),
            "tensor `q`: row length 33 is not a whole number of Q8_0 blocks of 32"
        );

        let mut b = GgufBuilder::new();
        b.tensors.push(raw_tensor("five", &[1, 1, 1, 1, 1], 0, vec![0; 4]));
        assert_eq!(err(b.build()), "tensor `five`: 5 dimensions, at most 4 are allowed");

        let mut b = GgufBuilder::new();
        b.tensors.push(raw_tensor("big", &[1 << 40, 1 << 40], 0, vec![0; 4]));
        assert_eq!(
            err(b.build()),
            "tensor `big`: dimensions [1099511627776, 1099511627776] are too large"
        );

        let mut b = GgufBuilder::new();
        b.tensor_f32("dup", &[1], &[1.0])
            .tensor_f32("other", &[1], &[1.0])
            .tensor_f32("dup", &[1], &[2.0]);
        assert_eq!(err(b.build()), "duplicate tensor `dup`");
    }

    #[test]
    fn bad_metadata() {
        let mut b = GgufBuilder::new();
        b.metadata.push(("k".into(), Value::U8(1)));
        b.metadata.push(("k".into(), Value::U8(2)));
        assert_eq!(err(b.build()), "duplicate metadata key `k`");

        let bad_alignment = GgufBuilder::new().metadata("general.alignment", 24u32).build();
        assert_eq!(
            err(bad_alignment),
            "corrupt GGUF file: general.alignment 24 is not a power of two"
        );
        let zero_alignment = GgufBuilder::new().metadata("general.alignment", 0u32).build();
        assert!(err(zero_alignment).contains("not a power of two"));

        // An unknown value type.
        let mut bytes = GgufBuilder::new().metadata("k", 1u8).build();
        let type_at = 24 + 8 + 1;
        bytes[type_at..type_at + 4].copy_from_slice(&13u32.to_le_bytes());
        assert_eq!(err(bytes), "corrupt GGUF file: metadata `k` has unknown value type 13");
    }

    #[test]
    fn absurd_counts_are_rejected_before_allocating() {
        // Array of u32 claiming 2^60 elements.
        let mut bytes = GgufBuilder::new().metadata("tokens", vec![1u32, 2, 3]).build();
        let count_at = 24 + 8 + "tokens".len() + 4 + 4;
        bytes[count_at..count_at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let e = err(bytes);
        assert!(
            e.starts_with("truncated file: array metadata `tokens` claims 1152921504606846976 entries"),
            "{e}"
        );

        // Array of strings claiming u64::MAX elements.
        let mut bytes = GgufBuilder::new().metadata("tokens", vec!["a", "b"]).build();
        bytes[count_at..count_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(bytes).starts_with("truncated file: array metadata `tokens` claims"));

        // A string of absurd length.
        let mut bytes = GgufBuilder::new().metadata("name", "abc").build();
        let len_at = 24 + 8 + 4 + 4;
        bytes[len_at..len_at + 8].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        assert!(err(bytes).starts_with("truncated file: string metadata `name` claims"));

        // Absurd key, tensor and metadata counts.
        let mut bytes = GgufBuilder::new().metadata("k", 1u8).build();
        bytes[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(err(bytes).starts_with("truncated file: string metadata key 0 claims"));
        let mut bytes = GgufBuilder::new().build();
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            err(bytes.clone()).split(" claims").next().unwrap(),
            "truncated file: tensor count"
        );
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            err(bytes).split(" claims").next().unwrap(),
            "truncated file: metadata count"
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // A chain of arrays, each holding one array, 100000 deep.
        let mut bytes = GgufBuilder::new().build();
        bytes[16..24].copy_from_slice(&1u64.to_le_bytes());
        write_string(&mut bytes, "deep");
        bytes.extend_from_slice(&(ValueType::Array as u32).to_le_bytes());
        for _ in 0..100_000 {
            bytes.extend_from_slice(&(ValueType::Array as u32).to_le_bytes());
            bytes.extend_from_slice(&1u64.to_le_bytes());
        }
        assert!(err(bytes).contains("nests arrays more than 8 deep"));
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let mut bytes = GgufBuilder::new().metadata("s", "ab").build();
        let at = bytes.len() - 1;
        bytes[at] = 0xff;
        assert_eq!(parse(bytes).unwrap().get_str("s"), Some("a\u{fffd}"));
    }

    #[test]
    fn large_vocabulary_loads_quickly() {
        let tokens: Vec<String> = (0..262_144).map(|i| format!("tok{i}")).collect();
        let scores: Vec<f32> = (0..262_144).map(|i| i as f32).collect();
        let bytes = GgufBuilder::new()
            .metadata("tokenizer.ggml.tokens", tokens.clone())
            .metadata("tokenizer.ggml.scores", scores.clone())
            .build();
        let t = std::time::Instant::now();
        let f = parse(bytes).unwrap();
        let took = t.elapsed();
        assert_eq!(f.get_str_array("tokenizer.ggml.tokens").unwrap(), tokens);
        assert_eq!(f.get_f32_array("tokenizer.ggml.scores").unwrap(), scores);
        assert!(took.as_secs_f64() < 1.0, "{took:?}");
    }
}
