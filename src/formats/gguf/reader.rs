//! A bounds-checked little-endian cursor over GGUF header bytes: every length and count is
//! checked against the bytes left before anything is allocated or read.

use super::metadata::type_id;
use super::{GgmlType, GgufTensorInfo, MetaArray, MetaValue, MAX_DIMS};

/// Deepest nesting of arrays accepted (llama.cpp itself writes none).
const MAX_ARRAY_DEPTH: usize = 8;

/// A bounds-checked little-endian cursor over the header bytes. Errors are problem strings;
/// the caller adds the file name.
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    /// Bytes consumed so far.
    pub(super) fn pos(&self) -> usize {
        self.pos
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(super) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "{what} needs {n} bytes at offset {} but the file ends after {} (truncated file?)",
                self.pos,
                self.remaining()
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let b = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    pub(super) fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// `count` as a usize, refused when `count` items of at least `min_size` bytes each cannot
    /// fit in what is left of the file.
    pub(super) fn checked_count(
        &self,
        count: u64,
        min_size: usize,
        what: &str,
    ) -> Result<usize, String> {
        let fits = usize::try_from(count).ok().filter(|&n| {
            n.checked_mul(min_size)
                .is_some_and(|b| b <= self.remaining())
        });
        fits.ok_or_else(|| {
            format!(
                "{count} {what} cannot fit in the {} bytes left at offset {} (corrupt count?)",
                self.remaining(),
                self.pos
            )
        })
    }

    pub(super) fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(&format!("the length of {what}"))?;
        let len = self.checked_count(len, 1, &format!("bytes of {what}"))?;
        let start = self.pos;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| format!("{what} at offset {start} is not valid UTF-8"))
    }

    pub(super) fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue, String> {
        Ok(match ty {
            type_id::U8 => MetaValue::U8(self.array::<1>("a u8")?[0]),
            type_id::I8 => MetaValue::I8(i8::from_le_bytes(self.array("an i8")?)),
            type_id::U16 => MetaValue::U16(u16::from_le_bytes(self.array("a u16")?)),
            type_id::I16 => MetaValue::I16(i16::from_le_bytes(self.array("an i16")?)),
            type_id::U32 => MetaValue::U32(self.u32("a u32")?),
            type_id::I32 => MetaValue::I32(i32::from_le_bytes(self.array("an i32")?)),
            type_id::U64 => MetaValue::U64(self.u64("a u64")?),
            type_id::I64 => MetaValue::I64(i64::from_le_bytes(self.array("an i64")?)),
            type_id::F32 => MetaValue::F32(f32::from_le_bytes(self.array("an f32")?)),
            type_id::F64 => MetaValue::F64(f64::from_le_bytes(self.array("an f64")?)),
            type_id::BOOL => MetaValue::Bool(self.bool()?),
            type_id::STRING => MetaValue::String(self.string("a string value")?),
            type_id::ARRAY => MetaValue::Array(self.array_value(depth)?),
            other => return Err(format!("unknown value type {other}")),
        })
    }

    fn bool(&mut self) -> Result<bool, String> {
        match self.array::<1>("a bool")?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!(
                "bool byte {b} at offset {} is not 0 or 1",
                self.pos - 1
            )),
        }
    }

    fn array_value(&mut self, depth: usize) -> Result<MetaArray, String> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(format!(
                "arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
            ));
        }
        let ty = self.u32("an array element type")?;
        let count = self.u64("an array length")?;
        let min_size = match ty {
            type_id::U8 | type_id::I8 | type_id::BOOL => 1,
            type_id::U16 | type_id::I16 => 2,
            type_id::U32 | type_id::I32 | type_id::F32 => 4,
            type_id::U64 | type_id::I64 | type_id::F64 | type_id::STRING => 8,
            type_id::ARRAY => 12,
            other => return Err(format!("unknown array element type {other}")),
        };
        let n = self.checked_count(count, min_size, "array elements")?;
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                let raw = self.take(n * min_size, "array elements")?;
                MetaArray::$variant(
                    raw.chunks_exact(min_size)
                        .map(|c| {
                            <$t>::from_le_bytes(c.try_into().expect("chunk of the type's size"))
                        })
                        .collect(),
                )
            }};
        }
        Ok(match ty {
            type_id::U8 => MetaArray::U8(self.take(n, "array elements")?.to_vec()),
            type_id::I8 => fixed!(I8, i8),
            type_id::U16 => fixed!(U16, u16),
            type_id::I16 => fixed!(I16, i16),
            type_id::U32 => fixed!(U32, u32),
            type_id::I32 => fixed!(I32, i32),
            type_id::U64 => fixed!(U64, u64),
            type_id::I64 => fixed!(I64, i64),
            type_id::F32 => fixed!(F32, f32),
            type_id::F64 => fixed!(F64, f64),
            type_id::BOOL => {
                MetaArray::Bool((0..n).map(|_| self.bool()).collect::<Result<_, _>>()?)
            }
            type_id::STRING => MetaArray::String(
                (0..n)
                    .map(|i| self.string(&format!("array string {i}")))
                    .collect::<Result<_, _>>()?,
            ),
            _ => MetaArray::Array(
                (0..n)
                    .map(|i| {
                        self.array_value(depth + 1)
                            .map_err(|e| format!("inner array {i}: {e}"))
                    })
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    pub(super) fn tensor_info(&mut self) -> Result<GgufTensorInfo, String> {
        let name = self.string("the tensor name")?;
        let in_tensor = |e: String| format!("{name:?}: {e}");
        let n_dims = self.u32("the number of dimensions").map_err(in_tensor)? as usize;
        if n_dims > MAX_DIMS {
            return Err(in_tensor(format!(
                "{n_dims} dimensions (ggml allows at most {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = self.u64("a dimension").map_err(in_tensor)?;
            let d = usize::try_from(d)
                .ok()
                .filter(|&d| d <= i64::MAX as usize)
                .ok_or_else(|| in_tensor(format!("dimension {d} is too large")))?;
            dims.push(d);
        }
        let type_id = self.u32("the tensor type").map_err(in_tensor)?;
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| in_tensor(format!("unknown ggml type {type_id}")))?;
        let offset = self.u64("the tensor offset").map_err(in_tensor)?;
        let offset = usize::try_from(offset)
            .map_err(|_| in_tensor(format!("offset {offset} is too large")))?;
        let numel = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| in_tensor(format!("dimensions {dims:?} overflow")))?;
        let row = dims.first().copied().unwrap_or(1);
        if row % ggml_type.block_size() != 0 {
            return Err(in_tensor(format!(
                "row length {row} is not a multiple of the {ggml_type} block size {}",
                ggml_type.block_size()
            )));
        }
        let size = ggml_type
            .bytes_for(numel)
            .ok_or_else(|| in_tensor(format!("dimensions {dims:?} of {ggml_type} overflow")))?;
        Ok(GgufTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            size,
        })
    }
}
