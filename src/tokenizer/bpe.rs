//! The BPE model: a word's characters become vocabulary ids, then the lowest-ranked merge among
//! adjacent pairs is applied until none is left (a priority queue over a linked list of
//! symbols, the way HF `tokenizers` does it, so equal ranks resolve leftmost first).

use super::json::{bool_field, field, opt_str_field, type_tag, At};
use crate::error::Result;
use serde_json::Value;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// A BPE vocabulary with its merges.
#[derive(Debug, Clone)]
pub(crate) struct Bpe {
    vocab: HashMap<String, u32>,
    vocab_r: HashMap<u32, String>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    unk_id: Option<u32>,
    fuse_unk: bool,
    /// The ids of `<0x00>`..`<0xFF>` (where present) when byte fallback is on.
    byte_fallback: Option<Box<[Option<u32>; 256]>>,
    ignore_merges: bool,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
}

/// One symbol of a word being merged: an id and its neighbours (`usize::MAX` for none).
#[derive(Debug, Clone, Copy)]
struct Symbol {
    id: u32,
    prev: usize,
    next: usize,
    /// False once merged into its left neighbour.
    alive: bool,
}

const NONE: usize = usize::MAX;

impl Bpe {
    /// Parses the `model` object of `tokenizer.json`.
    pub(crate) fn from_json(value: &Value, at: &At) -> Result<Self> {
        let obj = at.object(value)?;
        // Files written by old versions may leave the type out; a vocab with merges is BPE.
        if obj.contains_key("type") {
            let kind = type_tag(obj, at)?;
            if kind != "BPE" {
                return Err(at
                    .key("type")
                    .unsupported(format!("model {kind:?} (supported: BPE)")));
            }
        }
        if let Some(dropout) = obj.get("dropout").and_then(Value::as_f64) {
            if dropout != 0.0 {
                return Err(at
                    .key("dropout")
                    .unsupported(format!("BPE dropout {dropout} (random; set it to null)")));
            }
        }
        let vocab_at = at.key("vocab");
        let vocab_obj = vocab_at.object(field(obj, "vocab", at)?)?;
        let mut vocab = HashMap::with_capacity(vocab_obj.len());
        let mut vocab_r = HashMap::with_capacity(vocab_obj.len());
        for (token, id) in vocab_obj {
            let id = vocab_at.key(token).id(id)?;
            vocab.insert(token.clone(), id);
            vocab_r.insert(id, token.clone());
        }
        let non_empty = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_owned);
        let continuing_subword_prefix =
            non_empty(opt_str_field(obj, "continuing_subword_prefix", at)?);
        let end_of_word_suffix = non_empty(opt_str_field(obj, "end_of_word_suffix", at)?);
        let merges = parse_merges(
            obj,
            at,
            &vocab,
            continuing_subword_prefix.as_deref().unwrap_or(""),
        )?;
        let unk_id = match opt_str_field(obj, "unk_token", at)? {
            None => None,
            Some(unk) => Some(*vocab.get(unk).ok_or_else(|| {
                at.key("unk_token")
                    .error(format!("{unk:?} is not in the vocabulary"))
            })?),
        };
        let byte_fallback = if bool_field(obj, "byte_fallback", false, at)? {
            let mut ids = Box::new([None; 256]);
            for (b, slot) in ids.iter_mut().enumerate() {
                *slot = vocab.get(&format!("<0x{b:02X}>")).copied();
            }
            Some(ids)
        } else {
            None
        };
        Ok(Bpe {
            vocab,
            vocab_r,
            merges,
            unk_id,
            fuse_unk: bool_field(obj, "fuse_unk", false, at)?,
            byte_fallback,
            ignore_merges: bool_field(obj, "ignore_merges", false, at)?,
            continuing_subword_prefix,
            end_of_word_suffix,
        })
    }

    /// The id of `token` in the model's vocabulary.
    pub(crate) fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// The token of `id` in the model's vocabulary.
    pub(crate) fn id_to_token(&self, id: u32) -> Option<&str> {
        self.vocab_r.get(&id).map(String::as_str)
    }

    /// The number of entries in the model's vocabulary.
    pub(crate) fn len(&self) -> usize {
        self.vocab.len()
    }

    /// Appends the ids of `word` to `out`.
    pub(crate) fn tokenize(&self, word: &str, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges {
            if let Some(&id) = self.vocab.get(word) {
                out.push(id);
                return;
            }
        }
        let mut symbols = self.initial_symbols(word);
        self.merge_all(&mut symbols);
        out.extend(symbols.iter().filter(|s| s.alive).map(|s| s.id));
    }

    /// One symbol per character (with the subword prefix and word suffix where configured),
    /// bytes for unknown characters under byte fallback, else the unknown token (fused).
    fn initial_symbols(&self, word: &str) -> Vec<Symbol> {
        let mut ids: Vec<u32> = Vec::with_capacity(word.len());
        let mut pending_unk = false;
        let mut buf = String::new();
        let mut starts = word.char_indices().map(|(i, _)| i).peekable();
        while let Some(i) = starts.next() {
            let end = starts.peek().copied().unwrap_or(word.len());
            let piece = &word[i..end];
            let is_first = i == 0;
            let is_last = end == word.len();
            let decorated = if (is_first || self.continuing_subword_prefix.is_none())
                && (!is_last || self.end_of_word_suffix.is_none())
            {
                piece
            } else {
                buf.clear();
                if let (false, Some(prefix)) = (is_first, &self.continuing_subword_prefix) {
                    buf.push_str(prefix);
                }
                buf.push_str(piece);
                if let (true, Some(suffix)) = (is_last, &self.end_of_word_suffix) {
                    buf.push_str(suffix);
                }
                buf.as_str()
            };
            if let Some(&id) = self.vocab.get(decorated) {
                if pending_unk {
                    if let Some(unk) = self.unk_id {
                        ids.push(unk);
                    }
                    pending_unk = false;
                }
                ids.push(id);
                continue;
            }
            if let Some(table) = &self.byte_fallback {
                // Only when every byte has a token. HF emits them without flushing a pending
                // unknown first (so it lands after them); kept as is for parity.
                let bytes: Option<Vec<u32>> =
                    decorated.bytes().map(|b| table[b as usize]).collect();
                if let Some(bytes) = bytes {
                    ids.extend(bytes);
                    continue;
                }
            }
            if let Some(unk) = self.unk_id {
                if pending_unk && !self.fuse_unk {
                    ids.push(unk);
                }
                pending_unk = true;
            }
        }
        if pending_unk {
            if let Some(unk) = self.unk_id {
                ids.push(unk);
            }
        }
        let n = ids.len();
        ids.into_iter()
            .enumerate()
            .map(|(k, id)| Symbol {
                id,
                prev: if k == 0 { NONE } else { k - 1 },
                next: if k + 1 == n { NONE } else { k + 1 },
                alive: true,
            })
            .collect()
    }

    /// Applies merges, lowest rank first and leftmost among equals, until none applies.
    fn merge_all(&self, symbols: &mut [Symbol]) {
        // (rank, position of the left symbol, merged id), smallest first.
        let mut queue: BinaryHeap<Reverse<(u32, usize, u32)>> =
            BinaryHeap::with_capacity(symbols.len());
        for pos in 0..symbols.len().saturating_sub(1) {
            if let Some(&(rank, new_id)) = self.merges.get(&(symbols[pos].id, symbols[pos + 1].id))
            {
                queue.push(Reverse((rank, pos, new_id)));
            }
        }
        while let Some(Reverse((_, pos, new_id))) = queue.pop() {
            let left = symbols[pos];
            if !left.alive || left.next == NONE {
                continue;
            }
            let right = symbols[left.next];
            // A stale entry: one of the two symbols changed since it was queued.
            match self.merges.get(&(left.id, right.id)) {
                Some(&(_, id)) if id == new_id => {}
                _ => continue,
            }
            symbols[pos].id = new_id;
            symbols[pos].next = right.next;
            symbols[left.next].alive = false;
            if right.next != NONE {
                symbols[right.next].prev = pos;
            }
            let merged = symbols[pos];
            if merged.prev != NONE {
                if let Some(&(rank, id)) = self.merges.get(&(symbols[merged.prev].id, merged.id)) {
                    queue.push(Reverse((rank, merged.prev, id)));
                }
            }
            if merged.next != NONE {
                if let Some(&(rank, id)) = self.merges.get(&(merged.id, symbols[merged.next].id)) {
                    queue.push(Reverse((rank, pos, id)));
                }
            }
        }
    }
}

/// The merge table: `"a b"` strings (lines starting `#version` skipped) or `["a", "b"]` pairs,
/// ranked by position; a later duplicate replaces an earlier one, as in HF.
fn parse_merges(
    obj: &serde_json::Map<String, Value>,
    at: &At,
    vocab: &HashMap<String, u32>,
    prefix: &str,
) -> Result<HashMap<(u32, u32), (u32, u32)>> {
    let merges_at = at.key("merges");
    let list = match obj.get("merges") {
        None | Some(Value::Null) => return Ok(HashMap::new()),
        Some(v) => merges_at.array(v)?,
    };
    let mut merges = HashMap::with_capacity(list.len());
    let mut rank = 0u32;
    for (i, entry) in list.iter().enumerate() {
        let entry_at = merges_at.index(i);
        let (a, b) = match entry {
            Value::String(line) => {
                if line.starts_with("#version") {
                    continue;
                }
                let mut parts = line.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => (a, b),
                    _ => return Err(entry_at.error(format!("merge {line:?} is not \"a b\""))),
                }
            }
            Value::Array(pair) if pair.len() == 2 => (
                entry_at.index(0).string(&pair[0])?,
                entry_at.index(1).string(&pair[1])?,
            ),
            _ => return Err(entry_at.error("a merge must be \"a b\" or [\"a\", \"b\"]")),
        };
        let lookup = |token: &str| {
            vocab.get(token).copied().ok_or_else(|| {
                entry_at.error(format!("merge token {token:?} is not in the vocabulary"))
            })
        };
        let pair = (lookup(a)?, lookup(b)?);
        let b_rest = b.strip_prefix(prefix).unwrap_or(b);
        let new_id = lookup(&format!("{a}{b_rest}"))?;
        merges.insert(pair, (rank, new_id));
        rank += 1;
    }
    Ok(merges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(json: &str) -> Bpe {
        let value: Value = serde_json::from_str(json).unwrap();
        Bpe::from_json(&value, &At::root("test")).unwrap()
    }

    fn ids(bpe: &Bpe, word: &str) -> Vec<u32> {
        let mut out = Vec::new();
        bpe.tokenize(word, &mut out);
        out
    }

    #[test]
    fn merges_lowest_rank_first_and_leftmost() {
        let bpe = model(
            r#"{"type":"BPE","vocab":{"a":0,"b":1,"ab":2,"aa":3,"aaa":4},
                "merges":["a a", "a b", ["aa", "a"]]}"#,
        );
        // "aab": a+a (rank 0) beats a+b (rank 1) -> [aa, b].
        assert_eq!(ids(&bpe, "aab"), [3, 1]);
        // "aaaa": the leftmost a+a first, then the second pair, no aaa.
        assert_eq!(ids(&bpe, "aaaa"), [3, 3]);
        // "aaa": aa + a -> aaa (rank 2).
        assert_eq!(ids(&bpe, "aaa"), [4]);
    }

    #[test]
    fn unknowns_fuse_and_bytes_fall_back() {
        let bpe = model(
            r#"{"type":"BPE","vocab":{"<unk>":0,"a":1},"merges":[],"unk_token":"<unk>",
                "fuse_unk":true}"#,
        );
        assert_eq!(ids(&bpe, "xyaz"), [0, 1, 0]);
        let mut vocab: Vec<String> = (0..256).map(|b| format!("\"<0x{b:02X}>\":{b}")).collect();
        vocab.push("\"a\":256".into());
        let bpe = model(&format!(
            r#"{{"type":"BPE","vocab":{{{}}},"merges":[],"byte_fallback":true}}"#,
            vocab.join(",")
        ));
        assert_eq!(ids(&bpe, "aé"), [256, 0xC3, 0xA9]);
    }

    #[test]
    fn bad_merge_is_an_error_naming_it() {
        let value: Value =
            serde_json::from_str(r#"{"type":"BPE","vocab":{"a":0},"merges":["a b"]}"#).unwrap();
        let err = Bpe::from_json(&value, &At::root("t.json").key("model"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.merges[0]") && err.contains("\"b\""),
            "{err}"
        );
    }
}
