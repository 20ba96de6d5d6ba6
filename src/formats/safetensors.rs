//! safetensors: a memory-mapped, validating reader and an atomic writer.
//!
//! Layout: `u64` little-endian header length `n`, `n` bytes of JSON
//! (`{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`),
//! then the data section; offsets are relative to its start.
//!
//! The reader checks everything before handing out a byte: the header fits in the file, the JSON
//! has the right shape, dtypes are known, `shape x dtype size == end - begin`, every range lies
//! inside the data section and no two overlap. A malformed file is one [`Error::Format`] naming
//! the file and the problem.

use crate::error::{Error, Result};
use crate::fsutil;
use crate::tensor::{checked_numel, DType, TensorView};
use memmap2::Mmap;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Headers larger than this are refused (the format's own reference refuses 100 MB too).
const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor's entry in the header. `begin..end` is relative to the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// First byte, relative to the data section.
    pub begin: usize,
    /// One past the last byte, relative to the data section.
    pub end: usize,
}

/// A parsed and validated header.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// Tensors in the order the header lists them.
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` string map.
    pub metadata: BTreeMap<String, String>,
    /// Offset of the data section from the file's start (8 + header length).
    pub data_start: usize,
}

/// Parses and validates the header of a safetensors file held in `bytes`.
/// `what` names the file in errors. Never reads out of bounds, never panics.
pub fn parse_header(bytes: &[u8], what: &str) -> Result<Header> {
    let bad = |problem: String| Error::format(what, problem);
    if bytes.len() < 8 {
        return Err(bad(format!(
            "file is {} bytes, too short for a safetensors header",
            bytes.len()
        )));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_LEN {
        return Err(bad(format!(
            "header length {n} is larger than the {MAX_HEADER_LEN}-byte limit"
        )));
    }
    let available = (bytes.len() - 8) as u64;
    if n > available {
        return Err(bad(format!(
            "header length {n} is larger than the {available} bytes after it (truncated file?)"
        )));
    }
    let data_start = 8 + n as usize;
    let json: Value = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let Value::Object(entries) = json else {
        return Err(bad("header is not a JSON object".into()));
    };
    let data_len = bytes.len() - data_start;
    let mut header = Header {
        data_start,
        ..Header::default()
    };
    for (name, entry) in &entries {
        if name == "__metadata__" {
            header.metadata = parse_metadata(entry).map_err(bad)?;
            continue;
        }
        let info =
            parse_entry(name, entry, data_len).map_err(|p| bad(format!("tensor {name:?}: {p}")))?;
        header.tensors.push(info);
    }
    let mut by_start: Vec<&TensorInfo> = header.tensors.iter().collect();
    by_start.sort_by_key(|t| (t.begin, t.end));
    for pair in by_start.windows(2) {
        if pair[1].begin < pair[0].end {
            return Err(bad(format!(
                "tensors {:?} ({}..{}) and {:?} ({}..{}) overlap",
                pair[0].name, pair[0].begin, pair[0].end, pair[1].name, pair[1].begin, pair[1].end
            )));
        }
    }
    Ok(header)
}

fn parse_metadata(value: &Value) -> Result<BTreeMap<String, String>, String> {
    let Value::Object(map) = value else {
        return Err("__metadata__ is not a JSON object".into());
    };
    map.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(format!("__metadata__ value for {k:?} is not a string")),
        })
        .collect()
}

fn parse_entry(name: &str, entry: &Value, data_len: usize) -> Result<TensorInfo, String> {
    let Value::Object(fields) = entry else {
        return Err("entry is not a JSON object".into());
    };
    let dtype_name = fields
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or("missing string field \"dtype\"")?;
    let dtype =
        DType::from_name(dtype_name).ok_or_else(|| format!("unknown dtype {dtype_name:?}"))?;
    let shape = fields
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("missing array field \"shape\"")?
        .iter()
        .map(|d| {
            d.as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .ok_or("shape holds a non-integer or negative size")
        })
        .collect::<Result<Vec<usize>, _>>()?;
    let offsets = fields
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .ok_or("missing field \"data_offsets\" of two integers")?;
    let offset = |v: &Value| {
        v.as_u64()
            .and_then(|o| usize::try_from(o).ok())
            .ok_or("data_offsets holds a non-integer")
    };
    let (begin, end) = (offset(&offsets[0])?, offset(&offsets[1])?);
    if begin > end {
        return Err(format!("data_offsets [{begin}, {end}] run backwards"));
    }
    let bytes = checked_numel(&shape)
        .and_then(|n| n.checked_mul(dtype.size()))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if end - begin != bytes {
        return Err(format!(
            "shape {shape:?} of {dtype} needs {bytes} bytes but data_offsets [{begin}, {end}] give {}",
            end - begin
        ));
    }
    if end > data_len {
        return Err(format!(
            "data_offsets [{begin}, {end}] run past the {data_len}-byte data section (truncated file?)"
        ));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

/// A read-only memory map of a whole file.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    map: Option<Mmap>,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        // An empty file cannot be mapped on every platform; it has no bytes to read anyway.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only and private to this process. The one hazard, another
            // process truncating or rewriting the file while it is mapped, is outside what any
            // mmap user can prevent; model files are treated as immutable while in use, as every
            // safetensors loader does.
            Some(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?)
        };
        Ok(MappedFile {
            path: path.to_path_buf(),
            map,
        })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A memory-mapped, validated safetensors file.
#[derive(Debug)]
pub struct SafeTensors {
    file: Arc<MappedFile>,
    header: Header,
    index: HashMap<String, usize>,
}

impl SafeTensors {
    /// Maps and validates `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = MappedFile::open(path)?;
        let header = parse_header(file.bytes(), &path.display().to_string())?;
        let index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(SafeTensors {
            file: Arc::new(file),
            header,
            index,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Tensor entries in header order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.header.metadata
    }

    /// The entry for `name`, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.header.tensors[i])
    }

    /// A zero-copy view of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let info = self.info(name).ok_or_else(|| {
            Error::format(self.path().display(), format!("no tensor named {name:?}"))
        })?;
        Ok(self.view(info))
    }

    /// A zero-copy view of the tensor described by `info` (an entry of this file).
    pub fn view<'a>(&'a self, info: &'a TensorInfo) -> TensorView<'a> {
        let start = self.header.data_start;
        TensorView {
            dtype: info.dtype,
            shape: &info.shape,
            bytes: &self.file.bytes()[start + info.begin..start + info.end],
        }
    }
}

/// One tensor to write: name, dtype, shape and exactly `numel x dtype size` bytes.
#[derive(Clone, Debug)]
pub struct OwnedTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Little-endian element bytes.
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    /// A tensor from its parts; fails if the byte count does not match the shape.
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    ) -> Result<Self> {
        let name = name.into();
        let want = checked_numel(&shape).and_then(|n| n.checked_mul(dtype.size()));
        if want != Some(bytes.len()) {
            return Err(Error::invalid(format!(
                "tensor {name:?}: {} bytes do not fill shape {shape:?} of {dtype}",
                bytes.len()
            )));
        }
        Ok(OwnedTensor {
            name,
            dtype,
            shape,
            bytes,
        })
    }

    /// An f32 tensor.
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Result<Self> {
        Self::new(
            name,
            DType::F32,
            shape,
            bytemuck::cast_slice(values).to_vec(),
        )
    }

    /// A borrowed view of this tensor.
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            dtype: self.dtype,
            shape: &self.shape,
            bytes: &self.bytes,
        }
    }
}

/// Serialises tensors and metadata into safetensors bytes, header padded to 8 bytes.
/// Tensors are laid out in the order given. Fails on a duplicate name.
pub fn serialize(
    tensors: &[OwnedTensor],
    metadata: &BTreeMap<String, String>,
    out: &mut dyn Write,
) -> Result<()> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        let meta: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), Value::Object(meta));
    }
    let mut offset = 0usize;
    for t in tensors {
        if t.name == "__metadata__" || header.contains_key(&t.name) {
            return Err(Error::invalid(format!(
                "tensor name {:?} is used twice or reserved",
                t.name
            )));
        }
        let end = offset + t.bytes.len();
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json =
        serde_json::to_vec(&Value::Object(header)).expect("a JSON map always serialises");
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let io = |e| Error::io("<safetensors output>", e);
    out.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&json).map_err(io)?;
    for t in tensors {
        out.write_all(&t.bytes).map_err(io)?;
    }
    Ok(())
}

/// Writes a safetensors file atomically (temporary file, then rename).
pub fn write_file(
    path: &Path,
    tensors: &[OwnedTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    fsutil::write_atomic(path, |w| {
        serialize(tensors, metadata, w).map_err(|e| match e {
            Error::Io { source, .. } => Error::io(path, source),
            other => other,
        })
    })
}

/// The name of the shard index next to sharded checkpoints.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The safetensors weights of a model folder: one `model.safetensors`, or shards listed by
/// `model.safetensors.index.json`. Looks tensors up by name across shards.
#[derive(Debug)]
pub struct ModelWeights {
    shards: Vec<SafeTensors>,
    location: HashMap<String, usize>,
}

impl ModelWeights {
    /// Opens the weights in folder `dir` (or a single `.safetensors` file).
    pub fn open(dir: &Path) -> Result<Self> {
        if dir.is_file() {
            return Self::from_shards(vec![SafeTensors::open(dir)?]);
        }
        let single = dir.join("model.safetensors");
        let index = dir.join(INDEX_FILE);
        if single.is_file() {
            return Self::from_shards(vec![SafeTensors::open(&single)?]);
        }
        if !index.is_file() {
            return Err(Error::invalid(format!(
                "{}: no model.safetensors or {INDEX_FILE} (is this a Hugging Face model folder?)",
                dir.display()
            )));
        }
        let json = fsutil::read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::format(index.display(), "no \"weight_map\" object"))?;
        let mut files: Vec<String> = Vec::new();
        let mut wanted: Vec<(String, String)> = Vec::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .filter(|f| !f.contains('/') && !f.contains('\\') && *f != ".." && !f.is_empty())
                .ok_or_else(|| {
                    Error::format(
                        index.display(),
                        format!("weight_map entry {name:?} is not a plain file name"),
                    )
                })?;
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
            wanted.push((name.clone(), file.to_string()));
        }
        let shards = files
            .iter()
            .map(|f| SafeTensors::open(&dir.join(f)))
            .collect::<Result<Vec<_>>>()?;
        for (name, file) in &wanted {
            let shard = &shards[files.iter().position(|f| f == file).expect("listed above")];
            if shard.info(name).is_none() {
                return Err(Error::format(
                    index.display(),
                    format!("lists {name:?} in {file}, which does not hold it"),
                ));
            }
        }
        Self::from_shards(shards)
    }

    fn from_shards(shards: Vec<SafeTensors>) -> Result<Self> {
        let mut location = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for t in shard.tensors() {
                if location.insert(t.name.clone(), i).is_some() {
                    return Err(Error::format(
                        shard.path().display(),
                        format!("tensor {:?} appears in two shards", t.name),
                    ));
                }
            }
        }
        Ok(ModelWeights { shards, location })
    }

    /// The shard files, in index order.
    pub fn shards(&self) -> &[SafeTensors] {
        &self.shards
    }

    /// True if a tensor named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// A zero-copy view of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        match self.location.get(name) {
            Some(&i) => self.shards[i].tensor(name),
            None => Err(Error::format(
                self.shards
                    .first()
                    .map(|s| s.path().display().to_string())
                    .unwrap_or_default(),
                format!("the model has no tensor named {name:?}"),
            )),
        }
    }

    /// Every tensor name, in shard then header order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.shards
            .iter()
            .flat_map(|s| s.tensors().iter().map(|t| t.name.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_header(json: &str, data_len: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.resize(v.len() + data_len, 7);
        v
    }

    #[test]
    fn round_trip() {
        let a = OwnedTensor::from_f32("a", vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let b = OwnedTensor::new("b", DType::U8, vec![3], vec![9, 8, 7]).unwrap();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut bytes = Vec::new();
        serialize(&[a.clone(), b.clone()], &meta, &mut bytes).unwrap();
        let h = parse_header(&bytes, "mem").unwrap();
        assert_eq!(h.metadata, meta);
        assert_eq!(h.data_start % 8, 0);
        assert_eq!(h.tensors[0].shape, vec![2, 3]);
        let t = &h.tensors[1];
        assert_eq!(
            &bytes[h.data_start + t.begin..h.data_start + t.end],
            &[9, 8, 7]
        );
    }

    #[test]
    fn rejects_malformed_headers() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 2, 3], "too short"),
            (file_with_header("{}", 0)[..9].to_vec(), "larger than"),
            (file_with_header("{not json", 0), "not valid JSON"),
            (file_with_header("[]", 0), "not a JSON object"),
            (
                file_with_header(
                    r#"{"a":{"dtype":"F31","shape":[1],"data_offsets":[0,4]}}"#,
                    4,
                ),
                "unknown dtype",
            ),
            (
                file_with_header(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                    8,
                ),
                "needs 8 bytes",
            ),
            (
                file_with_header(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                    4,
                ),
                "run past",
            ),
            (
                file_with_header(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                    8,
                ),
                "overlap",
            ),
            (
                file_with_header(r#"{"__metadata__":{"k":1}}"#, 0),
                "not a string",
            ),
            (
                file_with_header(
                    r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}}"#,
                    0,
                ),
                "negative",
            ),
            (
                file_with_header(
                    r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#,
                    0,
                ),
                "overflows",
            ),
        ];
        for (bytes, want) in cases {
            let err = parse_header(&bytes, "t.safetensors")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(want) && err.starts_with("t.safetensors"),
                "{err:?} lacks {want:?}"
            );
        }
    }
}
