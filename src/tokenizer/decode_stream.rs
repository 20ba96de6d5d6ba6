//! Streaming decode for generation: ids arrive one at a time and text is released only once it
//! is complete, so a UTF-8 character split over several byte tokens never comes out half-done.

use super::Tokenizer;

/// Decodes ids as they are generated. It keeps the ids since the last released text plus the
/// ones before them that give context (a leading-space strip, a byte sequence), decodes them
/// with and without the new id, and releases the difference once it does not end in U+FFFD:
/// the same scheme as HF `tokenizers`' `DecodeStream`.
#[derive(Debug)]
pub struct DecodeStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    /// The ids still needed: context first, then those not yet released.
    ids: Vec<u32>,
    /// The decoded text of the context ids `ids[..prefix_len]`.
    prefix: String,
    prefix_len: usize,
}

impl<'a> DecodeStream<'a> {
    /// A stream over `tokenizer`; `skip_special_tokens` drops special tokens from the text.
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        DecodeStream {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_len: 0,
        }
    }

    /// Adds `id`; returns the text that became complete (often empty while a character is
    /// still being spelled).
    pub fn push(&mut self, id: u32) -> String {
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, self.skip_special_tokens);
        if self.prefix.is_empty() && !self.ids.is_empty() {
            let prefix = decode(&self.ids);
            if !prefix.ends_with('\u{FFFD}') {
                self.prefix = prefix;
                self.prefix_len = self.ids.len();
            }
        }
        self.ids.push(id);
        let text = decode(&self.ids);
        if text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}') {
            return String::new();
        }
        // The context decodes the same inside the longer text for every decoder here; should a
        // decoder ever rewrite it, release what follows the common part rather than fail.
        let common = common_prefix_len(&text, &self.prefix);
        let released = text[common..].to_owned();
        let keep_from = self.prefix_len;
        self.ids.drain(..keep_from);
        self.prefix_len = self.ids.len();
        self.prefix = decode(&self.ids);
        released
    }
}

/// The byte length of the longest common prefix of `a` and `b`, on a character boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}
