//! Stop sequences on streamed text: text is released as soon as it can no longer be the start of
//! a stop sequence, and generation ends at the first complete one, which is not released.

/// Watches streamed text for the first of some stop sequences.
#[derive(Debug)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not released: it may be the beginning of a stop sequence.
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub(crate) fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds `text`; returns the text now safe to release and whether a stop sequence completed
    /// (then the returned text ends where the stop sequence began, and nothing more follows).
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.held.truncate(at);
            return (std::mem::take(&mut self.held), true);
        }
        let keep = self.partial_stop_len();
        let released = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (released, false)
    }

    /// The text still held back, once generation ended without a stop sequence.
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The length of the longest end of `held` that begins some stop sequence.
    fn partial_stop_len(&self) -> usize {
        self.held
            .char_indices()
            .map(|(i, _)| &self.held[i..])
            .find(|tail| self.stops.iter().any(|stop| stop.starts_with(tail)))
            .map_or(0, str::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces`; returns everything released and whether a stop sequence was hit.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            let (text, hit) = m.push(piece);
            out.push_str(&text);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stops_across_pieces_and_releases_the_rest() {
        assert_eq!(
            run(&["###"], &["Hello", " #", "#", "# Human"]),
            ("Hello ".into(), true)
        );
        assert_eq!(run(&["###"], &["a#", "#b", "c"]), ("a##bc".into(), false));
        assert_eq!(run(&[], &["x", "y"]), ("xy".into(), false));
        assert_eq!(run(&[""], &["x"]), ("x".into(), false));
        // the earliest of several stop sequences wins
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
        // multi-byte characters are held and cut on their boundaries
        assert_eq!(run(&["é!"], &["café", "?"]), ("café?".into(), false));
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
    }

    #[test]
    fn holds_only_what_could_still_stop() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("the E"), ("the ".into(), false));
        assert_eq!(m.push("N"), ("".into(), false));
        assert_eq!(m.push("D"), ("".into(), true));
    }
}
