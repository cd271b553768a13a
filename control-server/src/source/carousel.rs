//! A file published for download as a *carousel*: its bytes are cut into `N` pieces and the
//! origin sends them round after round, packet `seq` carrying piece `seq mod N`, at a bounded
//! rate. A downloader joins at any moment and is done once it holds every piece (after `N`
//! consecutive packets when nothing is lost; a lost piece comes round again, or from the
//! origin's fallback). Packets are ordinary [`protocol::Packet`]s, so the channel's DCM, trees,
//! relaying and fallback work exactly as for live video.
//!
//! [`Carousel`] is the pure part (which packet comes next); [`run_carousel`] paces it.

use std::sync::Arc;
use std::time::Duration;

use protocol::file::PIECE_SIZE;
use protocol::packet::{encode, PacketHeader};
use protocol::FileInfo;
use tokio::time::Instant;

use crate::channel::{now_ms, Channel};

/// The carousel's state: the file and the next sequence number.
#[derive(Debug, Clone)]
pub struct Carousel {
    bytes: Arc<[u8]>,
    pub info: FileInfo,
    next_seq: u64,
}

impl Carousel {
    /// `None` for an empty file.
    pub fn new(name: &str, bytes: Vec<u8>) -> Option<Self> {
        let info = FileInfo::describe(name, &bytes, PIECE_SIZE)?;
        Some(Carousel {
            bytes: bytes.into(),
            info,
            next_seq: 0,
        })
    }

    /// The next packet: `(seq, encoded packet)` carrying piece `seq mod N`.
    pub fn next_packet(&mut self, created_ms: u64) -> (u64, Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let piece = (seq % u64::from(self.info.pieces.max(1))) as usize;
        let start = piece * PIECE_SIZE;
        let end = (start + PIECE_SIZE).min(self.bytes.len());
        let header = PacketHeader {
            seq,
            flags: 0,
            created_ms,
        };
        (seq, encode(&header, &self.bytes[start.min(end)..end]))
    }
}

/// Sends the carousel forever at `kbps` (packets are paced one by one, so a round of a 1 MB
/// file at 1000 kbit/s takes about 8 s).
pub async fn run_carousel(channel: Arc<Channel>, mut carousel: Carousel, kbps: u32) {
    let bytes_per_s = f64::from(kbps.max(1)) * 1000.0 / 8.0;
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let due = start + Duration::from_secs_f64(sent as f64 / bytes_per_s);
        tokio::time::sleep_until(due).await;
        let (seq, packet) = carousel.next_packet(now_ms());
        sent += packet.len() as u64;
        channel.publish_packets(vec![(seq, packet)]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Packet;

    #[test]
    fn packets_cycle_through_the_pieces_forever() {
        let bytes: Vec<u8> = (0..(PIECE_SIZE * 2 + 10))
            .map(|i| (i % 251) as u8)
            .collect();
        let mut c = Carousel::new("f.bin", bytes.clone()).unwrap();
        assert_eq!(c.info.pieces, 3);
        let mut rebuilt = Vec::new();
        for want in 0..7u64 {
            let (seq, p) = c.next_packet(5);
            assert_eq!(seq, want);
            let p = Packet::decode(&p).unwrap();
            assert_eq!(p.header.seq, seq);
            if (3..6).contains(&seq) {
                rebuilt.extend_from_slice(p.payload);
            }
        }
        assert_eq!(rebuilt, bytes);
        assert!(Carousel::new("empty", Vec::new()).is_none());
    }
}
