//! The character classes of the split patterns (`\p{L}`, `\p{N}`, `\s`) and of the added-token
//! word test (`\w`), looked up in the generated tables with an ASCII fast path.

use super::unicode_tables::{LETTER, NUMBER, SPACE, WORD};

/// True if `c` lies in one of the sorted, disjoint, inclusive `ranges`.
fn in_ranges(ranges: &[(u32, u32)], c: char) -> bool {
    let c = c as u32;
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// `\p{L}`: a letter.
pub(crate) fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphabetic()
    } else {
        in_ranges(LETTER, c)
    }
}

/// `\p{N}`: a number (digit, letter-like number or other number).
pub(crate) fn is_number(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_digit()
    } else {
        in_ranges(NUMBER, c)
    }
}

/// `\s`: whitespace as Oniguruma sees it (tab, LF, VT, FF, CR, space, NEL, NBSP, ...).
pub(crate) fn is_space(c: char) -> bool {
    if c.is_ascii() {
        matches!(c, '\t' | '\n' | '\x0B' | '\x0C' | '\r' | ' ')
    } else {
        in_ranges(SPACE, c)
    }
}

/// `\w` of the Rust `regex` crate: alphabetic, marks, decimal digits, connector punctuation and
/// the joiners. HF's added-token `single_word` test uses it.
pub(crate) fn is_word(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphanumeric() || c == '_'
    } else {
        c.is_alphabetic() || in_ranges(WORD, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_sorted_and_disjoint() {
        for table in [LETTER, NUMBER, SPACE, WORD] {
            for w in table.windows(2) {
                assert!(w[0].0 <= w[0].1 && w[0].1 < w[1].0, "{w:?}");
            }
        }
    }

    #[test]
    fn ascii_fast_path_agrees_with_tables() {
        for b in 0u8..128 {
            let c = b as char;
            assert_eq!(is_letter(c), in_ranges(LETTER, c), "{c:?}");
            assert_eq!(is_number(c), in_ranges(NUMBER, c), "{c:?}");
            assert_eq!(is_space(c), in_ranges(SPACE, c), "{c:?}");
            assert_eq!(is_word(c), c.is_alphabetic() || in_ranges(WORD, c), "{c:?}");
        }
    }

    #[test]
    fn oniguruma_space_is_rust_whitespace() {
        // Checked once so that nobody swaps in `char::is_whitespace` unknowingly: today they agree.
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
            assert_eq!(is_space(c), c.is_whitespace(), "{c:?}");
        }
    }

    #[test]
    fn classes_of_known_characters() {
        // Marks are not letters, though `char::is_alphabetic` says yes to some.
        assert!(!is_letter('\u{0301}'));
        assert!(!is_letter('\u{093F}') && '\u{093F}'.is_alphabetic());
        assert!(is_letter('é') && is_letter('ж') && is_letter('中') && is_letter('ー'));
        assert!(is_number('٣') && is_number('²') && is_number('Ⅻ') && !is_number('a'));
        assert!(is_space('\u{00A0}') && is_space('\u{3000}') && !is_space('\u{200B}'));
        assert!(!is_space('\u{1C}'));
        assert!(is_word('_') && is_word('\u{0301}') && !is_word('-'));
    }
}
