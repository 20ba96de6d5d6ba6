//! Pre-tokenizers: cut normalized text into words that the BPE model encodes one by one.

use super::byte_level::byte_to_char_table;
use super::json::{bool_field, field, str_field, type_tag, At};
use super::split_patterns::SplitPattern;
use crate::error::Result;
use serde_json::Value;

/// A `tokenizer.json` pre-tokenizer this engine implements.
#[derive(Debug, Clone)]
pub(crate) enum PreTokenizer {
    /// Each in turn, over every piece the previous one left.
    Sequence(Vec<PreTokenizer>),
    /// GPT-2's: optionally a leading space, optionally the GPT-2 split, then every byte
    /// respelled in the byte-level alphabet.
    ByteLevel {
        /// Puts a space in front of a piece that does not start with one.
        add_prefix_space: bool,
        /// Splits with the GPT-2 pattern first.
        use_regex: bool,
    },
    /// A regex split, matches kept as their own pieces (HF's `Isolated`, not inverted).
    Split(SplitPattern),
    /// Digits cut out of the text: each on its own, or in runs.
    Digits {
        /// One piece per digit (else one per run of digits).
        individual: bool,
    },
}

impl PreTokenizer {
    /// Parses the pre-tokenizer object `value` found at `at`.
    pub(crate) fn from_json(value: &Value, at: &At) -> Result<Self> {
        let obj = at.object(value)?;
        match type_tag(obj, at)? {
            "Sequence" => {
                let list_at = at.key("pretokenizers");
                let list = list_at.array(field(obj, "pretokenizers", at)?)?;
                let parts = list
                    .iter()
                    .enumerate()
                    .map(|(i, v)| PreTokenizer::from_json(v, &list_at.index(i)))
                    .collect::<Result<_>>()?;
                Ok(PreTokenizer::Sequence(parts))
            }
            "ByteLevel" => Ok(PreTokenizer::ByteLevel {
                add_prefix_space: bool_field(obj, "add_prefix_space", true, at)?,
                use_regex: bool_field(obj, "use_regex", true, at)?,
            }),
            "Digits" => Ok(PreTokenizer::Digits {
                individual: bool_field(obj, "individual_digits", false, at)?,
            }),
            "Split" => {
                let pattern_at = at.key("pattern");
                let pattern = pattern_at.object(field(obj, "pattern", at)?)?;
                let Some(regex) = pattern.get("Regex") else {
                    return Err(pattern_at.unsupported("only {\"Regex\": ...} split patterns"));
                };
                let regex = pattern_at.key("Regex").string(regex)?;
                let split = SplitPattern::from_regex(regex).ok_or_else(|| {
                    pattern_at.key("Regex").unsupported(format!(
                        "split pattern {regex:?} (known: the GPT-2 and LLaMA-3 patterns)"
                    ))
                })?;
                let behavior = str_field(obj, "behavior", at)?;
                if behavior != "Isolated" {
                    return Err(at.key("behavior").unsupported(format!(
                        "split behavior {behavior:?} (supported: Isolated)"
                    )));
                }
                if bool_field(obj, "invert", false, at)? {
                    return Err(at.key("invert").unsupported("inverted splits"));
                }
                Ok(PreTokenizer::Split(split))
            }
            other => Err(at.key("type").unsupported(format!(
                "pre-tokenizer {other:?} (supported: Sequence, ByteLevel, Split, Digits)"
            ))),
        }
    }

    /// Cuts every piece of `pieces` further, in place; empty pieces are dropped.
    pub(crate) fn pre_tokenize(&self, pieces: &mut Vec<String>) {
        match self {
            PreTokenizer::Sequence(parts) => parts.iter().for_each(|p| p.pre_tokenize(pieces)),
            PreTokenizer::ByteLevel {
                add_prefix_space,
                use_regex,
            } => {
                if *add_prefix_space {
                    for piece in pieces.iter_mut().filter(|p| !p.starts_with(' ')) {
                        piece.insert(0, ' ');
                    }
                }
                if *use_regex {
                    split_each(pieces, |p| SplitPattern::Gpt2.matches(p));
                }
                let table = byte_to_char_table();
                for piece in pieces.iter_mut() {
                    *piece = piece.bytes().map(|b| table[b as usize]).collect();
                }
            }
            PreTokenizer::Split(pattern) => split_each(pieces, |p| pattern.matches(p)),
            PreTokenizer::Digits { individual } => {
                split_each(pieces, |p| digit_ranges(p, *individual))
            }
        }
    }
}

/// Replaces each piece by the sub-pieces `cut` gives as byte ranges (which must tile it).
fn split_each(pieces: &mut Vec<String>, cut: impl Fn(&str) -> Vec<(usize, usize)>) {
    let mut out = Vec::with_capacity(pieces.len());
    for piece in pieces.drain(..) {
        out.extend(
            cut(&piece)
                .into_iter()
                .filter(|&(a, b)| a < b)
                .map(|(a, b)| piece[a..b].to_owned()),
        );
    }
    *pieces = out;
}

/// Byte ranges tiling `text`: each digit (`char::is_numeric`, as HF) alone or, if not
/// `individual`, each run of digits, and the text between.
fn digit_ranges(text: &str, individual: bool) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut last_was_digit = false;
    for (i, c) in text.char_indices() {
        let end = i + c.len_utf8();
        let digit = c.is_numeric();
        let extend = !out.is_empty() && digit == last_was_digit && !(digit && individual);
        match out.last_mut() {
            Some(last) if extend => last.1 = end,
            _ => out.push((i, end)),
        }
        last_was_digit = digit;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pre: &PreTokenizer, text: &str) -> Vec<String> {
        let mut pieces = vec![text.to_owned()];
        pre.pre_tokenize(&mut pieces);
        pieces
    }

    #[test]
    fn digits_individual_and_contiguous() {
        let individual = PreTokenizer::Digits { individual: true };
        assert_eq!(
            run(&individual, "ab 123x٣"),
            ["ab ", "1", "2", "3", "x", "٣"]
        );
        let runs = PreTokenizer::Digits { individual: false };
        assert_eq!(run(&runs, "ab 123x٣"), ["ab ", "123", "x", "٣"]);
    }

    #[test]
    fn byte_level_respells_bytes() {
        let pre = PreTokenizer::ByteLevel {
            add_prefix_space: false,
            use_regex: true,
        };
        assert_eq!(run(&pre, "Hi there\né"), ["Hi", "Ġthere", "Ċ", "Ã©"]);
    }
}
