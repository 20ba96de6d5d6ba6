//! Normalizers: text rewrites applied before pre-tokenization (SentencePiece-style LLaMA
//! tokenizers prepend `▁` and turn spaces into `▁`).

use super::json::{field, str_field, type_tag, At};
use crate::error::Result;
use serde_json::Value;

/// A `tokenizer.json` normalizer this engine implements.
#[derive(Debug, Clone)]
pub(crate) enum Normalizer {
    /// Each in turn.
    Sequence(Vec<Normalizer>),
    /// Puts `0` in front of any non-empty text.
    Prepend(String),
    /// Replaces every occurrence of `pattern` by `content`.
    Replace {
        /// The literal text to find (never empty).
        pattern: String,
        /// What replaces it.
        content: String,
    },
}

impl Normalizer {
    /// Parses the normalizer object `value` found at `at`.
    pub(crate) fn from_json(value: &Value, at: &At) -> Result<Self> {
        let obj = at.object(value)?;
        match type_tag(obj, at)? {
            "Sequence" => {
                let list_at = at.key("normalizers");
                let list = list_at.array(field(obj, "normalizers", at)?)?;
                let parts = list
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Normalizer::from_json(v, &list_at.index(i)))
                    .collect::<Result<_>>()?;
                Ok(Normalizer::Sequence(parts))
            }
            "Prepend" => Ok(Normalizer::Prepend(
                str_field(obj, "prepend", at)?.to_owned(),
            )),
            "Replace" => {
                let pattern = literal_pattern(obj, at)?;
                let content = str_field(obj, "content", at)?.to_owned();
                Ok(Normalizer::Replace { pattern, content })
            }
            other => Err(at.key("type").unsupported(format!(
                "normalizer {other:?} (supported: Sequence, Prepend, Replace)"
            ))),
        }
    }

    /// Rewrites `text` in place.
    pub(crate) fn normalize(&self, text: &mut String) {
        match self {
            Normalizer::Sequence(parts) => parts.iter().for_each(|n| n.normalize(text)),
            Normalizer::Prepend(prefix) => {
                if !text.is_empty() {
                    text.insert_str(0, prefix);
                }
            }
            Normalizer::Replace { pattern, content } => {
                if text.contains(pattern.as_str()) {
                    *text = text.replace(pattern.as_str(), content);
                }
            }
        }
    }
}

/// The literal `{"String": ...}` pattern of a Replace normalizer or decoder.
pub(crate) fn literal_pattern(obj: &serde_json::Map<String, Value>, at: &At) -> Result<String> {
    let pattern_at = at.key("pattern");
    let pattern = pattern_at.object(field(obj, "pattern", at)?)?;
    match pattern.get("String") {
        Some(v) => {
            let s = pattern_at.key("String").string(v)?;
            if s.is_empty() {
                return Err(pattern_at.key("String").error("empty pattern"));
            }
            Ok(s.to_owned())
        }
        None => Err(pattern_at.unsupported(
            "only literal {\"String\": ...} patterns are supported here, not regexes",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentencepiece_normalizer() {
        let json: Value = serde_json::from_str(
            r#"{"type":"Sequence","normalizers":[{"type":"Prepend","prepend":"▁"},
                {"type":"Replace","pattern":{"String":" "},"content":"▁"}]}"#,
        )
        .unwrap();
        let n = Normalizer::from_json(&json, &At::root("t.json")).unwrap();
        let mut s = String::from("Hello  world ");
        n.normalize(&mut s);
        assert_eq!(s, "▁Hello▁▁world▁");
        let mut empty = String::new();
        n.normalize(&mut empty);
        assert_eq!(empty, "");
    }

    #[test]
    fn unknown_normalizer_names_the_field() {
        let json: Value = serde_json::from_str(r#"{"type":"NFKC"}"#).unwrap();
        let err = Normalizer::from_json(&json, &At::root("t.json").key("normalizer"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("normalizer.type") && err.contains("NFKC"),
            "{err}"
        );
    }
}
