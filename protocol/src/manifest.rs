//! The signed stream: manifests with which every peer checks that the packets it plays and
//! forwards are the origin's (issue 13).
//!
//! The origin holds an ed25519 key. For every fragment it publishes (one call of the
//! packetizer: a media fragment, or a batch of a file carousel's pieces) it emits one manifest:
//! the channel, the fragment's sequence range, the SHA-256 of each packet (header included, so
//! neither payload nor sequence number nor flags can be changed), the hash of the previous
//! manifest, and an ed25519 signature over all of that. Why per fragment and not per fixed
//! count: the origin cuts a whole fragment into packets at once, so its manifest exists the
//! moment its packets do and costs no delay; a fixed count would either wait for packets of the
//! next fragment or be flushed by a timer into the same shape. Why not a signature per packet:
//! one ed25519 verification per fragment instead of one per packet, and 32 bytes per packet
//! instead of 64.
//!
//! Manifests travel on the control socket as binary frames (first byte `M`; media packets start
//! with `P`, parity frames with their own magic), beside the live-edge notices that every peer
//! already gets. Packets that arrive from a peer before their manifest wait in a bounded buffer;
//! packets from the origin itself (its push on the control socket, its HTTP fallback) come over
//! the server's own connection and are trusted as they are.
//!
//! ```text
//! 0     1       2        4          12            20        24       56          57      57+c
//! | 'M' | ver=1 | reserved | index u64 | first_seq u64 | count u32 | prev [32] | chan_len u8 | channel…
//! … | count × SHA-256 [32] | ed25519 signature [64]
//! ```
//! All integers big-endian. The signature covers every byte before it.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// First byte of a manifest frame.
pub const MAGIC: u8 = b'M';
const VERSION: u8 = 1;
/// Fixed part before the channel name.
const FIXED: usize = 57;
const SIGNATURE: usize = 64;
/// Most packets one manifest may cover: a 16 MiB fragment of full packets.
pub const MAX_PACKETS: usize = 1024;
/// Longest channel name a manifest carries.
pub const MAX_CHANNEL: usize = 255;

/// A SHA-256 digest.
pub type Digest32 = [u8; 32];

/// SHA-256 of a whole packet as it travels (header and payload).
pub fn packet_digest(packet: &[u8]) -> Digest32 {
    Sha256::digest(packet).into()
}

/// Lower-case hex of a digest, for JSON.
pub fn hex(d: &Digest32) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits.
pub fn from_hex(s: &str) -> Option<Digest32> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest of {0} bytes is shorter than its fixed part")]
    TooShort(usize),
    #[error("bad manifest magic/version {0:#04x}/{1}")]
    BadMagic(u8, u8),
    #[error("manifest covers {0} packets, more than the limit of {MAX_PACKETS}")]
    TooManyPackets(usize),
    #[error("manifest's sequence range does not fit in 64 bits")]
    SeqOverflow,
    #[error("manifest's reserved bytes are not zero")]
    Reserved,
    #[error("manifest says {expected} bytes but has {actual}")]
    LengthMismatch { expected: usize, actual: usize },
    #[error("manifest channel name is not UTF-8")]
    BadChannel,
    #[error("manifest signature does not verify against the channel's key")]
    BadSignature,
    #[error("the stream key is not a valid ed25519 public key")]
    BadKey,
    #[error("manifest is for channel {got:?}, not {expected:?}")]
    WrongChannel { expected: String, got: String },
}

/// A decoded manifest (not yet verified: see [`Manifest::verify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Manifests of a channel are numbered from 0 by its origin.
    pub index: u64,
    pub first_seq: u64,
    pub channel: String,
    /// Hash of the previous manifest's whole encoding ([`Manifest::digest`]); zeros for the first.
    pub prev: Digest32,
    /// SHA-256 of packets `first_seq ..`, in order.
    pub hashes: Vec<Digest32>,
    pub signature: [u8; SIGNATURE],
}

impl Manifest {
    /// Sequence numbers covered: `first_seq .. first_seq + hashes.len()`.
    pub fn seqs(&self) -> std::ops::Range<u64> {
        self.first_seq..self.first_seq + self.hashes.len() as u64
    }

    /// The digest of packet `seq`, if this manifest covers it.
    pub fn digest_of(&self, seq: u64) -> Option<&Digest32> {
        seq.checked_sub(self.first_seq)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.hashes.get(i))
    }

    /// Parses a manifest frame; never panics on arbitrary input.
    pub fn decode(buf: &[u8]) -> Result<Self, ManifestError> {
        if buf.len() < FIXED {
            return Err(ManifestError::TooShort(buf.len()));
        }
        if buf[0] != MAGIC || buf[1] != VERSION {
            return Err(ManifestError::BadMagic(buf[0], buf[1]));
        }
        // Not covered by the signature's meaning: refused rather than ignored, so that one
        // manifest has one encoding.
        if buf[2] != 0 || buf[3] != 0 {
            return Err(ManifestError::Reserved);
        }
        let u64_at = |at: usize| {
            buf.get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes)
        };
        let index = u64_at(4);
        let first_seq = u64_at(12);
        let count = buf
            .get(20..24)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_be_bytes) as usize;
        if count > MAX_PACKETS {
            return Err(ManifestError::TooManyPackets(count));
        }
        if first_seq.checked_add(count as u64).is_none() {
            return Err(ManifestError::SeqOverflow);
        }
        let mut prev = [0u8; 32];
        prev.copy_from_slice(&buf[24..56]);
        let chan_len = usize::from(buf[56]);
        let expected = FIXED + chan_len + 32 * count + SIGNATURE;
        if buf.len() != expected {
            return Err(ManifestError::LengthMismatch {
                expected,
                actual: buf.len(),
            });
        }
        let channel = std::str::from_utf8(&buf[FIXED..FIXED + chan_len])
            .map_err(|_| ManifestError::BadChannel)?
            .to_owned();
        let at = FIXED + chan_len;
        let hashes = buf[at..at + 32 * count]
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                d
            })
            .collect();
        let mut signature = [0u8; SIGNATURE];
        signature.copy_from_slice(&buf[buf.len() - SIGNATURE..]);
        Ok(Manifest {
            index,
            first_seq,
            channel,
            prev,
            hashes,
            signature,
        })
    }

    /// The bytes the signature covers.
    fn signed_part(&self) -> Vec<u8> {
        let chan = self.channel.as_bytes();
        let chan = &chan[..chan.len().min(MAX_CHANNEL)];
        let mut out = Vec::with_capacity(FIXED + chan.len() + 32 * self.hashes.len() + SIGNATURE);
        out.push(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.first_seq.to_be_bytes());
        out.extend_from_slice(&(self.hashes.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.prev);
        out.push(chan.len() as u8);
        out.extend_from_slice(chan);
        for h in &self.hashes {
            out.extend_from_slice(h);
        }
        out
    }

    /// The frame as it travels.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.signed_part();
        out.extend_from_slice(&self.signature);
        out
    }

    /// SHA-256 of the whole frame: what the next manifest names as `prev`.
    pub fn digest(&self) -> Digest32 {
        packet_digest(&self.encode())
    }

    /// Checks the signature against `key`.
    pub fn verify(&self, key: &StreamKey) -> Result<(), ManifestError> {
        let sig = Signature::from_bytes(&self.signature);
        key.0
            .verify(&self.signed_part(), &sig)
            .map_err(|_| ManifestError::BadSignature)
    }
}

/// A channel's public key, as peers hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamKey(VerifyingKey);

impl StreamKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, ManifestError> {
        VerifyingKey::from_bytes(bytes)
            .map(StreamKey)
            .map_err(|_| ManifestError::BadKey)
    }

    /// From 64 hex digits (the `public_key` of Welcome and of the player's option).
    pub fn from_hex(s: &str) -> Result<Self, ManifestError> {
        from_hex(s.trim())
            .ok_or(ManifestError::BadKey)
            .and_then(|b| Self::from_bytes(&b))
    }

    pub fn to_hex(&self) -> String {
        hex(self.0.as_bytes())
    }
}

/// The origin's side: signs one manifest per published fragment, chaining each to the last.
pub struct ManifestSigner {
    key: SigningKey,
    channel: String,
    next_index: u64,
    prev: Digest32,
}

impl std::fmt::Debug for ManifestSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestSigner")
            .field("channel", &self.channel)
            .field("public_key", &self.public_key().to_hex())
            .field("next_index", &self.next_index)
            .finish_non_exhaustive()
    }
}

impl ManifestSigner {
    /// `secret` is the 32-byte ed25519 seed. A channel name longer than [`MAX_CHANNEL`] bytes is
    /// cut there (manifests then name a prefix of it).
    pub fn new(secret: &[u8; 32], channel: &str) -> Self {
        ManifestSigner {
            key: SigningKey::from_bytes(secret),
            channel: channel.to_owned(),
            next_index: 0,
            prev: [0; 32],
        }
    }

    pub fn public_key(&self) -> StreamKey {
        StreamKey(self.key.verifying_key())
    }

    /// The manifest of `packets` (encoded, consecutive from `first_seq`), or `None` for none.
    /// More than [`MAX_PACKETS`] packets are split over several manifests.
    pub fn sign<P: AsRef<[u8]>>(&mut self, first_seq: u64, packets: &[P]) -> Vec<Manifest> {
        packets
            .chunks(MAX_PACKETS)
            .enumerate()
            .map(|(i, chunk)| {
                let mut m = Manifest {
                    index: self.next_index,
                    first_seq: first_seq + (i * MAX_PACKETS) as u64,
                    channel: channel_prefix(&self.channel).to_owned(),
                    prev: self.prev,
                    hashes: chunk.iter().map(|p| packet_digest(p.as_ref())).collect(),
                    signature: [0; SIGNATURE],
                };
                m.signature = self.key.sign(&m.signed_part()).to_bytes();
                self.next_index += 1;
                self.prev = m.digest();
                m
            })
            .collect()
    }
}

/// The part of a channel name a manifest carries.
pub fn channel_prefix(name: &str) -> &str {
    if name.len() <= MAX_CHANNEL {
        return name;
    }
    let mut end = MAX_CHANNEL;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// A peer's side: the digests of verified manifests, for a bounded window of sequence numbers.
#[derive(Debug)]
pub struct ManifestBook {
    key: StreamKey,
    channel: String,
    digests: std::collections::BTreeMap<u64, Digest32>,
    /// The last manifest taken, to check the chain: (index, digest).
    last: Option<(u64, Digest32)>,
    /// Manifests whose `prev` did not match the one before (counted, still taken: the
    /// signature is what proves them).
    pub broken_chain: u64,
}

/// How many packet digests a [`ManifestBook`] keeps.
pub const BOOK_PACKETS: usize = 16_384;

impl ManifestBook {
    pub fn new(key: StreamKey, channel: &str) -> Self {
        ManifestBook {
            key,
            channel: channel_prefix(channel).to_owned(),
            digests: Default::default(),
            last: None,
            broken_chain: 0,
        }
    }

    pub fn key(&self) -> &StreamKey {
        &self.key
    }

    /// Decodes and verifies a manifest frame, and keeps its digests; returns the range covered.
    pub fn add(&mut self, frame: &[u8]) -> Result<std::ops::Range<u64>, ManifestError> {
        let m = Manifest::decode(frame)?;
        m.verify(&self.key)?;
        if m.channel != self.channel {
            return Err(ManifestError::WrongChannel {
                expected: self.channel.clone(),
                got: m.channel,
            });
        }
        if let Some((index, digest)) = self.last {
            if m.index == index + 1 && m.prev != digest {
                self.broken_chain += 1;
            }
        }
        self.last = Some((m.index, m.digest()));
        for (i, d) in m.hashes.iter().enumerate() {
            self.digests.insert(m.first_seq + i as u64, *d);
        }
        while self.digests.len() > BOOK_PACKETS {
            self.digests.pop_first();
        }
        Ok(m.seqs())
    }

    pub fn digest(&self, seq: u64) -> Option<&Digest32> {
        self.digests.get(&seq)
    }

    /// Forgets digests below `seq` (already played).
    /// Cheap when there is nothing to forget (it runs at every poll of a peer's engine).
    pub fn forget_below(&mut self, seq: u64) {
        while let Some(e) = self.digests.first_entry() {
            if *e.key() >= seq {
                break;
            }
            e.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn packets(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![i as u8; 100 + i]).collect()
    }

    #[test]
    fn signed_manifests_verify_roundtrip_and_chain() {
        let mut signer = ManifestSigner::new(&[7; 32], "demo");
        let key = signer.public_key();
        let a = signer.sign(10, &packets(4)).remove(0);
        let b = signer.sign(14, &packets(2)).remove(0);
        assert_eq!(a.seqs(), 10..14);
        assert_eq!(b.prev, a.digest());
        let frame = a.encode();
        assert_eq!(frame[0], MAGIC);
        let back = Manifest::decode(&frame).unwrap();
        assert_eq!(back, a);
        back.verify(&key).unwrap();
        assert_eq!(
            back.digest_of(12),
            Some(&packet_digest(&packets(4)[2])),
            "hash of the third packet"
        );
        assert_eq!(back.digest_of(14), None);
        assert_eq!(back.digest_of(9), None);

        let mut book = ManifestBook::new(StreamKey::from_hex(&key.to_hex()).unwrap(), "demo");
        assert_eq!(book.add(&frame).unwrap(), 10..14);
        assert_eq!(book.add(&b.encode()).unwrap(), 14..16);
        assert_eq!(book.broken_chain, 0);
        assert!(book.digest(15).is_some());
        book.forget_below(14);
        assert!(book.digest(13).is_none() && book.digest(14).is_some());
    }

    #[test]
    fn forgeries_and_garbage_are_refused_with_a_reason() {
        let mut signer = ManifestSigner::new(&[1; 32], "demo");
        let frame = signer.sign(0, &packets(3)).remove(0).encode();
        let key = signer.public_key();
        // Any flipped byte before the signature breaks it (or the frame's shape).
        for i in [4, 12, 30, FIXED + 2, FIXED + 4 + 40] {
            let mut bad = frame.clone();
            bad[i] ^= 1;
            let r = Manifest::decode(&bad).and_then(|m| m.verify(&key));
            assert!(r.is_err(), "byte {i}");
        }
        // Another origin's key.
        let other = ManifestSigner::new(&[2; 32], "demo").public_key();
        assert_eq!(
            Manifest::decode(&frame).unwrap().verify(&other),
            Err(ManifestError::BadSignature)
        );
        let mut book = ManifestBook::new(key.clone(), "other");
        assert!(matches!(
            book.add(&frame),
            Err(ManifestError::WrongChannel { .. })
        ));
        assert_eq!(Manifest::decode(b"M"), Err(ManifestError::TooShort(1)));
        let mut long = frame.clone();
        long.push(0);
        assert!(matches!(
            Manifest::decode(&long),
            Err(ManifestError::LengthMismatch { .. })
        ));
        let mut many = frame.clone();
        many[20..24].copy_from_slice(&(MAX_PACKETS as u32 + 1).to_be_bytes());
        assert!(matches!(
            Manifest::decode(&many),
            Err(ManifestError::TooManyPackets(_))
        ));
        let mut reserved = frame.clone();
        reserved[3] = 1;
        assert_eq!(Manifest::decode(&reserved), Err(ManifestError::Reserved));
        let mut far = frame.clone();
        far[12..20].copy_from_slice(&(u64::MAX - 1).to_be_bytes());
        assert_eq!(Manifest::decode(&far), Err(ManifestError::SeqOverflow));
        assert!(StreamKey::from_hex("zz").is_err());
        assert_eq!(from_hex(&hex(&[0xab; 32])), Some([0xab; 32]));
    }

    #[test]
    fn large_batches_split_and_long_names_are_cut() {
        let mut signer = ManifestSigner::new(&[3; 32], &"x".repeat(300));
        let ms = signer.sign(5, &vec![vec![0u8; 1]; MAX_PACKETS + 3]);
        assert_eq!(ms.len(), 2);
        assert_eq!(ms[1].seqs(), 5 + MAX_PACKETS as u64..8 + MAX_PACKETS as u64);
        assert_eq!(ms[1].prev, ms[0].digest());
        assert_eq!(ms[0].channel.len(), MAX_CHANNEL);
        let key = signer.public_key();
        let mut book = ManifestBook::new(key, &"x".repeat(300));
        for m in &ms {
            book.add(&m.encode()).unwrap();
        }
    }
}
