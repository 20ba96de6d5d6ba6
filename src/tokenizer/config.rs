//! `tokenizer_config.json` (from transformers): BOS/EOS choices and the chat template.

use super::json::{bool_field, At};
use crate::error::{Error, Result};
use serde_json::Value;

/// What the tokenizer config adds to `tokenizer.json`.
#[derive(Debug, Clone, Default)]
pub(crate) struct TokenizerConfig {
    /// `add_bos_token`, if the config states it.
    pub(crate) add_bos_token: Option<bool>,
    /// `add_eos_token`, if the config states it.
    pub(crate) add_eos_token: Option<bool>,
    pub(crate) bos_token: Option<String>,
    pub(crate) eos_token: Option<String>,
    pub(crate) chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Parses the text of a `tokenizer_config.json`; `file` names it in errors.
    pub(crate) fn parse(text: &str, file: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(file, format!("not valid JSON: {e}")))?;
        let at = At::root(file);
        let obj = at.object(&value)?;
        let flag = |key: &str| -> Result<Option<bool>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(_) => bool_field(obj, key, false, &at).map(Some),
            }
        };
        Ok(TokenizerConfig {
            add_bos_token: flag("add_bos_token")?,
            add_eos_token: flag("add_eos_token")?,
            bos_token: token_text(obj.get("bos_token"), &at.key("bos_token"))?,
            eos_token: token_text(obj.get("eos_token"), &at.key("eos_token"))?,
            chat_template: chat_template(obj.get("chat_template"), &at.key("chat_template"))?,
        })
    }
}

/// A special token given as `"<s>"` or as `{"content": "<s>", ...}`.
fn token_text(value: Option<&Value>, at: &At) -> Result<Option<String>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(obj)) => match obj.get("content") {
            Some(v) => Ok(Some(at.key("content").string(v)?.to_owned())),
            None => Err(at.error("a token object needs \"content\"")),
        },
        Some(_) => Err(at.error("expected a token string or {\"content\": ...}")),
    }
}

/// A chat template given as a string or as a list of `{"name", "template"}` (the one named
/// `default` is taken).
fn chat_template(value: Option<&Value>, at: &At) -> Result<Option<String>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            for (i, entry) in list.iter().enumerate() {
                let entry_at = at.index(i);
                let obj = entry_at.object(entry)?;
                if obj.get("name").and_then(Value::as_str) == Some("default") {
                    let template = obj
                        .get("template")
                        .ok_or_else(|| entry_at.error("missing \"template\""))?;
                    return Ok(Some(entry_at.key("template").string(template)?.to_owned()));
                }
            }
            Ok(None)
        }
        Some(_) => Err(at.error("expected a string or a list of named templates")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_flags_tokens_and_template() {
        let c = TokenizerConfig::parse(
            r#"{"add_bos_token": true, "bos_token": {"content": "<s>"}, "eos_token": "</s>",
                "chat_template": [{"name": "tool_use", "template": "x"},
                                  {"name": "default", "template": "{{ bos_token }}"}]}"#,
            "c.json",
        )
        .unwrap();
        assert_eq!(c.add_bos_token, Some(true));
        assert_eq!(c.add_eos_token, None);
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.eos_token.as_deref(), Some("</s>"));
        assert_eq!(c.chat_template.as_deref(), Some("{{ bos_token }}"));
        let err = TokenizerConfig::parse(r#"{"add_eos_token": "yes"}"#, "c.json").unwrap_err();
        assert!(err.to_string().contains("add_eos_token"), "{err}");
    }
}
