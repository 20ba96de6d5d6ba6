//! BPE tokenizers from Hugging Face `tokenizer.json`: byte-level (GPT-2, SmolLM2, LLaMA-3) and
//! SentencePiece-style (LLaMA-1/2), with ids equal to HF `tokenizers`.
//!
//! Encoding runs HF's pipeline: added tokens are cut out of the raw text, each remaining piece
//! is normalized and searched again for normalized added tokens, pre-tokenized into words, and
//! each word goes through the BPE model; the post-processor then adds BOS/EOS. Decoding maps ids
//! back to token strings and runs the decoder chain.
//!
//! Private pieces, one job each: `json` (typed field access with errors naming the field),
//! `config` (tokenizer_config.json), `normalizer`, `pre_tokenizer` with the hand-written
//! `split_patterns` over `char_class` and the generated `unicode_tables`, `byte_level` (GPT-2's
//! byte alphabet), `bpe`, `added_tokens`, `post_processor`, `decoder`, and `decode_stream`.
//!
//! Supported: BPE models (byte fallback, fused unknowns, `ignore_merges`, subword prefix and
//! word suffix); normalizers Sequence/Prepend/Replace; pre-tokenizers Sequence/ByteLevel/
//! Digits and Split with the GPT-2 or LLaMA-3 pattern; post-processors TemplateProcessing/
//! ByteLevel; decoders Sequence/ByteLevel/Replace/ByteFallback/Fuse/Strip. Anything else is an
//! `Error::Unsupported` naming the field.

mod added_tokens;
mod bpe;
mod byte_level;
mod char_class;
mod config;
mod decode_stream;
mod decoder;
mod json;
mod normalizer;
mod post_processor;
mod pre_tokenizer;
mod split_patterns;
mod unicode_tables;

pub use decode_stream::DecodeStream;

use crate::error::{Error, Result};
use added_tokens::{AddedTokens, Segment};
use bpe::Bpe;
use config::TokenizerConfig;
use decoder::Decoder;
use json::At;
use normalizer::Normalizer;
use post_processor::PostProcessor;
use pre_tokenizer::PreTokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Special tokens that end a turn or a document in LLaMA-family vocabularies; any of them that
/// the tokenizer has as a special token ends generation, besides its configured EOS.
const END_TOKENS: &[&str] = &[
    "</s>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|endoftext|>",
];

/// A BPE tokenizer loaded from `tokenizer.json` (and `tokenizer_config.json` beside it).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    model: Bpe,
    added: AddedTokens,
    normalizer: Option<Normalizer>,
    pre_tokenizer: Option<PreTokenizer>,
    post_processor: PostProcessor,
    decoder: Option<Decoder>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads `path`: a `tokenizer.json`, or a folder holding one. A `tokenizer_config.json`
    /// beside it is read when present, and `chat_template.jinja` when the config has no
    /// template (transformers 5 writes the template there).
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let file: PathBuf = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let json = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let dir = file.parent().unwrap_or(Path::new("."));
        let read_optional = |name: &str| -> Result<Option<(String, PathBuf)>> {
            let p = dir.join(name);
            match std::fs::read_to_string(&p) {
                Ok(text) => Ok(Some((text, p))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(&p, e)),
            }
        };
        let mut config = match read_optional("tokenizer_config.json")? {
            Some((text, p)) => Some(TokenizerConfig::parse(&text, &p.display().to_string())?),
            None => None,
        };
        if let Some(config) = config.as_mut().filter(|c| c.chat_template.is_none()) {
            config.chat_template = read_optional("chat_template.jinja")?.map(|(t, _)| t);
        }
        Self::build(&json, config, &file.display().to_string())
    }

    /// Parses the text of a `tokenizer.json` and, optionally, of its `tokenizer_config.json`.
    pub fn from_json(json: &str, config: Option<&str>) -> Result<Tokenizer> {
        let config = config
            .map(|c| TokenizerConfig::parse(c, "tokenizer_config.json"))
            .transpose()?;
        Self::build(json, config, "tokenizer.json")
    }

    fn build(json: &str, config: Option<TokenizerConfig>, file: &str) -> Result<Tokenizer> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| Error::format(file, format!("not valid JSON: {e}")))?;
        let root = At::root(file);
        let obj = root.object(&value)?;
        for key in ["truncation", "padding"] {
            if obj.get(key).is_some_and(|v| !v.is_null()) {
                return Err(root.key(key).unsupported(
                    "truncation and padding belong to the data pipeline; set them to null",
                ));
            }
        }
        let component = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let normalizer = component("normalizer")
            .map(|v| Normalizer::from_json(v, &root.key("normalizer")))
            .transpose()?;
        let pre_tokenizer = component("pre_tokenizer")
            .map(|v| PreTokenizer::from_json(v, &root.key("pre_tokenizer")))
            .transpose()?;
        let decoder = component("decoder")
            .map(|v| Decoder::from_json(v, &root.key("decoder")))
            .transpose()?;
        let model_value = component("model").ok_or_else(|| root.key("model").error("missing"))?;
        let model = Bpe::from_json(model_value, &root.key("model"))?;
        let added = AddedTokens::from_json(
            obj.get("added_tokens"),
            &root.key("added_tokens"),
            normalizer.as_ref(),
        )?;
        let mut tokenizer = Tokenizer {
            model,
            added,
            normalizer,
            pre_tokenizer,
            post_processor: PostProcessor::default(),
            decoder,
            bos_id: None,
            eos_id: None,
            chat_template: None,
        };
        let config = config.unwrap_or_default();
        let id_of = |name: &Option<String>, key: &str| -> Result<Option<u32>> {
            match name {
                None => Ok(None),
                Some(name) => tokenizer.token_to_id(name).map(Some).ok_or_else(|| {
                    Error::invalid(format!(
                        "tokenizer_config.json: {key} {name:?} is not a token of {file}"
                    ))
                }),
            }
        };
        let bos_id = id_of(&config.bos_token, "bos_token")?;
        let eos_id = id_of(&config.eos_token, "eos_token")?;
        // The post-processor in tokenizer.json decides what encode adds, as transformers 5
        // does; the config's add_bos_token/add_eos_token only apply when the file has none.
        tokenizer.post_processor = match component("post_processor") {
            Some(v) => PostProcessor::from_json(v, &root.key("post_processor"))?,
            None => {
                let want = |flag: Option<bool>, id: Option<u32>, key: &str| match (flag, id) {
                    (Some(true), None) => Err(Error::invalid(format!(
                        "tokenizer_config.json: {key} is true but no token is named for it"
                    ))),
                    (Some(true), id) => Ok(id),
                    _ => Ok(None),
                };
                PostProcessor::wrap(
                    want(config.add_bos_token, bos_id, "add_bos_token")?,
                    want(config.add_eos_token, eos_id, "add_eos_token")?,
                )
            }
        };
        tokenizer.bos_id = bos_id.or_else(|| tokenizer.post_processor.leading_special());
        tokenizer.eos_id = eos_id;
        tokenizer.chat_template = config.chat_template;
        Ok(tokenizer)
    }

    /// The ids of `text`; with `add_special_tokens`, wrapped by the post-processor (BOS for
    /// LLaMA-2). Special-token text in `text` (like `<|im_start|>`) always becomes its id.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        for segment in self.added.split_raw(text) {
            let raw = match segment {
                Segment::Token(id) => {
                    ids.push(id);
                    continue;
                }
                Segment::Text(raw) => raw,
            };
            let mut normalized = raw.to_owned();
            if let Some(n) = &self.normalizer {
                n.normalize(&mut normalized);
            }
            for piece in self.added.split_normalized(&normalized) {
                match piece {
                    Segment::Token(id) => ids.push(id),
                    Segment::Text(text) => self.encode_words(text, &mut ids),
                }
            }
        }
        if add_special_tokens {
            self.post_processor.apply(ids)
        } else {
            ids
        }
    }

    /// Pre-tokenizes normalized `text` and runs the model over each word.
    fn encode_words(&self, text: &str, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        match &self.pre_tokenizer {
            None => self.model.tokenize(text, ids),
            Some(pre) => {
                let mut words = vec![text.to_owned()];
                pre.pre_tokenize(&mut words);
                for word in &words {
                    self.model.tokenize(word, ids);
                }
            }
        }
    }

    /// The text of `ids`. Unknown ids are left out (as HF does); with `skip_special_tokens`,
    /// special tokens are too.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let tokens: Vec<String> = ids
            .iter()
            .filter_map(|&id| self.id_to_token(id))
            .filter(|token| !skip_special_tokens || !self.added.is_special_text(token))
            .map(str::to_owned)
            .collect();
        match &self.decoder {
            Some(decoder) => decoder.decode(tokens),
            None => tokens.join(" "),
        }
    }

    /// The id of `token` (added tokens first, then the model's vocabulary).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.added
            .id_of(token)
            .or_else(|| self.model.token_to_id(token))
    }

    /// The token string of `id` (added tokens first, then the model's vocabulary). As in HF, an
    /// added token marked `normalized` comes back normalized (`▁[NAME]` for `[NAME]` under a
    /// SentencePiece normalizer).
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        match self.added.get(id) {
            Some(token) => Some(&token.spelled),
            None => self.model.id_to_token(id),
        }
    }

    /// The number of distinct tokens: the model's vocabulary plus the added tokens it lacks
    /// (HF's `get_vocab_size(with_added_tokens=True)`).
    pub fn vocab_size(&self) -> usize {
        let extra = self
            .added
            .iter()
            .filter(|t| self.model.token_to_id(&t.content).is_none())
            .count();
        self.model.len() + extra
    }

    /// The beginning-of-sequence id: the config's `bos_token`, else the special token the
    /// post-processor puts first.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The end-of-sequence id: the config's `eos_token`.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Every id that ends generation: the EOS, then each end-of-turn or end-of-text special
    /// token the vocabulary has (`<|eot_id|>`, `<|im_end|>`, `</s>`, ...), without repeats.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos_id.into_iter().collect();
        for name in END_TOKENS {
            if let Some(id) = self.added.id_of(name) {
                if self.added.get(id).is_some_and(|t| t.special) && !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// The Jinja chat template of the config (or `chat_template.jinja`), if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny SentencePiece-style tokenizer in the LLaMA-2 layout.
    fn tiny_sentencepiece() -> Tokenizer {
        let mut vocab = vec![
            "\"<unk>\":0".to_owned(),
            "\"<s>\":1".into(),
            "\"</s>\":2".into(),
        ];
        vocab.extend((0..256).map(|b| format!("\"<0x{b:02X}>\":{}", b + 3)));
        for (k, t) in ["▁", "h", "i", "▁h", "▁hi"].iter().enumerate() {
            vocab.push(format!("\"{t}\":{}", 259 + k));
        }
        let json = format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,
            "added_tokens":[{{"id":1,"content":"<s>","special":true,"normalized":false}},
                            {{"id":2,"content":"</s>","special":true,"normalized":false}}],
            "normalizer":{{"type":"Sequence","normalizers":[{{"type":"Prepend","prepend":"▁"}},
                {{"type":"Replace","pattern":{{"String":" "}},"content":"▁"}}]}},
            "pre_tokenizer":null,
            "post_processor":{{"type":"TemplateProcessing",
                "single":[{{"SpecialToken":{{"id":"<s>","type_id":0}}}},
                          {{"Sequence":{{"id":"A","type_id":0}}}}],
                "special_tokens":{{"<s>":{{"id":"<s>","ids":[1],"tokens":["<s>"]}}}}}},
            "decoder":{{"type":"Sequence","decoders":[
                {{"type":"Replace","pattern":{{"String":"▁"}},"content":" "}},
                {{"type":"ByteFallback"}},{{"type":"Fuse"}},
                {{"type":"Strip","content":" ","start":1,"stop":0}}]}},
            "model":{{"type":"BPE","dropout":null,"unk_token":"<unk>","fuse_unk":true,
                "byte_fallback":true,"vocab":{{{}}},"merges":["▁ h","▁h i"]}}}}"#,
            vocab.join(",")
        );
        Tokenizer::from_json(&json, Some(r#"{"bos_token":"<s>","eos_token":"</s>"}"#)).unwrap()
    }

    #[test]
    fn sentencepiece_round_trip() {
        let t = tiny_sentencepiece();
        // "hi hé</s>" -> ▁hi ▁h <0xC3> <0xA9>, then </s> as a special token.
        assert_eq!(
            t.encode("hi hé</s>", true),
            [1, 263, 262, 0xC3 + 3, 0xA9 + 3, 2]
        );
        assert_eq!(t.encode("", true), [1]);
        assert_eq!(
            t.decode(&[1, 263, 262, 0xC3 + 3, 0xA9 + 3, 2], false),
            "<s> hi hé</s>"
        );
        assert_eq!(t.decode(&[1, 263, 262, 2, 99_999], true), "hi h");
        assert_eq!(
            (t.bos_id(), t.eos_id(), t.eos_ids()),
            (Some(1), Some(2), vec![2])
        );
        assert_eq!(t.vocab_size(), 264);
        assert_eq!(t.id_to_token(263), Some("▁hi"));
        assert_eq!(t.token_to_id("<0x41>"), Some(0x41 + 3));
    }

    #[test]
    fn unsupported_parts_are_named() {
        let err = Tokenizer::from_json(r#"{"model":{"type":"Unigram","vocab":[]}}"#, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.type") && err.contains("Unigram"),
            "{err}"
        );
        let err = Tokenizer::from_json("{", None).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
