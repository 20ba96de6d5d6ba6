//! `tokenizer.json` and `tokenizer_config.json` from a GGUF's `tokenizer.ggml.*` metadata,
//! mirroring what transformers builds from the same file (integrations/gguf): a byte-level BPE
//! for `tokenizer.ggml.model = "gpt2"`, with the pre-tokenizer named by `tokenizer.ggml.pre`,
//! or a SentencePiece-style BPE with byte fallback for `"llama"`.

use super::{sentencepiece, LlamaParams};
use crate::error::{Error, Result};
use crate::formats::gguf::{GgufFile, MetaValue};
use serde_json::{json, Map, Value};

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The split pattern of LLaMA-3's tokenizer (llama.cpp's "llama-bpe").
const LLAMA3_SPLIT: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/// `tokenizer.ggml.pre` values that use the LLaMA-3 split (as transformers maps them).
const LLAMA3_PRE: [&str; 11] = [
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "dbrx",
    "smaug-bpe",
];

/// The two tokenizer files, as JSON values.
pub(crate) struct TokenizerFiles {
    /// `tokenizer.json`.
    pub tokenizer: Value,
    /// `tokenizer_config.json`.
    pub config: Value,
}

/// The vocabulary metadata of a GGUF, read and checked.
struct GgufVocab<'a> {
    /// True for "gpt2" (byte-level BPE), false for "llama" (SentencePiece BPE).
    byte_level: bool,
    tokens: &'a [String],
    types: Vec<i64>,
    merges: Option<&'a [String]>,
    add_bos: bool,
    add_eos: bool,
}

impl<'a> GgufVocab<'a> {
    fn read(gguf: &'a GgufFile) -> Result<Self> {
        let bad = |problem: String| Error::format(gguf.what(), problem);
        let model = gguf
            .get("tokenizer.ggml.model")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| bad("no string tokenizer.ggml.model".into()))?;
        let byte_level = match model {
            "gpt2" => true,
            "llama" => false,
            other => {
                return Err(Error::unsupported(format!(
                    "{}: tokenizer.ggml.model {other:?}; only \"gpt2\" (byte-level BPE) and \
                     \"llama\" (SentencePiece BPE) vocabularies can be imported",
                    gguf.what()
                )))
            }
        };
        let tokens = gguf
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array)
            .and_then(|a| a.as_strings())
            .ok_or_else(|| bad("no string array tokenizer.ggml.tokens".into()))?;
        let types = match gguf.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => v
                .as_array()
                .and_then(|a| a.to_i64s())
                .filter(|t| t.len() == tokens.len())
                .ok_or_else(|| {
                    bad(format!(
                        "tokenizer.ggml.token_type is not an integer array of {} entries",
                        tokens.len()
                    ))
                })?,
        };
        let merges = match gguf.get("tokenizer.ggml.merges") {
            None => None,
            Some(v) => Some(
                v.as_array()
                    .and_then(|a| a.as_strings())
                    .ok_or_else(|| bad("tokenizer.ggml.merges is not a string array".into()))?,
            ),
        };
        let flag = |k: &str| gguf.get(k).and_then(MetaValue::as_bool);
        Ok(GgufVocab {
            byte_level,
            tokens,
            types,
            merges,
            // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
            add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(!byte_level),
            add_eos: flag("tokenizer.ggml.add_eos_token").unwrap_or(false),
        })
    }

    /// The token with id `id`, if there is one.
    fn name_of(&self, id: Option<u32>) -> Option<&'a str> {
        id.and_then(|i| self.tokens.get(i as usize))
            .map(String::as_str)
    }
}

/// Builds the tokenizer files for `gguf`, whose hyperparameters are `p`.
pub(crate) fn tokenizer_files(gguf: &GgufFile, p: &LlamaParams) -> Result<TokenizerFiles> {
    let v = GgufVocab::read(gguf)?;
    let alphabet = ByteAlphabet::new();
    let mut vocab = Map::new();
    for (id, token) in v.tokens.iter().enumerate() {
        let spelled = if v.byte_level {
            alphabet.spell(token)
        } else {
            token.clone()
        };
        vocab.insert(spelled, json!(id));
    }
    let added = added_tokens(&v, p, &vocab, &alphabet);
    let merges = merges(gguf, &v)?;
    let flag = |k: &str| gguf.get(k).and_then(MetaValue::as_bool);

    let (pre_tokenizer, decoder, bpe_options) = if v.byte_level {
        let pre = gguf
            .get("tokenizer.ggml.pre")
            .and_then(MetaValue::as_str)
            .unwrap_or("default");
        let pre_tokenizer = pre_tokenizer(pre).ok_or_else(|| {
            Error::unsupported(format!(
                "{}: tokenizer.ggml.pre {pre:?}; supported: smollm, gpt2, default, {}",
                gguf.what(),
                LLAMA3_PRE.join(", ")
            ))
        })?;
        let options = json!({
            "continuing_subword_prefix": "", "end_of_word_suffix": "",
            "fuse_unk": false, "byte_fallback": false,
        });
        (pre_tokenizer, byte_level_json(true, true), options)
    } else {
        let prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
        let options = json!({
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true,
        });
        (
            sentencepiece::pre_tokenizer(prefix),
            sentencepiece::decoder(prefix),
            options,
        )
    };
    let mut model = Map::new();
    model.insert("type".into(), json!("BPE"));
    model.insert("dropout".into(), Value::Null);
    model.insert("unk_token".into(), Value::Null);
    if let Value::Object(options) = bpe_options {
        model.extend(options);
    }
    model.insert("ignore_merges".into(), json!(false));
    model.insert("vocab".into(), Value::Object(vocab));
    model.insert("merges".into(), Value::Array(merges));

    let bos = v.name_of(p.bos_token_id).zip(p.bos_token_id);
    let eos = v.name_of(p.eos_token_id).zip(p.eos_token_id);
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(
            bos.filter(|_| v.add_bos),
            eos.filter(|_| v.add_eos),
        ),
        "decoder": decoder,
        "model": model,
    });
    Ok(TokenizerFiles {
        tokenizer,
        config: tokenizer_config(gguf, p, &v),
    })
}

/// Tokens matched whole before BPE: the named special tokens and control tokens (special),
/// and user-defined tokens (not special). A byte-level control token spelled outside the byte
/// alphabet is a llama.cpp mislabel and is left out, as transformers does.
fn added_tokens(
    v: &GgufVocab,
    p: &LlamaParams,
    vocab: &Map<String, Value>,
    alphabet: &ByteAlphabet,
) -> Vec<Value> {
    let named = [
        p.bos_token_id,
        p.eos_token_id,
        p.unk_token_id,
        p.pad_token_id,
    ];
    let mut added = Vec::new();
    for (id, (token, &ty)) in v.tokens.iter().zip(&v.types).enumerate() {
        let special = if named.contains(&Some(id as u32)) {
            true
        } else {
            match ty {
                TOKEN_TYPE_CONTROL if !v.byte_level || alphabet.spells(token) => true,
                TOKEN_TYPE_USER_DEFINED if vocab.contains_key(token) => false,
                _ => continue,
            }
        };
        added.push(json!({
            "id": id, "content": token, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": special,
        }));
    }
    added
}

/// The merges as `[left, right]` pairs: from the file, or derived from the scores of a
/// SentencePiece vocabulary that lists none.
fn merges(gguf: &GgufFile, v: &GgufVocab) -> Result<Vec<Value>> {
    let bad = |problem: String| Error::format(gguf.what(), problem);
    if let Some(merges) = v.merges {
        return merges
            .iter()
            .enumerate()
            .map(|(i, m)| match m.split(' ').collect::<Vec<_>>()[..] {
                [a, b] => Ok(json!([a, b])),
                _ => Err(bad(format!(
                    "merge {i} {m:?} is not two tokens separated by a space"
                ))),
            })
            .collect();
    }
    if v.byte_level {
        return Err(bad("no tokenizer.ggml.merges".into()));
    }
    let scores = gguf
        .get("tokenizer.ggml.scores")
        .and_then(MetaValue::as_array)
        .and_then(|a| a.to_f64s())
        .filter(|s| s.len() == v.tokens.len())
        .ok_or_else(|| {
            bad(format!(
                "no tokenizer.ggml.merges, and tokenizer.ggml.scores is not a float array of \
                 {} entries to derive them from",
                v.tokens.len()
            ))
        })?;
    Ok(sentencepiece::merges_from_scores(v.tokens, &scores)
        .into_iter()
        .map(|(a, b)| json!([a, b]))
        .collect())
}

/// `tokenizer_config.json`: special tokens, BOS/EOS flags, chat template, context length.
fn tokenizer_config(gguf: &GgufFile, p: &LlamaParams, v: &GgufVocab) -> Value {
    let mut config = Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    config.insert("add_bos_token".into(), json!(v.add_bos));
    config.insert("add_eos_token".into(), json!(v.add_eos));
    for (k, id) in [
        ("bos_token", p.bos_token_id),
        ("eos_token", p.eos_token_id),
        ("unk_token", p.unk_token_id),
        ("pad_token", p.pad_token_id),
    ] {
        config.insert(k.into(), json!(v.name_of(id)));
    }
    if let Some(t) = gguf
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
    {
        config.insert("chat_template".into(), json!(t));
    }
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    config.insert("model_max_length".into(), json!(p.max_position_embeddings));
    Value::Object(config)
}

fn byte_level_json(add_prefix_space: bool, use_regex: bool) -> Value {
    json!({
        "type": "ByteLevel", "add_prefix_space": add_prefix_space,
        "trim_offsets": true, "use_regex": use_regex,
    })
}

/// The pre-tokenizer for llama.cpp's pre-tokenizer name `pre`, or `None` if unknown.
fn pre_tokenizer(pre: &str) -> Option<Value> {
    Some(match pre {
        "gpt2" | "default" => byte_level_json(false, true),
        "smollm" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level_json(false, true),
            ],
        }),
        _ if LLAMA3_PRE.contains(&pre) => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated",
                 "invert": false},
                byte_level_json(false, false),
            ],
        }),
        _ => return None,
    })
}

/// A TemplateProcessing that adds `bos`/`eos` (token, id) around each sequence, as
/// transformers sets up for `add_bos_token`/`add_eos_token`.
fn post_processor(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Value {
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (seq, type_id) in [("A", 0u32), ("B", 1)] {
        let mut part = Vec::new();
        if let Some((t, _)) = bos {
            part.push(special(t, type_id));
        }
        part.push(sequence(seq, type_id));
        if let Some((t, _)) = eos {
            part.push(special(t, type_id));
        }
        if seq == "A" {
            single = part.clone();
        }
        pair.extend(part);
    }
    let mut specials = Map::new();
    for (t, id) in bos.into_iter().chain(eos) {
        specials.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({
        "type": "TemplateProcessing", "single": single, "pair": pair,
        "special_tokens": specials,
    })
}

/// GPT-2's byte-to-character table (`bytes_to_unicode`): printable bytes stand for
/// themselves, the rest map to U+0100 onwards.
struct ByteAlphabet {
    chars: [char; 256],
}

impl ByteAlphabet {
    fn new() -> Self {
        let mut chars = ['\0'; 256];
        let mut next = 256u32;
        for (b, c) in chars.iter_mut().enumerate() {
            let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
            let code = if printable {
                b as u32
            } else {
                next += 1;
                next - 1
            };
            *c = char::from_u32(code).expect("codes below 0x200 are chars");
        }
        ByteAlphabet { chars }
    }

    /// True when every character of `token` is in the alphabet.
    fn spells(&self, token: &str) -> bool {
        token.chars().all(|c| self.chars.contains(&c))
    }

    /// `token` itself when written in the alphabet, else its UTF-8 bytes spelled in it.
    fn spell(&self, token: &str) -> String {
        if self.spells(token) {
            token.to_string()
        } else {
            token.bytes().map(|b| self.chars[b as usize]).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let a = ByteAlphabet::new();
        assert_eq!(a.chars[b' ' as usize], 'Ġ');
        assert_eq!(a.chars[b'\n' as usize], 'Ċ');
        assert_eq!(a.chars[b'A' as usize], 'A');
        assert_eq!(a.chars[0xAD], 'Ń');
        assert_eq!(a.spell("a b"), "aĠb");
        assert_eq!(a.spell("Ġhello"), "Ġhello");
    }

    #[test]
    fn pre_tokenizers_by_name() {
        let smollm = pre_tokenizer("smollm").unwrap();
        assert_eq!(smollm["pretokenizers"][0]["type"], "Digits");
        assert_eq!(smollm["pretokenizers"][1]["use_regex"], true);
        let llama3 = pre_tokenizer("llama-bpe").unwrap();
        assert_eq!(llama3["pretokenizers"][0]["pattern"]["Regex"], LLAMA3_SPLIT);
        assert_eq!(llama3["pretokenizers"][1]["use_regex"], false);
        assert_eq!(pre_tokenizer("gpt2").unwrap()["type"], "ByteLevel");
        assert!(pre_tokenizer("qwen2").is_none());
    }

    #[test]
    fn sentencepiece_vocab_matches_transformers() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
        let gguf = GgufFile::open(&dir.join("sp_vocab.gguf")).unwrap();
        let p = LlamaParams {
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            unk_token_id: Some(0),
            max_position_embeddings: 4096,
            ..LlamaParams::default()
        };
        let files = tokenizer_files(&gguf, &p).unwrap();
        let bytes = std::fs::read(dir.join("sp_vocab_expected_tokenizer.json")).unwrap();
        let want: Value = serde_json::from_slice(&bytes).unwrap();
        for k in [
            "added_tokens",
            "normalizer",
            "pre_tokenizer",
            "post_processor",
            "decoder",
            "model",
        ] {
            assert_eq!(files.tokenizer[k], want[k], "tokenizer.json {k}");
        }
        assert_eq!(files.config["add_bos_token"], true);
        assert_eq!(files.config["unk_token"], "<unk>");
    }
}
