//! Hand-written matchers for the two split regexes LLaMA-family tokenizers use, recognised by
//! their exact pattern strings. Each alternative is tried in order at a position, the way the
//! backtracking engine HF uses (Oniguruma) does; every character is covered by some
//! alternative, so the matches tile the text and no gaps are left between them.

use super::char_class::{is_letter, is_number, is_space};

/// GPT-2's pattern (also ByteLevel's built-in one).
pub(crate) const GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// LLaMA-3's pattern.
pub(crate) const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A split regex this engine knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SplitPattern {
    /// [`GPT2`].
    Gpt2,
    /// [`LLAMA3`].
    Llama3,
}

impl SplitPattern {
    /// The matcher for `regex`, if it is one of the known patterns.
    pub(crate) fn from_regex(regex: &str) -> Option<Self> {
        match regex {
            GPT2 => Some(SplitPattern::Gpt2),
            LLAMA3 => Some(SplitPattern::Llama3),
            _ => None,
        }
    }

    /// The byte ranges of the successive matches in `text`; they tile it exactly.
    pub(crate) fn matches(self, text: &str) -> Vec<(usize, usize)> {
        let chars: Vec<char> = text.chars().collect();
        let mut byte_at = Vec::with_capacity(chars.len() + 1);
        byte_at.extend(text.char_indices().map(|(b, _)| b));
        byte_at.push(text.len());
        let mut out = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let end = match self {
                SplitPattern::Gpt2 => gpt2_match(&chars, i),
                SplitPattern::Llama3 => llama3_match(&chars, i),
            };
            // Every alternative consumes at least one character; the max guards the loop anyway.
            let end = end.max(i + 1);
            out.push((byte_at[i], byte_at[end]));
            i = end;
        }
        out
    }
}

/// The length of a contraction suffix (`s t re ve m ll d`) starting at `chars[i]`, after an
/// apostrophe. `fold` matches case-insensitively with Unicode folding (`ſ` is an `s`).
fn contraction(chars: &[char], i: usize, fold: bool) -> Option<usize> {
    let norm = |k: usize| -> Option<char> {
        let c = *chars.get(k)?;
        Some(if fold {
            match c {
                'ſ' => 's',
                _ => c.to_ascii_lowercase(),
            }
        } else {
            c
        })
    };
    match norm(i)? {
        's' | 't' | 'm' | 'd' => Some(1),
        'r' | 'v' if norm(i + 1) == Some('e') => Some(2),
        'l' if norm(i + 1) == Some('l') => Some(2),
        _ => None,
    }
}

/// The end of the run of characters from `i` that satisfy `class`.
fn run(chars: &[char], mut i: usize, class: impl Fn(char) -> bool) -> usize {
    while i < chars.len() && class(chars[i]) {
        i += 1;
    }
    i
}

/// Neither whitespace, letter nor number: `[^\s\p{L}\p{N}]`.
fn is_other(c: char) -> bool {
    !is_space(c) && !is_letter(c) && !is_number(c)
}

/// `\s+(?!\S)|\s+` at `i`, where `chars[i]` is whitespace: the whole run if it ends the text,
/// else the run less its last character (which stays to lead the next word), else one char.
fn whitespace_tail(chars: &[char], i: usize) -> usize {
    let end = run(chars, i, is_space);
    if end == chars.len() || end - i < 2 {
        end
    } else {
        end - 1
    }
}

/// The end of the GPT-2 match at `i`.
fn gpt2_match(chars: &[char], i: usize) -> usize {
    let c = chars[i];
    if c == '\'' {
        if let Some(n) = contraction(chars, i + 1, false) {
            return i + 1 + n;
        }
    }
    // ` ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+`: the optional space only if a non-space follows.
    let start = match chars.get(i + 1) {
        Some(&next) if c == ' ' && !is_space(next) => i + 1,
        _ => i,
    };
    let d = chars[start];
    if is_letter(d) {
        run(chars, start, is_letter)
    } else if is_number(d) {
        run(chars, start, is_number)
    } else if !is_space(d) {
        run(chars, start, is_other)
    } else {
        whitespace_tail(chars, i)
    }
}

/// The end of the LLaMA-3 match at `i`.
fn llama3_match(chars: &[char], i: usize) -> usize {
    let c = chars[i];
    let next = chars.get(i + 1).copied();
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if c == '\'' {
        if let Some(n) = contraction(chars, i + 1, true) {
            return i + 1 + n;
        }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if is_letter(c) {
        return run(chars, i, is_letter);
    }
    if c != '\r' && c != '\n' && !is_number(c) && next.is_some_and(is_letter) {
        return run(chars, i + 1, is_letter);
    }
    // \p{N}{1,3}
    if is_number(c) {
        let limit = chars.len().min(i + 3);
        return run(&chars[..limit], i, is_number);
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    let start = if c == ' ' && next.is_some_and(is_other) {
        i + 1
    } else {
        i
    };
    if is_other(chars[start]) {
        let end = run(chars, start, is_other);
        return run(chars, end, |c| c == '\r' || c == '\n');
    }
    // `\s*[\r\n]+`: up to and including the last line break of the whitespace run.
    let end = run(chars, i, is_space);
    if let Some(last_break) = (i..end)
        .rev()
        .find(|&k| chars[k] == '\r' || chars[k] == '\n')
    {
        return last_break + 1;
    }
    whitespace_tail(chars, i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(pattern: SplitPattern, text: &str) -> Vec<&str> {
        pattern
            .matches(text)
            .into_iter()
            .map(|(a, b)| &text[a..b])
            .collect()
    }

    #[test]
    fn gpt2_splits_like_the_regex() {
        // Expected pieces from HF tokenizers' Split(Regex(GPT2), "isolated").
        assert_eq!(
            pieces(SplitPattern::Gpt2, "I'm  here's 12ab\t\n x!! "),
            ["I", "'m", " ", " here", "'s", " 12", "ab", "\t\n", " x", "!!", " "]
        );
        assert_eq!(
            pieces(SplitPattern::Gpt2, "'S 'sup"),
            ["'", "S", " '", "sup"]
        );
    }

    #[test]
    fn llama3_splits_like_the_regex() {
        // Expected pieces from HF tokenizers' Split(Regex(LLAMA3), "isolated").
        assert_eq!(
            pieces(SplitPattern::Llama3, "'ſ x'ſup 'K 'RE 'Ll"),
            ["'ſ", " x", "'ſ", "up", " '", "K", " '", "RE", " '", "Ll"]
        );
        assert_eq!(
            pieces(SplitPattern::Llama3, "a \n\n  b"),
            ["a", " \n\n", " ", " b"]
        );
        assert_eq!(
            pieces(SplitPattern::Llama3, "x  \t\r\n \ty"),
            ["x", "  \t\r\n", " ", "\ty"]
        );
        assert_eq!(
            pieces(SplitPattern::Llama3, "12345 .!\n\nz"),
            ["123", "45", " .!\n\n", "z"]
        );
    }

    #[test]
    fn unknown_pattern_is_not_recognised() {
        assert_eq!(SplitPattern::from_regex(r"\p{L}+"), None);
        assert_eq!(SplitPattern::from_regex(LLAMA3), Some(SplitPattern::Llama3));
    }
}
