//! Argument checks shared by the launch wrappers: buffer lengths, sizes that must fit the
//! kernels' integer types, and grid sizes within the hardware's limits.

use crate::error::{Error, Result};

/// The largest grid x dimension (2^31 - 1).
pub(crate) const MAX_GRID_X: usize = (1 << 31) - 1;

/// `what` must hold exactly `expected` elements.
pub(crate) fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    if len != expected {
        return Err(Error::invalid(format!(
            "{what} has {len} elements; expected {expected}"
        )));
    }
    Ok(())
}

/// `what` must hold at least `needed` elements (a reused buffer whose prefix is used).
pub(crate) fn check_len_at_least(what: &str, len: usize, needed: usize) -> Result<()> {
    if len < needed {
        return Err(Error::invalid(format!(
            "{what} has {len} elements; needs at least {needed}"
        )));
    }
    Ok(())
}

/// `value` as the kernels' `int64_t`.
pub(crate) fn to_i64(value: usize, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::invalid(format!("{what} = {value} is too large")))
}

/// A grid dimension of `count` blocks, at most `limit` (and at least 1).
pub(crate) fn grid_dim(count: usize, limit: usize, what: &str) -> Result<u32> {
    if count == 0 || count > limit {
        return Err(Error::invalid(format!(
            "{what}: {count} thread blocks are outside the launch limits (1..={limit})"
        )));
    }
    // count <= limit <= 2^31 - 1 fits a u32.
    Ok(count as u32)
}

/// Rows of a row-major (rows, width) tensor of `len` elements.
pub(crate) fn rows_of(what: &str, len: usize, width: usize) -> Result<usize> {
    if width == 0 || len % width != 0 || len == 0 {
        return Err(Error::invalid(format!(
            "{what}: {len} elements are not a whole number of rows of width {width}"
        )));
    }
    Ok(len / width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        assert!(check_len("x", 3, 3).is_ok());
        assert_eq!(
            check_len("x", 2, 3).unwrap_err().to_string(),
            "x has 2 elements; expected 3"
        );
        assert_eq!(rows_of("x", 12, 4).unwrap(), 3);
        assert!(rows_of("x", 13, 4).is_err());
        assert!(rows_of("x", 0, 4).is_err());
        assert!(rows_of("x", 4, 0).is_err());
        assert_eq!(grid_dim(7, MAX_GRID_X, "g").unwrap(), 7);
        assert!(grid_dim(0, MAX_GRID_X, "g").is_err());
        assert!(grid_dim(1 << 31, MAX_GRID_X, "g").is_err());
        assert!(to_i64(usize::MAX, "n").is_err());
    }
}
