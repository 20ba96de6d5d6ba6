//! BPE tokenizers from Hugging Face `tokenizer.json`: byte-level and SentencePiece-style.
