//! Added and special tokens: found in the text before the model runs, leftmost-longest, with
//! HF's `single_word`, `lstrip`, `rstrip` and `normalized` flags.

use super::char_class::is_word;
use super::json::{bool_field, field, str_field, At};
use super::normalizer::Normalizer;
use crate::error::Result;
use serde_json::Value;
use std::collections::{HashMap, HashSet};

/// One entry of `added_tokens`.
#[derive(Debug, Clone)]
pub(crate) struct AddedToken {
    pub(crate) id: u32,
    pub(crate) content: String,
    /// What `id_to_token` and decoding give: HF stores a `normalized` token in its normalized
    /// form (`▁[NAME]` under LLaMA-2's normalizer), while `token_to_id` takes the content.
    pub(crate) spelled: String,
    pub(crate) special: bool,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
}

/// A piece of text after added tokens were cut out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment<'t> {
    /// Text for the model.
    Text(&'t str),
    /// An added token, already an id.
    Token(u32),
}

/// Patterns looked up by their first byte, longest first.
#[derive(Debug, Clone, Default)]
struct Matcher {
    /// (pattern, index into `AddedTokens::tokens`).
    patterns: Vec<(String, usize)>,
    by_first_byte: HashMap<u8, Vec<usize>>,
}

impl Matcher {
    fn new(patterns: Vec<(String, usize)>) -> Self {
        let mut by_first_byte: HashMap<u8, Vec<usize>> = HashMap::new();
        for (k, (pattern, _)) in patterns.iter().enumerate() {
            if let Some(&b) = pattern.as_bytes().first() {
                by_first_byte.entry(b).or_default().push(k);
            }
        }
        for list in by_first_byte.values_mut() {
            // Longest first; among equals, the earlier pattern (stable sort).
            list.sort_by_key(|&k| std::cmp::Reverse(patterns[k].0.len()));
        }
        Matcher {
            patterns,
            by_first_byte,
        }
    }

    /// The leftmost match at or after byte `from`, longest among those starting there:
    /// (start, end, token index).
    fn find(&self, text: &str, from: usize) -> Option<(usize, usize, usize)> {
        if self.patterns.is_empty() {
            return None;
        }
        let bytes = text.as_bytes();
        (from..bytes.len()).find_map(|start| {
            let candidates = self.by_first_byte.get(&bytes[start])?;
            candidates.iter().find_map(|&k| {
                let (pattern, token) = &self.patterns[k];
                bytes[start..]
                    .starts_with(pattern.as_bytes())
                    .then(|| (start, start + pattern.len(), *token))
            })
        })
    }
}

/// Every added token of a tokenizer, with the matchers for raw and normalized text.
#[derive(Debug, Clone, Default)]
pub(crate) struct AddedTokens {
    tokens: Vec<AddedToken>,
    by_id: HashMap<u32, usize>,
    by_content: HashMap<String, u32>,
    special_contents: HashSet<String>,
    /// Tokens with `normalized: false`, matched in the raw text.
    raw: Matcher,
    /// Tokens with `normalized: true`, matched (normalized themselves) in normalized text.
    normalized: Matcher,
}

impl AddedTokens {
    /// Parses the `added_tokens` array; normalized tokens are matched in their normalized form.
    pub(crate) fn from_json(
        value: Option<&Value>,
        at: &At,
        normalizer: Option<&Normalizer>,
    ) -> Result<Self> {
        let mut tokens = Vec::new();
        if let Some(value) = value.filter(|v| !v.is_null()) {
            for (i, entry) in at.array(value)?.iter().enumerate() {
                let entry_at = at.index(i);
                let obj = entry_at.object(entry)?;
                let content = str_field(obj, "content", &entry_at)?.to_owned();
                if content.is_empty() {
                    continue; // HF ignores empty added tokens.
                }
                let special = bool_field(obj, "special", false, &entry_at)?;
                tokens.push(AddedToken {
                    id: entry_at.key("id").id(field(obj, "id", &entry_at)?)?,
                    spelled: content.clone(),
                    content,
                    special,
                    single_word: bool_field(obj, "single_word", false, &entry_at)?,
                    lstrip: bool_field(obj, "lstrip", false, &entry_at)?,
                    rstrip: bool_field(obj, "rstrip", false, &entry_at)?,
                    normalized: bool_field(obj, "normalized", !special, &entry_at)?,
                });
            }
        }
        Ok(Self::new(tokens, normalizer))
    }

    fn new(mut tokens: Vec<AddedToken>, normalizer: Option<&Normalizer>) -> Self {
        if let Some(n) = normalizer {
            for token in tokens.iter_mut().filter(|t| t.normalized) {
                token.spelled = token.content.clone();
                n.normalize(&mut token.spelled);
            }
        }
        let by_id = tokens.iter().enumerate().map(|(k, t)| (t.id, k)).collect();
        let by_content = tokens.iter().map(|t| (t.content.clone(), t.id)).collect();
        let special_contents = tokens
            .iter()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        // HF lists special tokens before the others; that order breaks ties between equal
        // patterns.
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by_key(|&k| !tokens[k].special);
        let mut raw = Vec::new();
        let mut normalized = Vec::new();
        for k in order {
            let token = &tokens[k];
            if token.normalized {
                if !token.spelled.is_empty() {
                    normalized.push((token.spelled.clone(), k));
                }
            } else {
                raw.push((token.content.clone(), k));
            }
        }
        AddedTokens {
            tokens,
            by_id,
            by_content,
            special_contents,
            raw: Matcher::new(raw),
            normalized: Matcher::new(normalized),
        }
    }

    /// The added token with `id`.
    pub(crate) fn get(&self, id: u32) -> Option<&AddedToken> {
        self.by_id.get(&id).map(|&k| &self.tokens[k])
    }

    /// The id of the added token spelled `content`.
    pub(crate) fn id_of(&self, content: &str) -> Option<u32> {
        self.by_content.get(content).copied()
    }

    /// True if `text` is the content of a special token. HF skips special tokens by this test
    /// on the spelled text when decoding, so a normalized special token whose spelling changed
    /// is not skipped; kept for parity.
    pub(crate) fn is_special_text(&self, text: &str) -> bool {
        self.special_contents.contains(text)
    }

    /// All added tokens.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &AddedToken> {
        self.tokens.iter()
    }

    /// Cuts the raw-text tokens (`normalized: false`) out of `text`.
    pub(crate) fn split_raw<'t>(&self, text: &'t str) -> Vec<Segment<'t>> {
        self.split(text, &self.raw)
    }

    /// Cuts the normalized-text tokens (`normalized: true`) out of normalized `text`.
    pub(crate) fn split_normalized<'t>(&self, text: &'t str) -> Vec<Segment<'t>> {
        self.split(text, &self.normalized)
    }

    /// HF's `find_matches`: successive leftmost-longest matches; one failing `single_word` is
    /// dropped (and the search resumes after it); `lstrip`/`rstrip` swallow the whitespace
    /// beside a match.
    fn split<'t>(&self, text: &'t str, matcher: &Matcher) -> Vec<Segment<'t>> {
        let mut out = Vec::new();
        let mut done = 0; // everything before this byte is in `out`
        let mut search = 0;
        while let Some((mut start, end, k)) = matcher.find(text, search) {
            search = end;
            let token = &self.tokens[k];
            if token.single_word {
                let word_before = text[..start].chars().next_back().is_some_and(is_word);
                let word_after = text[end..].chars().next().is_some_and(is_word);
                if word_before || word_after {
                    continue;
                }
            }
            let mut stop = end;
            if token.lstrip {
                let trimmed = text[..start].trim_end_matches(char::is_whitespace).len();
                start = trimmed.max(done);
            }
            if token.rstrip {
                stop = text.len() - text[end..].trim_start_matches(char::is_whitespace).len();
            }
            // A token could start inside whitespace the previous one swallowed; its id still
            // counts, as in HF.
            if done < start {
                out.push(Segment::Text(&text[done..start]));
            }
            out.push(Segment::Token(token.id));
            done = done.max(stop);
        }
        if done < text.len() {
            out.push(Segment::Text(&text[done..]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: u32, content: &str, flags: &str) -> AddedToken {
        AddedToken {
            id,
            content: content.to_owned(),
            spelled: content.to_owned(),
            special: flags.contains('s'),
            single_word: flags.contains('w'),
            lstrip: flags.contains('l'),
            rstrip: flags.contains('r'),
            normalized: flags.contains('n'),
        }
    }

    #[test]
    fn leftmost_longest_with_strip_and_single_word() {
        // Mirrors HF's own added_vocabulary tests (options_use_cases, single_word cases).
        let added = AddedTokens::new(
            vec![
                token(0, "my", "lr"),
                token(1, "name", ""),
                token(2, "ony", "w"),
                token(3, "[CLS]", "s"),
                token(4, "[CLS]X", "s"),
            ],
            None,
        );
        use Segment::*;
        assert_eq!(
            added.split_raw("[CLS] my name is Anthony [CLS]X"),
            [Token(3), Token(0), Token(1), Text(" is Anthony "), Token(4)]
        );
        assert_eq!(
            added.split_raw("ony, ony"),
            [Token(2), Text(", "), Token(2)]
        );
        assert_eq!(added.split_raw("a\u{2000}my\t"), [Text("a"), Token(0)]);
        assert_eq!(added.split_raw(""), []);
    }
}
