//! Claim 1: one peer receives two contents at once, a live channel and a file download, each
//! through its own session and DCM. When the page's upload is short the live channel is
//! favoured: the live session keeps what it needs, the download gets the rest (at most what
//! its carousel can use).

use protocol::{PeerId, SubstreamPlan};

use crate::topology::hierarchy::split_capacity;

/// How a page's declared upload is divided between its live session and its download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct UploadSplit {
    /// The page's declared upload, kbit/s.
    pub capacity_kbps: u32,
    /// What the live session needs: at least one stream's worth (what each peer of a balanced
    /// multi-tree relays on average), more if its current children already take more.
    pub live_need_kbps: u32,
    /// The live session's share (everything the file does not get: live never loses upload it
    /// needs, and keeps any surplus).
    pub live_kbps: u32,
    /// The download session's share.
    pub file_kbps: u32,
}

/// The split decision (pure). `live_use_kbps` is what the live session's current children
/// take; `file_rate_kbps` is the file carousel's rate (the most its session can relay).
pub fn split_upload(
    capacity_kbps: u32,
    live_stream_kbps: u32,
    live_use_kbps: u32,
    file_rate_kbps: u32,
) -> UploadSplit {
    let live_need = live_stream_kbps.max(live_use_kbps);
    let (_, file) = split_capacity(capacity_kbps, live_need, file_rate_kbps);
    UploadSplit {
        capacity_kbps,
        live_need_kbps: live_need,
        live_kbps: capacity_kbps - file,
        file_kbps: file,
    }
}

/// Upload a peer's current plan asks of it: one substream's rate per child in each tree.
pub fn planned_upload_kbps(plan: &[SubstreamPlan], stream_kbps: u32, k: u32) -> u32 {
    let children: usize = plan.iter().map(|s| s.children.len()).sum();
    (children as u64 * u64::from(stream_kbps) / u64::from(k.max(1))).min(u64::from(u32::MAX)) as u32
}

/// What a live DCM answers when a download of the same page asks for its share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitReply {
    pub split: UploadSplit,
    /// The live peer whose cap now reflects the split.
    pub live_peer: PeerId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_keeps_what_it_needs_and_the_file_gets_the_rest() {
        // 2000 kbit/s, a 500 kbit/s live stream, a 1200 kbit/s carousel: the file gets 1200,
        // the live session keeps 800 (its need and the surplus).
        let s = split_upload(2000, 500, 300, 1200);
        assert_eq!(
            (s.live_need_kbps, s.live_kbps, s.file_kbps),
            (500, 800, 1200)
        );
    }

    #[test]
    fn short_capacity_goes_to_live_first() {
        // 1000 kbit/s, the live session's children already take 750: the file gets 250.
        let s = split_upload(1000, 500, 750, 1200);
        assert_eq!((s.live_kbps, s.file_kbps), (750, 250));
        // Less than live needs: the file gets nothing, live everything.
        let s = split_upload(400, 500, 0, 1200);
        assert_eq!((s.live_kbps, s.file_kbps), (400, 0));
        assert_eq!(split_upload(0, 500, 0, 1000).file_kbps, 0);
    }

    #[test]
    fn planned_upload_counts_children_at_the_substream_rate() {
        let plan = vec![
            SubstreamPlan {
                index: 0,
                parent: protocol::Source::Origin,
                children: vec![PeerId(2), PeerId(3)],
            },
            SubstreamPlan {
                index: 1,
                parent: protocol::Source::Peer { id: PeerId(2) },
                children: vec![],
            },
        ];
        assert_eq!(planned_upload_kbps(&plan, 800, 4), 400);
    }
}
