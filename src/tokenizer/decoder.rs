//! Decoders: turn the tokens of a sequence back into text (byte-level respelling, `▁` to space,
//! `<0xNN>` byte tokens to UTF-8, ...). Each works on the whole list of token strings, as HF's
//! `decode_chain` does.

use super::byte_level::char_to_byte;
use super::json::{field, type_tag, At};
use super::normalizer::literal_pattern;
use crate::error::Result;
use serde_json::Value;

/// A `tokenizer.json` decoder this engine implements.
#[derive(Debug, Clone)]
pub(crate) enum Decoder {
    /// Each in turn.
    Sequence(Vec<Decoder>),
    /// Byte-level alphabet back to bytes, then UTF-8 (invalid bytes become U+FFFD).
    ByteLevel,
    /// Replaces `pattern` by `content` in each token.
    Replace {
        /// Literal text to find.
        pattern: String,
        /// Its replacement.
        content: String,
    },
    /// Runs of `<0xNN>` tokens become the text their bytes spell (one U+FFFD per byte if they
    /// are not valid UTF-8).
    ByteFallback,
    /// All tokens joined into one.
    Fuse,
    /// Removes up to `start` leading and `stop` trailing `content` characters of each token.
    Strip {
        /// The character removed.
        content: char,
        /// How many at most from the start.
        start: usize,
        /// How many at most from the end.
        stop: usize,
    },
}

impl Decoder {
    /// Parses the decoder object `value` found at `at`.
    pub(crate) fn from_json(value: &Value, at: &At) -> Result<Self> {
        let obj = at.object(value)?;
        match type_tag(obj, at)? {
            "Sequence" => {
                let list_at = at.key("decoders");
                let list = list_at.array(field(obj, "decoders", at)?)?;
                let parts = list
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Decoder::from_json(v, &list_at.index(i)))
                    .collect::<Result<_>>()?;
                Ok(Decoder::Sequence(parts))
            }
            "ByteLevel" => Ok(Decoder::ByteLevel),
            "Replace" => Ok(Decoder::Replace {
                pattern: literal_pattern(obj, at)?,
                content: at
                    .key("content")
                    .string(field(obj, "content", at)?)?
                    .to_owned(),
            }),
            "ByteFallback" => Ok(Decoder::ByteFallback),
            "Fuse" => Ok(Decoder::Fuse),
            "Strip" => {
                let content_at = at.key("content");
                let content = content_at.string(field(obj, "content", at)?)?;
                let mut chars = content.chars();
                let (Some(content), None) = (chars.next(), chars.next()) else {
                    return Err(content_at.error("expected exactly one character"));
                };
                let count = |key: &str| -> Result<usize> {
                    let v = field(obj, key, at)?;
                    v.as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| at.key(key).error("expected a count"))
                };
                Ok(Decoder::Strip {
                    content,
                    start: count("start")?,
                    stop: count("stop")?,
                })
            }
            other => Err(at.key("type").unsupported(format!(
                "decoder {other:?} (supported: Sequence, ByteLevel, Replace, ByteFallback, \
                 Fuse, Strip)"
            ))),
        }
    }

    /// The decoded text of `tokens`.
    pub(crate) fn decode(&self, tokens: Vec<String>) -> String {
        self.decode_chain(tokens).concat()
    }

    fn decode_chain(&self, tokens: Vec<String>) -> Vec<String> {
        match self {
            Decoder::Sequence(parts) => parts.iter().fold(tokens, |t, d| d.decode_chain(t)),
            Decoder::ByteLevel => {
                let mut bytes = Vec::new();
                for token in &tokens {
                    // A token outside the alphabet (an added token with a plain space, say)
                    // contributes its own UTF-8 bytes.
                    let mapped: Option<Vec<u8>> = token.chars().map(char_to_byte).collect();
                    match mapped {
                        Some(b) => bytes.extend(b),
                        None => bytes.extend_from_slice(token.as_bytes()),
                    }
                }
                vec![String::from_utf8_lossy(&bytes).into_owned()]
            }
            Decoder::Replace { pattern, content } => tokens
                .into_iter()
                .map(|t| t.replace(pattern.as_str(), content))
                .collect(),
            Decoder::ByteFallback => byte_fallback(tokens),
            Decoder::Fuse => vec![tokens.concat()],
            Decoder::Strip {
                content,
                start,
                stop,
            } => tokens
                .into_iter()
                .map(|t| strip(&t, *content, *start, *stop))
                .collect(),
        }
    }
}

/// The byte a `<0xNN>` token stands for.
fn byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if token.len() != 6 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

fn byte_fallback(tokens: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(tokens.len());
    let mut pending: Vec<u8> = Vec::new();
    let flush = |pending: &mut Vec<u8>, out: &mut Vec<String>| {
        if pending.is_empty() {
            return;
        }
        match String::from_utf8(std::mem::take(pending)) {
            Ok(text) => out.push(text),
            Err(e) => {
                let n = e.as_bytes().len();
                out.extend(std::iter::repeat("\u{FFFD}".to_owned()).take(n));
            }
        }
    };
    for token in tokens {
        match byte_token(&token) {
            Some(b) => pending.push(b),
            None => {
                flush(&mut pending, &mut out);
                out.push(token);
            }
        }
    }
    flush(&mut pending, &mut out);
    out
}

fn strip(token: &str, content: char, start: usize, stop: usize) -> String {
    let chars: Vec<char> = token.chars().collect();
    let head = chars
        .iter()
        .take(start)
        .take_while(|&&c| c == content)
        .count();
    let tail = chars[head..]
        .iter()
        .rev()
        .take(stop)
        .take_while(|&&c| c == content)
        .count();
    chars[head..chars.len() - tail].iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sentencepiece_decoder_chain() {
        let d = Decoder::Sequence(vec![
            Decoder::Replace {
                pattern: "▁".into(),
                content: " ".into(),
            },
            Decoder::ByteFallback,
            Decoder::Fuse,
            Decoder::Strip {
                content: ' ',
                start: 1,
                stop: 0,
            },
        ]);
        let tokens = strings(&["▁Hello", "<0xE2>", "<0x82>", "<0xAC>", "▁x", "<0xE2>"]);
        assert_eq!(d.decode(tokens), "Hello€ x\u{FFFD}");
        assert_eq!(d.decode(strings(&["<0xFF>", "<0xFE>"])), "\u{FFFD}\u{FFFD}");
    }

    #[test]
    fn byte_level_decoder() {
        let tokens = strings(&["Hello", "Ġw", "Ã", "©", "<|x|>", "a b"]);
        assert_eq!(Decoder::ByteLevel.decode(tokens), "Hello wé<|x|>a b");
    }

    #[test]
    fn strip_never_overruns() {
        assert_eq!(strip("  ", ' ', 1, 5), "");
        assert_eq!(strip("", ' ', 3, 3), "");
        assert_eq!(strip(" a ", ' ', 1, 1), "a");
    }
}
