//! GPT-2's byte-to-character alphabet: every byte gets a printable character, so that any byte
//! string can be spelled with vocabulary entries (`Ġ` is the space, `Ċ` the newline).

/// The character standing for each byte.
pub(crate) fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
        let code = if printable {
            b as u32
        } else {
            extra += 1;
            255 + extra
        };
        // Every code here is below 0x200, a valid scalar value.
        *slot = char::from_u32(code).unwrap_or('\0');
    }
    table
}

/// The byte a character of the alphabet stands for, or `None` if it is not one of them.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let code = c as u32;
    match code {
        33..=126 | 161..=172 | 174..=255 => Some(code as u8),
        256..=323 => {
            // The non-printable bytes in ascending order: 0..=32, 127..=160, 173.
            let k = code - 256;
            Some(match k {
                0..=32 => k as u8,
                33..=66 => (k - 33 + 127) as u8,
                _ => 173,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_round_trips_and_spells_gpt2() {
        let table = byte_to_char_table();
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(table[b as usize]), Some(b));
        }
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[0xAD], 'Ń');
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(char_to_byte('ł'), Some(0xA0));
    }
}
