//! GGUF (llama.cpp's model file): a memory-mapped, validating reader for versions 2 and 3, and
//! dequantization of its tensors to f32.
//!
//! Layout (all little-endian):
//! ```text
//! "GGUF"  u32 version  u64 tensor_count  u64 metadata_count
//! metadata_count x { string key, u32 value_type, value }
//! tensor_count   x { string name, u32 n_dims, n_dims x u64 dim, u32 ggml_type, u64 offset }
//! padding to `general.alignment` (default 32)
//! data section: tensor `offset`s are relative to its start
//! ```
//! A string is `u64 length` + UTF-8 bytes; an array is `u32 element_type, u64 count, elements`.
//! Dimensions are listed innermost first (`ne[0]` is the row length): the reverse of a torch
//! shape.
//!
//! Every count and length read from the file is checked against the bytes left before anything
//! is allocated or read, so a hostile file costs at most a few times its own size in memory.
//! Any malformed file is one [`Error::Format`] naming the file and the problem; no input panics.

mod dequant;
mod ggml_type;
mod metadata;
mod reader;

pub use dequant::{can_dequantize, dequantize};
pub use ggml_type::GgmlType;
pub use metadata::{MetaArray, MetaValue};

use crate::error::{Error, Result};
use crate::formats::safetensors::MappedFile;
use reader::Reader;
use std::collections::HashMap;
use std::path::Path;

/// The file's first four bytes.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that sets the data alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml's limit on tensor dimensions.
pub const MAX_DIMS: usize = 4;

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Tensor name.
    pub name: String,
    /// Dimensions as the file lists them: innermost (row length) first.
    pub dims: Vec<usize>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// First byte, relative to the data section.
    pub offset: usize,
    /// Number of bytes.
    pub size: usize,
}

impl GgufTensorInfo {
    /// The shape in torch order (outermost first): `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        // Checked not to overflow when the header was parsed.
        self.dims.iter().product()
    }
}

/// A parsed, validated GGUF header.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensor entries in file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// Data alignment in bytes.
    pub alignment: usize,
    /// Offset of the data section from the start of the file.
    pub data_start: usize,
}

/// A GGUF file: its bytes (memory-mapped, or owned) and its validated header.
#[derive(Debug)]
pub struct GgufFile {
    what: String,
    bytes: Source,
    header: GgufHeader,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

#[derive(Debug)]
enum Source {
    Mapped(MappedFile),
    Owned(Vec<u8>),
}

impl GgufFile {
    /// Maps and validates the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = MappedFile::open(path)?;
        let what = path.display().to_string();
        let header = parse_header(file.bytes(), &what)?;
        Ok(Self::new(what, Source::Mapped(file), header))
    }

    /// Validates GGUF `bytes` (copied); `what` names them in errors. Never panics, whatever
    /// the bytes: this is the entry point for fuzzing.
    pub fn parse(bytes: &[u8], what: &str) -> Result<Self> {
        let header = parse_header(bytes, what)?;
        Ok(Self::new(
            what.to_string(),
            Source::Owned(bytes.to_vec()),
            header,
        ))
    }

    fn new(what: String, bytes: Source, header: GgufHeader) -> Self {
        let meta_index = (header.metadata.iter().enumerate())
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = (header.tensors.iter().enumerate())
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        GgufFile {
            what,
            bytes,
            header,
            meta_index,
            tensor_index,
        }
    }

    /// The name used in errors (the path, for opened files).
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The validated header.
    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    /// Tensor entries in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.header.tensors
    }

    /// The entry of tensor `name`, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.header.tensors[i])
    }

    /// The value of metadata `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index
            .get(key)
            .map(|&i| &self.header.metadata[i].1)
    }

    /// The raw bytes of the tensor described by `info` (an entry of this file).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        let all = match &self.bytes {
            Source::Mapped(m) => m.bytes(),
            Source::Owned(v) => v,
        };
        let start = self.header.data_start + info.offset;
        &all[start..start + info.size]
    }

    /// The tensor described by `info`, dequantized to f32, in file (row-major) order.
    pub fn tensor_f32(&self, info: &GgufTensorInfo) -> Result<Vec<f32>> {
        let mut out = vec![0f32; info.numel()];
        let what = format!("{}: tensor {:?}", self.what, info.name);
        dequantize(info.ggml_type, self.tensor_bytes(info), &mut out, &what)?;
        Ok(out)
    }
}

/// Parses and validates a GGUF header held in `bytes`; `what` names the file in errors.
pub fn parse_header(bytes: &[u8], what: &str) -> Result<GgufHeader> {
    parse_header_inner(bytes).map_err(|problem| Error::format(what, problem))
}

fn parse_header_inner(bytes: &[u8]) -> Result<GgufHeader, String> {
    let mut r = Reader::new(bytes);
    let magic = r
        .take(4, "the magic number")
        .map_err(|_| format!("file is {} bytes, too short to be GGUF", bytes.len()))?;
    if magic != MAGIC {
        return Err(format!(
            "bad magic {magic:02x?}: not a GGUF file (expected \"GGUF\")"
        ));
    }
    let version = r.u32("the version")?;
    match version {
        2 | 3 => {}
        1 => return Err("GGUF version 1 is not supported (only 2 and 3)".into()),
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err("big-endian GGUF is not supported".into())
        }
        v => return Err(format!("unknown GGUF version {v} (supported: 2 and 3)")),
    }
    let tensor_count = r.u64("the tensor count")?;
    let meta_count = r.u64("the metadata count")?;
    // Smallest possible entries: a metadata pair is an empty key, a type and a u8 (13 bytes);
    // a tensor info is an empty name, n_dims, type and offset (24 bytes).
    let meta_count = r.checked_count(meta_count, 13, "metadata entries")?;
    let tensor_count = r.checked_count(tensor_count, 24, "tensor infos")?;

    let mut metadata = Vec::with_capacity(meta_count);
    let mut seen = HashMap::with_capacity(meta_count);
    for i in 0..meta_count {
        let key = r.string(&format!("the key of metadata entry {i}"))?;
        if seen.insert(key.clone(), i).is_some() {
            return Err(format!("metadata key {key:?} appears twice"));
        }
        let ty = r.u32(&format!("the type of metadata {key:?}"))?;
        let value = r
            .value(ty, 0)
            .map_err(|e| format!("metadata {key:?}: {e}"))?;
        metadata.push((key, value));
    }

    let alignment = match seen.get(ALIGNMENT_KEY).map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(MetaValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(v) => {
            return Err(format!(
                "{ALIGNMENT_KEY} must be a u32 power of two, found {v:?}"
            ))
        }
    };
    let alignment = usize::try_from(alignment).map_err(|_| "alignment overflows".to_string())?;

    let mut infos = Vec::with_capacity(tensor_count);
    let mut names = HashMap::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let info = r
            .tensor_info()
            .map_err(|e| format!("tensor info {i}: {e}"))?;
        if names.insert(info.name.clone(), i).is_some() {
            return Err(format!("tensor name {:?} appears twice", info.name));
        }
        infos.push(info);
    }

    let data_start = r
        .pos()
        .checked_next_multiple_of(alignment)
        .ok_or("data section offset overflows")?;
    let data_len = bytes.len().saturating_sub(data_start);
    for t in &infos {
        if t.offset % alignment != 0 {
            return Err(format!(
                "tensor {:?}: offset {} is not a multiple of the alignment {alignment}",
                t.name, t.offset
            ));
        }
        let end = t.offset.checked_add(t.size);
        if end.map_or(true, |end| end > data_len) {
            return Err(format!(
                "tensor {:?}: {} bytes at offset {} run past the {data_len}-byte data section \
                 (truncated file?)",
                t.name, t.size, t.offset
            ));
        }
    }
    let mut by_offset: Vec<&GgufTensorInfo> = infos.iter().filter(|t| t.size > 0).collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        if pair[1].offset < pair[0].offset + pair[0].size {
            return Err(format!(
                "tensors {:?} and {:?} overlap",
                pair[0].name, pair[1].name
            ));
        }
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors: infos,
        alignment,
        data_start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::safetensors::SafeTensors;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf")
            .join(name)
    }

    /// A hand-built GGUF: metadata `(key, type id, encoded value)`, tensors
    /// `(name, dims, type id, offset)`, then `data` after padding to 32.
    fn build(
        meta: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, &[u64], u32, u64)],
        data: &[u8],
    ) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((meta.len() as u64).to_le_bytes());
        for (k, ty, v) in meta {
            b.extend(str_bytes(k));
            b.extend(ty.to_le_bytes());
            b.extend(v);
        }
        for (name, dims, ty, offset) in tensors {
            b.extend(str_bytes(name));
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
        }
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend(data);
        b
    }

    fn str_bytes(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend(s.as_bytes());
        v
    }

    fn problem(bytes: &[u8]) -> String {
        match GgufFile::parse(bytes, "t.gguf") {
            Err(Error::Format { what, problem }) => {
                assert_eq!(what, "t.gguf");
                problem
            }
            Err(other) => panic!("expected a format error, got {other:?}"),
            Ok(_) => panic!("expected a format error, the bytes parsed"),
        }
    }

    #[test]
    fn reads_every_metadata_type() {
        let f = GgufFile::open(&fixture("types.gguf")).unwrap();
        assert_eq!(f.header().version, 3);
        assert_eq!(f.header().alignment, 32);
        assert_eq!(
            f.get("general.architecture").unwrap().as_str(),
            Some("test")
        );
        assert_eq!(f.get("t.u8"), Some(&MetaValue::U8(200)));
        assert_eq!(f.get("t.i8"), Some(&MetaValue::I8(-100)));
        assert_eq!(f.get("t.u16"), Some(&MetaValue::U16(60000)));
        assert_eq!(f.get("t.i16"), Some(&MetaValue::I16(-30000)));
        assert_eq!(f.get("t.u32"), Some(&MetaValue::U32(4_000_000_000)));
        assert_eq!(f.get("t.i32"), Some(&MetaValue::I32(-2_000_000_000)));
        assert_eq!(
            f.get("t.u64"),
            Some(&MetaValue::U64(18_000_000_000_000_000_000))
        );
        assert_eq!(
            f.get("t.i64"),
            Some(&MetaValue::I64(-9_000_000_000_000_000_000))
        );
        assert_eq!(f.get("t.f32"), Some(&MetaValue::F32(1.5)));
        assert_eq!(f.get("t.f64"), Some(&MetaValue::F64(-2.25)));
        assert_eq!(f.get("t.bool"), Some(&MetaValue::Bool(true)));
        assert_eq!(f.get("t.string").unwrap().as_str(), Some("héllo"));
        let arr = |k: &str| f.get(k).unwrap().as_array().unwrap().clone();
        assert_eq!(arr("t.arr_i32"), MetaArray::I32(vec![1, -2, 3]));
        assert_eq!(arr("t.arr_str").as_strings().unwrap(), ["a", "bc", ""]);
        assert_eq!(arr("t.arr_f32"), MetaArray::F32(vec![0.5, -1.0]));
        assert_eq!(
            arr("t.nested"),
            MetaArray::Array(vec![MetaArray::I32(vec![1, 2]), MetaArray::I32(vec![3])])
        );
        assert_eq!(f.get("t.u64").unwrap().as_i64(), None, "does not fit");
        assert_eq!(f.get("t.u32").unwrap().as_u64(), Some(4_000_000_000));
    }

    #[test]
    fn dequantizes_like_gguf_py() {
        let f = GgufFile::open(&fixture("types.gguf")).unwrap();
        let expected = SafeTensors::open(&fixture("types_expected.safetensors")).unwrap();
        let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]);
        for info in f.tensors() {
            let want = expected.tensor(&info.name).unwrap();
            assert_eq!(info.shape(), want.shape, "{}", info.name);
            let got = f.tensor_f32(info).unwrap();
            let want = want.to_f32(&info.name).unwrap();
            let same = got
                .iter()
                .zip(want.iter())
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{} ({}) differs from gguf-py",
                info.name, info.ggml_type
            );
        }
    }

    #[test]
    fn every_truncation_is_a_format_error() {
        let bytes = std::fs::read(fixture("types.gguf")).unwrap();
        let f = GgufFile::parse(&bytes, "t").unwrap();
        let header_end = f.header().data_start;
        let data_end = header_end + f.tensors().iter().map(|t| t.offset + t.size).max().unwrap();
        // Cutting the data section keeps the header whole; the last tensor then runs past it.
        for len in (0..header_end).chain([data_end - 1]) {
            problem(&bytes[..len]);
        }
    }

    #[test]
    fn bad_magic_and_versions() {
        let good = build(&[], &[], &[]);
        assert!(GgufFile::parse(&good, "t").is_ok());
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(problem(&bad).contains("not a GGUF file"));
        for (version, says) in [
            (1u32, "version 1 is not supported"),
            (3u32.swap_bytes(), "big-endian"),
            (7, "unknown GGUF version 7"),
        ] {
            let mut b = good.clone();
            b[4..8].copy_from_slice(&version.to_le_bytes());
            assert!(problem(&b).contains(says), "{version}");
        }
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut b = build(&[], &[], &[]);
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(problem(&b).contains("tensor infos cannot fit"));
        let mut b = build(&[], &[], &[]);
        b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(problem(&b).contains("metadata entries cannot fit"));
        let mut array = 4u32.to_le_bytes().to_vec(); // u32 elements
        array.extend(u64::MAX.to_le_bytes());
        let b = build(&[("a", 9, array)], &[], &[]);
        assert!(problem(&b).contains("array elements cannot fit"));
        let mut string = u64::MAX.to_le_bytes().to_vec();
        string.extend(b"x");
        let b = build(&[("s", 8, string)], &[], &[]);
        assert!(problem(&b).contains("cannot fit"));
    }

    #[test]
    fn tensor_data_out_of_range() {
        let data = vec![0u8; 64];
        let ok = build(&[], &[("w", &[4, 4], 0, 0)], &data);
        let f = GgufFile::parse(&ok, "t").unwrap();
        assert_eq!(f.tensors()[0].shape(), [4, 4]);
        assert_eq!(f.tensor_f32(&f.tensors()[0]).unwrap(), vec![0.0; 16]);
        let past = build(&[], &[("w", &[4, 4], 0, 32)], &data);
        assert!(problem(&past).contains("run past"));
        let huge = build(&[], &[("w", &[1 << 62, 1 << 62], 0, 0)], &data);
        assert!(problem(&huge).contains("overflow"));
        let unaligned = build(&[], &[("w", &[4], 0, 4)], &data);
        assert!(problem(&unaligned).contains("not a multiple of the alignment"));
        let overlap = build(&[], &[("a", &[16], 0, 0), ("b", &[4], 0, 32)], &data);
        assert!(problem(&overlap).contains("overlap"));
        let partial_block = build(&[], &[("q", &[16], 8, 0)], &data);
        assert!(problem(&partial_block).contains("not a multiple of the Q8_0 block size"));
        let dims5 = build(&[], &[("w", &[1, 1, 1, 1, 1], 0, 0)], &data);
        assert!(problem(&dims5).contains("5 dimensions"));
    }

    #[test]
    fn unknown_types_and_bad_values() {
        let data = vec![0u8; 64];
        let b = build(&[], &[("w", &[4], 4, 0)], &data);
        assert!(problem(&b).contains("unknown ggml type 4"));
        let b = build(&[("k", 13, vec![0])], &[], &[]);
        assert!(problem(&b).contains("unknown value type 13"));
        let b = build(&[("k", 7, vec![2])], &[], &[]);
        assert!(problem(&b).contains("not 0 or 1"));
        let b = build(&[("k", 8, str_bytes("\u{ff}")[..9].to_vec())], &[], &[]);
        assert!(problem(&b).contains("not valid UTF-8"));
        let b = build(&[("k", 0, vec![1]), ("k", 0, vec![2])], &[], &[]);
        assert!(problem(&b).contains("appears twice"));
        let b = build(
            &[(ALIGNMENT_KEY, 4, 24u32.to_le_bytes().to_vec())],
            &[],
            &[],
        );
        assert!(problem(&b).contains("power of two"));
        let mut deep = Vec::new();
        for _ in 0..20 {
            deep.extend(9u32.to_le_bytes());
            deep.extend(1u64.to_le_bytes());
        }
        let b = build(&[("deep", 9, deep)], &[], &[]);
        assert!(problem(&b).contains("nested deeper"));
    }

    #[test]
    fn unimplemented_types_parse_but_do_not_dequantize() {
        let data = vec![0u8; 224];
        let b = build(&[], &[("k", &[256], GgmlType::Q6K.id(), 0)], &data);
        let f = GgufFile::parse(&b, "t").unwrap();
        assert_eq!(f.tensors()[0].size, 210);
        assert!(matches!(
            f.tensor_f32(&f.tensors()[0]),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn random_corruption_never_panics() {
        // A fixed xorshift stream flips, overwrites and cuts bytes of real files; every result
        // must parse or fail cleanly, and whatever parses must dequantize or fail cleanly.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for name in ["types.gguf", "tiny_llama.gguf"] {
            let original = std::fs::read(fixture(name)).unwrap();
            let header_len = GgufFile::parse(&original, "t").unwrap().header().data_start;
            for _ in 0..1500 {
                let mut bytes = original.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % header_len;
                    bytes[at] = match next() % 3 {
                        0 => bytes[at] ^ (1 << (next() % 8)),
                        1 => 0xFF,
                        _ => next() as u8,
                    };
                }
                if next() % 4 == 0 {
                    bytes.truncate((next() as usize) % bytes.len());
                }
                if let Ok(f) = GgufFile::parse(&bytes, "t") {
                    for info in f.tensors() {
                        let _ = f.tensor_f32(info);
                    }
                }
            }
        }
    }
}
