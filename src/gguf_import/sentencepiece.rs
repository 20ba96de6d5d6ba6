//! The SentencePiece-style parts of a `tokenizer.json` for `tokenizer.ggml.model = "llama"`,
//! as transformers' `LlamaTokenizer` builds them: Metaspace pre-tokenizer, byte-fallback
//! decoder, and BPE merges recovered from the token scores when the file lists none.

use serde_json::{json, Value};
use std::cmp::Ordering;
use std::collections::HashMap;

/// The word-boundary marker SentencePiece writes for a space.
const SPACE: &str = "\u{2581}";

/// Metaspace: spaces become `▁`, with one prepended to the first word when `prefix`.
pub(crate) fn pre_tokenizer(prefix: bool) -> Value {
    json!({
        "type": "Metaspace", "replacement": SPACE,
        "prepend_scheme": if prefix { "first" } else { "never" }, "split": false,
    })
}

/// `▁` back to spaces, `<0xNN>` tokens back to bytes, and the prepended space dropped.
pub(crate) fn decoder(prefix: bool) -> Value {
    let mut steps = vec![
        json!({"type": "Replace", "pattern": {"String": SPACE}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        steps.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({"type": "Sequence", "decoders": steps})
}

/// The merges a scored vocabulary implies, in the order transformers' `generate_merges`
/// gives them: every split of a token into two vocabulary pieces, best-scored token first,
/// ties broken by shorter left piece, then shorter right piece, then by the pieces' ids.
pub(crate) fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    // Later duplicates win, as in a Python dict built from the lists.
    let mut id: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut score: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, (t, &s)) in tokens.iter().zip(scores).enumerate() {
        if id.insert(t, i).is_none() {
            order.push(t);
        }
        score.insert(t, s);
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for token in order {
        let mut local: Vec<(&str, &str, f64)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| id.contains_key(l) && id.contains_key(r))
            .map(|(l, r)| (l, r, score[token]))
            .collect();
        local.sort_by_key(|&(l, r, _)| (id[l], id[r]));
        merges.extend(local);
    }
    // Python's sort(reverse=True) is stable: equal keys keep their order.
    let len = |s: &str| s.chars().count();
    merges.sort_by(|a, b| {
        let key_a = (len(a.0), len(a.1));
        let key_b = (len(b.0), len(b.1));
        b.2.partial_cmp(&a.2)
            .unwrap_or(Ordering::Equal)
            .then_with(|| key_b.cmp(&key_a))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_follow_scores_then_lengths() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "abc", "bc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -3.0, -2.0];
        let merges = merges_from_scores(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        // "ab" (-1), then "bc" (-2), then "abc" (-3): its splits "ab"+"c" (left longer) and
        // "a"+"bc"; reverse order puts the longer left piece first.
        assert_eq!(pairs, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }
}
