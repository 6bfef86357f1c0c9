//! Incremental UTF-8 validation for text messages that arrive in pieces.
//!
//! A text message may be split across frames and across reads at any byte, so
//! a multi-byte character can straddle two chunks. The validator carries at
//! most three bytes of an unfinished character between calls and fails as soon
//! as the bytes seen so far cannot be the start of valid UTF-8 (the "fail fast"
//! behaviour Autobahn's section 6 checks).

/// State carried between chunks of one text stream.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    pending: [u8; 4],
    pending_len: u8,
}

/// The bytes seen so far are not a prefix of any valid UTF-8 string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

fn char_width(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 0,
    }
}

impl Utf8Validator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether an unfinished character is being carried.
    pub fn is_pending(&self) -> bool {
        self.pending_len != 0
    }

    /// Validates the next chunk.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), InvalidUtf8> {
        if self.pending_len > 0 {
            let have = self.pending_len as usize;
            let width = char_width(self.pending[0]);
            let take = (width - have).min(chunk.len());
            self.pending[have..have + take].copy_from_slice(&chunk[..take]);
            let now = have + take;
            match std::str::from_utf8(&self.pending[..now]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_none() && now < width => {
                    self.pending_len = now as u8;
                    return Ok(());
                }
                Err(_) => return Err(InvalidUtf8),
            }
            chunk = &chunk[take..];
        }
        match std::str::from_utf8(chunk) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &chunk[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// Ends the stream: an unfinished character is an error.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let pending = self.pending_len;
        self.pending_len = 0;
        if pending == 0 {
            Ok(())
        } else {
            Err(InvalidUtf8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn validate_in_pieces(data: &[u8], cuts: &[usize]) -> bool {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &c in cuts {
            let c = c.clamp(start, data.len());
            if v.feed(&data[start..c]).is_err() {
                return false;
            }
            start = c;
        }
        v.feed(&data[start..]).is_ok() && v.finish().is_ok()
    }

    #[test]
    fn split_characters_are_accepted() {
        let s = "κόσμε€𝄞".as_bytes();
        for i in 0..s.len() {
            for j in i..s.len() {
                assert!(validate_in_pieces(s, &[i, j]), "cuts {i} {j}");
            }
        }
    }

    #[test]
    fn fails_fast_on_impossible_prefix() {
        let mut v = Utf8Validator::new();
        assert!(v.feed(&[0xce, 0xba]).is_ok());
        assert_eq!(v.feed(&[0xff]), Err(InvalidUtf8));
        let mut v = Utf8Validator::new();
        assert!(v.feed(&[0xf4]).is_ok());
        assert_eq!(v.feed(&[0x90]), Err(InvalidUtf8)); // above U+10FFFF
        let mut v = Utf8Validator::new();
        assert!(v.feed(&[0xed]).is_ok());
        assert_eq!(v.feed(&[0xa0]), Err(InvalidUtf8)); // surrogate
    }

    #[test]
    fn truncated_character_fails_at_finish() {
        let mut v = Utf8Validator::new();
        assert!(v.feed(&[0xe2, 0x82]).is_ok());
        assert_eq!(v.finish(), Err(InvalidUtf8));
    }

    proptest! {
        #[test]
        fn agrees_with_std(data in proptest::collection::vec(any::<u8>(), 0..64),
                           cuts in proptest::collection::vec(0usize..64, 0..6)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            prop_assert_eq!(validate_in_pieces(&data, &cuts), std::str::from_utf8(&data).is_ok());
        }

        #[test]
        fn valid_strings_pass_any_split(s in "\\PC{0,40}", cuts in proptest::collection::vec(0usize..200, 0..6)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            prop_assert!(validate_in_pieces(s.as_bytes(), &cuts));
        }
    }
}
