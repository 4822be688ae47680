//! The rendezvous token of an NCCL group (its 128-byte unique id) as it crosses the control
//! plane: lower-case hex, 256 digits. Made by rank 0 (`--features cuda`), handed to every rank by
//! the coordinator in `LoadShard`; parsing is total, so a damaged id is an error, never a panic.
//! Needs no GPU and no libnccl.

use std::fmt;

use crate::{Error, Result};

/// Bytes in an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

/// An NCCL unique id.
#[derive(Clone, PartialEq, Eq)]
pub struct NcclId(pub [u8; NCCL_ID_BYTES]);

impl NcclId {
    /// Lower-case hex of the 128 bytes.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`NcclId::to_hex`]'s output (either case); anything else is an error.
    pub fn from_hex(hex: &str) -> Result<Self> {
        let bad = |why: String| Error::Collective {
            op: "nccl_id",
            reason: format!("an NCCL id is {} hex digits: {why}", 2 * NCCL_ID_BYTES),
        };
        let digits = hex.as_bytes();
        if digits.len() != 2 * NCCL_ID_BYTES {
            return Err(bad(format!("got {} bytes", digits.len())));
        }
        let mut id = [0u8; NCCL_ID_BYTES];
        for (out, pair) in id.iter_mut().zip(digits.chunks_exact(2)) {
            let digit = |c: u8| {
                (c as char)
                    .to_digit(16)
                    .ok_or_else(|| bad(format!("{:?} is not a hex digit", c as char)))
            };
            *out = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Ok(NcclId(id))
    }
}

/// Shows only a prefix: the id is a group's secret for as long as the group forms.
impl fmt::Debug for NcclId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NcclId({}...)", &self.to_hex()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::{NcclId, NCCL_ID_BYTES};

    /// A small deterministic generator (splitmix64), so failures reproduce.
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn ids_round_trip_through_hex() {
        let mut state = 1;
        for _ in 0..200 {
            let mut bytes = [0u8; NCCL_ID_BYTES];
            bytes.iter_mut().for_each(|b| *b = next(&mut state) as u8);
            let id = NcclId(bytes);
            let hex = id.to_hex();
            assert_eq!(hex.len(), 256);
            assert_eq!(NcclId::from_hex(&hex).unwrap(), id);
            assert_eq!(NcclId::from_hex(&hex.to_uppercase()).unwrap(), id);
        }
    }

    /// Total on bad input: every string is an id or an error, never a panic (wrong lengths,
    /// non-hex characters, and multi-byte UTF-8 characters that split digit pairs).
    #[test]
    fn any_string_parses_or_is_refused_without_panicking() {
        let alphabet: Vec<char> = "0123456789abcdefABCDEFxyz -+é€😀\u{0}".chars().collect();
        let mut state = 7;
        let valid = "ab".repeat(NCCL_ID_BYTES);
        for round in 0..5000 {
            let s: String = match round % 3 {
                // Random strings around the right length.
                0 => {
                    let len = 250 + next(&mut state) as usize % 12;
                    (0..len)
                        .map(|_| alphabet[next(&mut state) as usize % alphabet.len()])
                        .collect()
                }
                // A valid id with one character replaced.
                1 => {
                    let at = next(&mut state) as usize % valid.len();
                    let c = alphabet[next(&mut state) as usize % alphabet.len()];
                    let mut s: String = valid[..at].into();
                    s.push(c);
                    s.push_str(&valid[at + 1..]);
                    s
                }
                // Anything short.
                _ => (0..next(&mut state) as usize % 8)
                    .map(|_| alphabet[next(&mut state) as usize % alphabet.len()])
                    .collect(),
            };
            let parsed = NcclId::from_hex(&s);
            let all_hex = s.len() == 256 && s.chars().all(|c| c.is_ascii_hexdigit());
            assert_eq!(parsed.is_ok(), all_hex, "{s:?}");
        }
        // 256 bytes, but 'é' splits a digit pair.
        let split = format!("{}é{}", "a".repeat(127), "b".repeat(127));
        assert_eq!(split.len(), 256);
        assert!(NcclId::from_hex(&split).is_err());
    }
}
