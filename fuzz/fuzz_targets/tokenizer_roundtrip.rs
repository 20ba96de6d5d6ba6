//! Arbitrary text through the byte-level BPE tokenizer of SmolLM2 (the test fixture): encoding
//! never panics, every id is in the vocabulary, and decoding the ids gives the text back when
//! every character of it is representable (SmolLM2's vocabulary lacks a few control bytes,
//! which Hugging Face `tokenizers` drops too). Arbitrary ids decode without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use sun_assistant::tokenizer::Tokenizer;

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/tokenizers/smollm2/tokenizer.json"
        );
        Tokenizer::from_file(std::path::Path::new(path))
            .expect("the SmolLM2 fixture tokenizer loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let tok = tokenizer();
    if let Ok(text) = std::str::from_utf8(data) {
        let ids = tok.encode(text, false);
        assert!(
            ids.iter().all(|&id| (id as usize) < tok.vocab_size()),
            "id outside the vocabulary"
        );
        let representable = |c: char| {
            tok.decode(&tok.encode(c.encode_utf8(&mut [0; 4]), false), false) == c.to_string()
        };
        if text.chars().all(representable) {
            // Special-token text is matched as one token and decodes back to itself too.
            assert_eq!(
                tok.decode(&ids, false),
                text,
                "decode(encode(text)) != text"
            );
        }
    }
    let ids: Vec<u32> = data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let _ = tok.decode(&ids, true);
});
