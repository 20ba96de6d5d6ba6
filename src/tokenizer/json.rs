//! Typed access to `tokenizer.json` fields, with errors that name the file and the field.

use crate::error::{Error, Result};
use serde_json::{Map, Value};

/// Where in which file a JSON value sits: `file` names the file, `path` the field
/// (`pre_tokenizer.pretokenizers[1]`).
#[derive(Debug, Clone)]
pub(crate) struct At<'a> {
    file: &'a str,
    path: String,
}

impl<'a> At<'a> {
    /// The root of `file`.
    pub(crate) fn root(file: &'a str) -> Self {
        At {
            file,
            path: String::new(),
        }
    }

    /// The field `key` below this one.
    pub(crate) fn key(&self, key: &str) -> At<'a> {
        let path = if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        };
        At {
            file: self.file,
            path,
        }
    }

    /// Element `index` of the array here.
    pub(crate) fn index(&self, index: usize) -> At<'a> {
        At {
            file: self.file,
            path: format!("{}[{index}]", self.path),
        }
    }

    /// A format error at this field.
    pub(crate) fn error(&self, problem: impl std::fmt::Display) -> Error {
        Error::format(self.file, format!("`{}`: {problem}", self.path))
    }

    /// An unsupported-feature error at this field.
    pub(crate) fn unsupported(&self, what: impl std::fmt::Display) -> Error {
        Error::unsupported(format!("{}: `{}`: {what}", self.file, self.path))
    }

    /// `value` as an object.
    pub(crate) fn object<'v>(&self, value: &'v Value) -> Result<&'v Map<String, Value>> {
        value
            .as_object()
            .ok_or_else(|| self.error("expected a JSON object"))
    }

    /// `value` as an array.
    pub(crate) fn array<'v>(&self, value: &'v Value) -> Result<&'v Vec<Value>> {
        value
            .as_array()
            .ok_or_else(|| self.error("expected a JSON array"))
    }

    /// `value` as a string.
    pub(crate) fn string<'v>(&self, value: &'v Value) -> Result<&'v str> {
        value
            .as_str()
            .ok_or_else(|| self.error("expected a string"))
    }

    /// `value` as a token id.
    pub(crate) fn id(&self, value: &Value) -> Result<u32> {
        value
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| self.error("expected a token id (an integer below 2^32)"))
    }
}

/// A required field of `obj`.
pub(crate) fn field<'v>(obj: &'v Map<String, Value>, key: &str, at: &At) -> Result<&'v Value> {
    obj.get(key)
        .ok_or_else(|| at.key(key).error("missing field"))
}

/// A required string field.
pub(crate) fn str_field<'v>(obj: &'v Map<String, Value>, key: &str, at: &At) -> Result<&'v str> {
    at.key(key).string(field(obj, key, at)?)
}

/// An optional string field (absent or null is `None`).
pub(crate) fn opt_str_field<'v>(
    obj: &'v Map<String, Value>,
    key: &str,
    at: &At,
) -> Result<Option<&'v str>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => at.key(key).string(v).map(Some),
    }
}

/// An optional boolean field, `default` when absent or null.
pub(crate) fn bool_field(
    obj: &Map<String, Value>,
    key: &str,
    default: bool,
    at: &At,
) -> Result<bool> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| at.key(key).error("expected true or false")),
    }
}

/// The `type` tag of a component object.
pub(crate) fn type_tag<'v>(obj: &'v Map<String, Value>, at: &At) -> Result<&'v str> {
    str_field(obj, "type", at)
}
