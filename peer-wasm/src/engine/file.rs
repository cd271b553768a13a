//! Reassembly of a file received as a carousel (claim 1: a download beside the live channel).
//! Sans-IO: the download session's engine delivers packets in order as
//! [`Action::Deliver`](super::Action) `{ seq, payload }`; packet `seq` carries piece
//! `seq mod N`, so whatever round a downloader joins in, it is done once it holds every piece.
//! The reassembled bytes are checked against the server's digest before they are offered.

use protocol::file::file_digest;
use protocol::FileInfo;
use thiserror::Error;

/// Largest file a page assembles in memory (the pieces are held until the file is complete).
pub const MAX_FILE_SIZE: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FileError {
    #[error("file description is inconsistent: {0}")]
    BadInfo(String),
    #[error("file is not complete: {have} of {pieces} pieces")]
    Incomplete { have: u32, pieces: u32 },
    #[error("reassembled file digest {got} differs from the server's {want}")]
    DigestMismatch { got: String, want: String },
}

/// Collects pieces until the file is complete.
#[derive(Debug, Clone)]
pub struct FileAssembler {
    info: FileInfo,
    pieces: Vec<Option<Vec<u8>>>,
    have: u32,
    /// Payloads of the wrong length for their piece (ignored).
    pub rejected: u64,
}

impl FileAssembler {
    /// Checks that `info` describes a file that can exist (and fits in memory).
    pub fn new(info: FileInfo) -> Result<Self, FileError> {
        let bad = |m: &str| Err(FileError::BadInfo(m.to_string()));
        if info.size == 0 || info.piece_size == 0 || info.pieces == 0 {
            return bad("empty file, piece size or piece count");
        }
        if info.size > MAX_FILE_SIZE {
            return bad("file too large to assemble in a page");
        }
        if info.size.div_ceil(u64::from(info.piece_size)) != u64::from(info.pieces) {
            return bad("piece count does not match size and piece size");
        }
        let n = info.pieces as usize;
        Ok(FileAssembler {
            info,
            pieces: vec![None; n],
            have: 0,
            rejected: 0,
        })
    }

    pub fn info(&self) -> &FileInfo {
        &self.info
    }

    pub fn pieces_have(&self) -> u32 {
        self.have
    }

    pub fn is_complete(&self) -> bool {
        self.have == self.info.pieces
    }

    /// Adds the payload of packet `seq` (piece `seq mod N`); returns true if the piece is new.
    /// A payload of the wrong length is counted in `rejected` and ignored.
    pub fn add(&mut self, seq: u64, payload: &[u8]) -> bool {
        let index = (seq % u64::from(self.info.pieces)) as u32;
        if self.info.piece_len(index) != Some(payload.len()) {
            self.rejected += 1;
            return false;
        }
        match self.pieces.get_mut(index as usize) {
            Some(slot @ None) => {
                *slot = Some(payload.to_vec());
                self.have += 1;
                true
            }
            _ => false,
        }
    }

    /// The whole file, once complete and only if its digest is the server's.
    pub fn finish(&self) -> Result<Vec<u8>, FileError> {
        if !self.is_complete() {
            return Err(FileError::Incomplete {
                have: self.have,
                pieces: self.info.pieces,
            });
        }
        let mut bytes = Vec::with_capacity(self.info.size as usize);
        for p in self.pieces.iter().flatten() {
            bytes.extend_from_slice(p);
        }
        // Computed over the reassembled bytes, not the pieces as received: this checks the
        // concatenation too.
        let got = file_digest(&bytes, self.info.piece_size as usize).hex();
        if got != self.info.digest {
            return Err(FileError::DigestMismatch {
                got,
                want: self.info.digest.clone(),
            });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn file(len: usize, piece: usize) -> (Vec<u8>, FileInfo) {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        let info = FileInfo::describe("f.bin", &bytes, piece).unwrap();
        (bytes, info)
    }

    #[test]
    fn joining_mid_round_completes_after_n_consecutive_packets() {
        let (bytes, info) = file(2500, 1000);
        let mut a = FileAssembler::new(info).unwrap();
        // Joined at seq 7 (piece 1): pieces 1, 2, 0.
        for seq in 7..10u64 {
            let i = (seq % 3) as usize;
            let piece = &bytes[i * 1000..((i + 1) * 1000).min(2500)];
            assert!(!a.is_complete());
            assert!(a.add(seq, piece));
        }
        assert!(a.is_complete());
        assert_eq!(a.finish().unwrap(), bytes);
        // The next round changes nothing.
        assert!(!a.add(10, &bytes[1000..2000]));
    }

    #[test]
    fn wrong_lengths_and_corruption_are_caught_not_panicked_on() {
        let (bytes, info) = file(2500, 1000);
        let mut a = FileAssembler::new(info).unwrap();
        assert!(!a.add(2, &bytes[..1000])); // piece 2 is 500 bytes long
        assert!(!a.add(0, &[]));
        assert_eq!(a.rejected, 2);
        assert!(matches!(
            a.finish(),
            Err(FileError::Incomplete { have: 0, pieces: 3 })
        ));
        let mut bad = bytes.clone();
        bad[1200] ^= 1;
        for seq in 0..3u64 {
            let i = seq as usize;
            a.add(seq, &bad[i * 1000..((i + 1) * 1000).min(2500)]);
        }
        assert!(matches!(a.finish(), Err(FileError::DigestMismatch { .. })));
    }

    #[test]
    fn inconsistent_descriptions_are_refused() {
        let (_, info) = file(2500, 1000);
        for broken in [
            FileInfo {
                pieces: 0,
                ..info.clone()
            },
            FileInfo {
                pieces: 4,
                ..info.clone()
            },
            FileInfo {
                piece_size: 0,
                ..info.clone()
            },
            FileInfo {
                size: MAX_FILE_SIZE + 1,
                pieces: u32::MAX,
                ..info.clone()
            },
        ] {
            assert!(FileAssembler::new(broken).is_err());
        }
        // Huge sequence numbers wrap onto a piece, they do not index out of bounds.
        let mut a = FileAssembler::new(info).unwrap();
        assert!(!a.add(u64::MAX, &[0; 3]));
    }
}
