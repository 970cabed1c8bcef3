//! Streaming stop-marker detection: a decoder feeds each new token's text and learns, at the
//! token that completes it, that a thread wrote a marker such as `<Sub Searches>` (spec §6.1),
//! however the tokenizer split the marker.

/// Where a marker was found in the text fed so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopHit {
    /// Index of the marker in the list given to [`StopDetector::new`].
    pub marker: usize,
    /// Byte offset, in everything fed so far, where the marker starts: the text to keep.
    pub start: usize,
}

/// Finds the first occurrence of any of a few fixed markers in a stream of text pieces.
///
/// It keeps only the last `longest marker − 1` bytes between calls, so its cost per piece is
/// proportional to the piece, whatever the thread's length.
#[derive(Clone, Debug)]
pub struct StopDetector {
    markers: Vec<Vec<u8>>,
    window: Vec<u8>,
    fed: usize,
    hit: Option<StopHit>,
}

impl StopDetector {
    /// A detector for these markers (empty markers are ignored).
    pub fn new<S: AsRef<str>>(markers: &[S]) -> Self {
        StopDetector {
            markers: markers
                .iter()
                .map(|m| m.as_ref().as_bytes().to_vec())
                .filter(|m| !m.is_empty())
                .collect(),
            window: Vec::new(),
            fed: 0,
            hit: None,
        }
    }

    /// Feeds the next piece of text; returns the first hit once it is complete (and keeps
    /// returning it afterwards).
    pub fn push(&mut self, piece: &str) -> Option<StopHit> {
        if self.hit.is_some() {
            return self.hit;
        }
        let window_start = self.fed - self.window.len();
        self.window.extend_from_slice(piece.as_bytes());
        self.fed += piece.len();
        // Earliest-starting marker wins; on a tie the earlier marker in the list.
        let mut best: Option<StopHit> = None;
        for (i, marker) in self.markers.iter().enumerate() {
            if let Some(pos) = find(&self.window, marker) {
                let start = window_start + pos;
                if best.is_none_or(|b| start < b.start) {
                    best = Some(StopHit { marker: i, start });
                }
            }
        }
        if best.is_some() {
            self.hit = best;
            return best;
        }
        let keep = self.markers.iter().map(Vec::len).max().unwrap_or(1) - 1;
        if self.window.len() > keep {
            self.window.drain(..self.window.len() - keep);
        }
        None
    }

    /// Forgets everything fed so far (same markers), as if `offset` bytes had been fed that
    /// cannot be part of a marker: later hits are reported from `offset` on. A caller that feeds
    /// a thread's text from byte `offset` gets hits as offsets into that text.
    pub fn restart(&mut self, offset: usize) {
        self.window.clear();
        self.fed = offset;
        self.hit = None;
    }

    /// Bytes fed so far (counted from the last restart's offset).
    pub fn fed(&self) -> usize {
        self.fed
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_marker_split_across_pieces() {
        let mut d = StopDetector::new(&["<Sub Searches>"]);
        assert_eq!(d.push("abc\n<Sub"), None);
        assert_eq!(d.push(" Sear"), None);
        let hit = d.push("ches>\nmore").unwrap();
        assert_eq!(
            hit,
            StopHit {
                marker: 0,
                start: 4
            }
        );
        assert_eq!(d.push("x"), Some(hit));
    }

    #[test]
    fn calling_block_is_not_a_join_marker() {
        let mut d = StopDetector::new(&["<Sub Searches>"]);
        for piece in [
            "<Calling Sub Searches>\n",
            "<End Calling Sub Searches>\n",
            "<End Sub Searches>",
        ] {
            assert_eq!(d.push(piece), None);
        }
    }
}
