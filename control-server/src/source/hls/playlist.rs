//! The sans-IO part of an HLS pull: which rendition of a multivariant playlist to follow, which
//! segments of a live media playlist are new, when to reload it, how long to wait after a
//! network error, and whether a segment is CMAF at all. No socket and no clock in here: playlists
//! and times go in, decisions come out, so every rule is unit-tested below.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use m3u8_rs::{KeyMethod, MasterPlaylist, MediaPlaylist, VariantStream};

/// Segments taken from a live playlist's end at the first load (RFC 8216 §6.3.3: at least three
/// target durations from the end). Released at their own pace, they are the cushion that rides
/// out a source that stalls: with three, a 3 s stall of a 1 s-segment source stalled a viewer
/// in one full test run of e2e `hls_pull`; four add a segment of delay.
pub const START_SEGMENTS: usize = 4;

/// What the operator tells us to do when refusing a stream that is not CMAF.
pub const CMAF_HINT: &str = "only fragmented-MP4 (CMAF) HLS can be pulled, MPEG-TS segments are \
     refused: have the encoder write fMP4 segments (ffmpeg: `-f hls -hls_segment_type fmp4`; \
     OBS and hardware encoders: choose the fMP4/CMAF variant of HLS)";

/// Which rendition of a multivariant playlist to follow (`--pull-rendition`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RenditionChoice {
    /// The highest `BANDWIDTH` (the default).
    #[default]
    Highest,
    /// The lowest `BANDWIDTH`.
    Lowest,
    /// The highest `BANDWIDTH` not above this many bits per second (the lowest when none fits).
    MaxBandwidth(u64),
    /// A rendition by name: its `NAME` attribute, its video group, its resolution (`1280x720`
    /// or `720p`), or a path component of its URI (`720p/index.m3u8` matches `720p`).
    Name(String),
}

/// `--pull-rendition` that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "rendition {0:?}: use `highest`, `lowest`, `bandwidth<=BITS_PER_SECOND` (e.g. \
     bandwidth<=3000000) or a name (NAME attribute, 1280x720, 720p)"
)]
pub struct BadRendition(pub String);

impl FromStr for RenditionChoice {
    type Err = BadRendition;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "" => Err(BadRendition(s.into())),
            "highest" | "best" | "max" => Ok(Self::Highest),
            "lowest" | "min" => Ok(Self::Lowest),
            lower => {
                if let Some(n) = lower
                    .strip_prefix("bandwidth<=")
                    .or_else(|| lower.strip_prefix("bandwidth="))
                {
                    return n
                        .trim()
                        .parse()
                        .map(Self::MaxBandwidth)
                        .map_err(|_| BadRendition(s.into()));
                }
                let name = t.strip_prefix("name=").unwrap_or(t);
                Ok(Self::Name(name.to_string()))
            }
        }
    }
}

impl fmt::Display for RenditionChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Highest => f.write_str("highest"),
            Self::Lowest => f.write_str("lowest"),
            Self::MaxBandwidth(b) => write!(f, "bandwidth<={b}"),
            Self::Name(n) => write!(f, "name={n}"),
        }
    }
}

fn variant_matches(v: &VariantStream, name: &str) -> bool {
    let eq = |a: &str| a.eq_ignore_ascii_case(name);
    let named = v
        .other_attributes
        .as_ref()
        .and_then(|a| a.get("NAME"))
        .is_some_and(|n| eq(&n.to_string()));
    let group = v.video.as_deref().is_some_and(eq);
    let resolution = v
        .resolution
        .is_some_and(|r| eq(&format!("{}x{}", r.width, r.height)) || eq(&format!("{}p", r.height)));
    let path = v
        .uri
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .split('/')
        .any(|part| eq(part) || part.rsplit_once('.').is_some_and(|(stem, _)| eq(stem)));
    named || group || resolution || path
}

/// The variant to follow, or `None` when the playlist has none (or none of that name).
pub fn choose_variant<'a>(
    master: &'a MasterPlaylist,
    choice: &RenditionChoice,
) -> Option<&'a VariantStream> {
    let mut playable = master.variants.iter().filter(|v| !v.is_i_frame);
    match choice {
        RenditionChoice::Highest => playable.max_by_key(|v| v.bandwidth),
        RenditionChoice::Lowest => playable.min_by_key(|v| v.bandwidth),
        RenditionChoice::MaxBandwidth(cap) => {
            let all: Vec<&VariantStream> = playable.collect();
            all.iter()
                .filter(|v| v.bandwidth <= *cap)
                .max_by_key(|v| v.bandwidth)
                .or_else(|| all.iter().min_by_key(|v| v.bandwidth))
                .copied()
        }
        RenditionChoice::Name(name) => playable.find(|v| variant_matches(v, name)),
    }
}

/// A resource a media playlist points at (`uri` as written, relative to the playlist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub uri: String,
    /// `EXT-X-BYTERANGE` / `BYTERANGE`: length and offset (when the offset is omitted, the
    /// sub-range follows the previous one of the same resource; we then fetch it whole).
    pub byte_range: Option<(u64, Option<u64>)>,
}

/// One segment of a live playlist that we have not fetched yet.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentRef {
    /// Media sequence number.
    pub seq: u64,
    pub resource: Resource,
    /// Duration from `EXTINF`, seconds.
    pub duration: f64,
    /// The `EXT-X-MAP` in force for this segment (`None`: the playlist has none).
    pub map: Option<Resource>,
    /// Whether an `EXT-X-KEY` other than `NONE` applies (encrypted: refused).
    pub encrypted: bool,
    pub discontinuity: bool,
}

impl SegmentRef {
    /// Why this segment cannot be pulled, judged from the playlist alone: MPEG-TS (no
    /// `EXT-X-MAP`, `.ts` URI) and encrypted segments.
    pub fn refusal(&self) -> Option<NotCmaf> {
        if self.encrypted {
            return Some(NotCmaf::Encrypted);
        }
        let path = self
            .resource
            .uri
            .split(['?', '#'])
            .next()
            .unwrap_or_default();
        let ts_name = [".ts", ".tsv", ".tsa", ".m2ts"]
            .iter()
            .any(|ext| path.to_ascii_lowercase().ends_with(ext));
        (self.map.is_none() && ts_name).then_some(NotCmaf::TransportStream)
    }
}

/// Why a stream is refused outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotCmaf {
    #[error("the playlist's segments are MPEG-TS: {CMAF_HINT}")]
    TransportStream,
    #[error(
        "the playlist's segments are encrypted (EXT-X-KEY): pull an unencrypted fMP4 rendition"
    )]
    Encrypted,
}

/// What the segment's first bytes say, once downloaded: MPEG-TS starts with the 0x47 sync byte
/// every 188 bytes; fragmented MP4 with a box header.
pub fn sniff_transport_stream(bytes: &[u8]) -> bool {
    bytes.first() == Some(&0x47) && bytes.get(188).is_none_or(|b| *b == 0x47)
}

/// What one load of the media playlist changed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Update {
    /// Segments to fetch, in order, each once.
    pub new: Vec<SegmentRef>,
    /// Whether the playlist changed since the previous load (it got a new last segment).
    pub changed: bool,
    /// The playlist went back in time: it ends before segments we already published
    /// (`had`: the next sequence number we expected, `now`: the playlist's next one).
    pub backwards: Option<(u64, u64)>,
    /// Segments that left the playlist before we could fetch them (we fell behind).
    pub skipped: u64,
    /// `EXT-X-ENDLIST`: the stream is over.
    pub ended: bool,
}

/// Follows one live media playlist across reloads: each segment is handed out exactly once, in
/// media-sequence order.
#[derive(Debug, Clone, Default)]
pub struct Follower {
    /// The next media sequence number to hand out, once the first load placed us.
    next_seq: Option<u64>,
    /// The playlist's last sequence number at the previous load (to see whether it changed).
    last_seen: Option<u64>,
    /// `EXT-X-MAP` carried from segment to segment (the parser attaches it to the first only).
    map: Option<Resource>,
    /// The playlist's first sequence number at the last load that was not backwards (it must
    /// never decrease, RFC 8216 §6.2.2).
    first_seen: Option<u64>,
    /// Whether the previous load was already backwards (logged once per episode).
    backwards: bool,
}

impl Follower {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next sequence number that will be handed out.
    pub fn next_seq(&self) -> Option<u64> {
        self.next_seq
    }

    /// Whether the playlist is currently behind what was published.
    pub fn is_backwards(&self) -> bool {
        self.backwards
    }

    /// Takes in one load of the playlist.
    pub fn update(&mut self, pl: &MediaPlaylist) -> Update {
        let first = pl.media_sequence;
        let count = pl.segments.len() as u64;
        let end = first + count; // one past the last sequence number
        let mut segments = Vec::with_capacity(pl.segments.len());
        let mut map = None::<Resource>;
        let mut key = None::<bool>;
        for (i, s) in pl.segments.iter().enumerate() {
            if let Some(m) = &s.map {
                map = Some(Resource {
                    uri: m.uri.clone(),
                    byte_range: m.byte_range.as_ref().map(|b| (b.length, b.offset)),
                });
            }
            if let Some(k) = &s.key {
                key = Some(k.method != KeyMethod::None);
            }
            segments.push(SegmentRef {
                seq: first + i as u64,
                resource: Resource {
                    uri: s.uri.clone(),
                    byte_range: s.byte_range.as_ref().map(|b| (b.length, b.offset)),
                },
                duration: f64::from(s.duration),
                // A playlist whose window starts after its EXT-X-MAP line scrolled away still
                // means the last map we saw.
                map: map.clone().or_else(|| self.map.clone()),
                encrypted: key.unwrap_or(false),
                discontinuity: s.discontinuity,
            });
        }
        let changed = self.last_seen != Some(end);
        let mut update = Update {
            changed,
            ended: pl.end_list,
            ..Update::default()
        };
        let next = match self.next_seq {
            None => end.saturating_sub(START_SEGMENTS as u64).max(first),
            Some(next) if end < next || self.first_seen.is_some_and(|f| first < f) => {
                // Ends before what we already published, or starts before where it started
                // last time: time went backwards (an encoder that restarted its numbering, a
                // looping test source, a stale cache).
                update.backwards = Some((next, end));
                self.backwards = true;
                return update;
            }
            Some(next) => next,
        };
        self.backwards = false;
        self.last_seen = Some(end);
        self.first_seen = Some(first);
        if next < first {
            update.skipped = first - next;
        }
        update.new = segments.into_iter().filter(|s| s.seq >= next).collect();
        if let Some(last) = update.new.last() {
            self.next_seq = Some(last.seq + 1);
            if last.map.is_some() {
                self.map = last.map.clone();
            }
        } else {
            self.next_seq = Some(next.max(first));
        }
        update
    }
}

/// How long to wait before reloading the playlist (RFC 8216 §6.3.4), counted from when the
/// previous load began: the target duration after a load that changed the playlist, half of it
/// after one that did not.
pub fn reload_after(target_duration: Duration, changed: bool) -> Duration {
    let t = target_duration.clamp(Duration::from_millis(200), Duration::from_secs(30));
    if changed {
        t
    } else {
        t / 2
    }
}

/// How long a request may take: a stalled server shows as a timeout (a retry) well before a
/// viewer's buffer runs out. Scaled on the target duration, between 2 and 15 s.
pub fn request_timeout(target_duration: Duration) -> Duration {
    (target_duration * 3 / 2).clamp(Duration::from_secs(2), Duration::from_secs(15))
}

/// Exponential backoff after network errors: 250 ms, 500 ms, 1 s, 2 s, then 3 s at most.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(250);
    pub const CAP: Duration = Duration::from_secs(3);

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn fail(&mut self) -> Duration {
        let d = Self::FIRST
            .saturating_mul(1u32 << self.failures.min(16))
            .min(Self::CAP);
        self.failures = self.failures.saturating_add(1);
        d
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn succeed(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn media(text: &str) -> MediaPlaylist {
        match m3u8_rs::parse_playlist_res(text.as_bytes()) {
            Ok(m3u8_rs::Playlist::MediaPlaylist(p)) => p,
            other => panic!("not a media playlist: {other:?}"),
        }
    }

    fn master(text: &str) -> MasterPlaylist {
        match m3u8_rs::parse_playlist_res(text.as_bytes()) {
            Ok(m3u8_rs::Playlist::MasterPlaylist(p)) => p,
            other => panic!("not a multivariant playlist: {other:?}"),
        }
    }

    /// A live CMAF playlist of segments `first..first + n`.
    fn live(first: u64, n: u64) -> String {
        let mut s = format!(
            "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:{first}\n\
             #EXT-X-MAP:URI=\"init.mp4\"\n"
        );
        for i in first..first + n {
            s.push_str(&format!("#EXTINF:1.000,\nseg{i}.m4s\n"));
        }
        s
    }

    fn seqs(u: &Update) -> Vec<u64> {
        u.new.iter().map(|s| s.seq).collect()
    }

    #[test]
    fn first_load_starts_near_the_live_edge_and_each_segment_comes_once() {
        let mut f = Follower::new();
        let u = f.update(&media(&live(10, 6)));
        assert_eq!(seqs(&u), vec![12, 13, 14, 15]);
        assert!(u.changed);
        assert_eq!(
            u.new[0].map.as_ref().map(|m| m.uri.as_str()),
            Some("init.mp4")
        );
        assert_eq!(u.new[3].resource.uri, "seg15.m4s");
        // Unchanged reload: nothing new.
        let u = f.update(&media(&live(10, 6)));
        assert!(u.new.is_empty());
        assert!(!u.changed);
        // The window slides by two: exactly the two new ones, with the map carried over even
        // though the playlist's first segment is now past the EXT-X-MAP line.
        let u = f.update(&media(&live(12, 6)));
        assert_eq!(seqs(&u), vec![16, 17]);
        assert!(u.changed);
        assert!(u.new.iter().all(|s| s.map.is_some()));
        assert_eq!(f.next_seq(), Some(18));
    }

    #[test]
    fn a_short_playlist_is_taken_whole() {
        let mut f = Follower::new();
        assert_eq!(seqs(&f.update(&media(&live(0, 2)))), vec![0, 1]);
        assert_eq!(seqs(&f.update(&media(&live(0, 3)))), vec![2]);
    }

    #[test]
    fn a_playlist_that_goes_back_in_time_is_ignored_until_it_catches_up() {
        let mut f = Follower::new();
        f.update(&media(&live(100, 5)));
        // A looping source restarts at 0: nothing is handed out, the episode is reported.
        let u = f.update(&media(&live(0, 5)));
        assert!(u.new.is_empty());
        assert_eq!(u.backwards, Some((105, 5)));
        assert!(f.is_backwards());
        // A stale copy one segment behind the newest counts as backwards too.
        let u = f.update(&media(&live(99, 5)));
        assert_eq!(u.backwards, Some((105, 104)));
        // Back at the edge: only what is new.
        let u = f.update(&media(&live(100, 5)));
        assert_eq!(u.backwards, None);
        assert!(u.new.is_empty());
        assert!(!f.is_backwards());
        assert_eq!(seqs(&f.update(&media(&live(103, 5)))), vec![105, 106, 107]);
    }

    #[test]
    fn a_restarted_numbering_that_runs_past_the_published_point_is_still_backwards() {
        let mut f = Follower::new();
        f.update(&media(&live(10, 6)));
        // Ends past 16, but its first sequence number went down: a new timeline.
        let u = f.update(&media(&live(0, 20)));
        assert_eq!(u.backwards, Some((16, 20)));
        assert!(u.new.is_empty());
    }

    #[test]
    fn segments_that_scrolled_away_are_counted_as_skipped() {
        let mut f = Follower::new();
        f.update(&media(&live(0, 3)));
        let u = f.update(&media(&live(10, 3)));
        assert_eq!(u.skipped, 7);
        assert_eq!(seqs(&u), vec![10, 11, 12]);
    }

    #[test]
    fn transport_stream_and_encrypted_segments_are_refused_with_the_way_to_cmaf() {
        let ts = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n\
                  #EXTINF:2.0,\nsegment0.ts\n#EXTINF:2.0,\nsegment1.ts?token=x\n";
        let mut f = Follower::new();
        let u = f.update(&media(ts));
        assert_eq!(u.new.len(), 2);
        for s in &u.new {
            let refusal = s.refusal().expect("TS refused");
            assert_eq!(refusal, NotCmaf::TransportStream);
            assert!(refusal.to_string().contains("-hls_segment_type fmp4"));
        }
        let enc = "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n\
                   #EXT-X-KEY:METHOD=AES-128,URI=\"k\"\n#EXT-X-MAP:URI=\"i.mp4\"\n\
                   #EXTINF:2.0,\na.m4s\n#EXTINF:2.0,\nb.m4s\n";
        let u = Follower::new().update(&media(enc));
        assert!(u
            .new
            .iter()
            .all(|s| s.refusal() == Some(NotCmaf::Encrypted)));
        let cmaf = Follower::new().update(&media(&live(0, 2)));
        assert!(cmaf.new.iter().all(|s| s.refusal().is_none()));
        assert!(sniff_transport_stream(&[0x47, 0x40, 0x11, 0x10]));
        let mut two = vec![0x47; 376];
        assert!(sniff_transport_stream(&two));
        two[188] = 0;
        assert!(!sniff_transport_stream(&two));
        assert!(!sniff_transport_stream(b"\0\0\0\x18ftypiso6"));
    }

    #[test]
    fn the_end_of_the_stream_is_seen() {
        let mut text = live(0, 2);
        text.push_str("#EXT-X-ENDLIST\n");
        assert!(Follower::new().update(&media(&text)).ended);
    }

    const MULTI: &str = "#EXTM3U\n\
        #EXT-X-STREAM-INF:BANDWIDTH=800000,RESOLUTION=640x360,NAME=\"low\"\nlow/index.m3u8\n\
        #EXT-X-STREAM-INF:BANDWIDTH=5000000,RESOLUTION=1920x1080\nhd/1080p.m3u8\n\
        #EXT-X-STREAM-INF:BANDWIDTH=2500000,RESOLUTION=1280x720\nmid/720p.m3u8\n\
        #EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=9000000,URI=\"iframes.m3u8\"\n";

    fn pick(choice: &str) -> Option<String> {
        let m = master(MULTI);
        let c: RenditionChoice = choice.parse().expect("choice");
        choose_variant(&m, &c).map(|v| v.uri.clone())
    }

    #[test]
    fn renditions_are_chosen_by_bandwidth_or_name() {
        assert_eq!(pick("highest").as_deref(), Some("hd/1080p.m3u8"));
        assert_eq!(pick("lowest").as_deref(), Some("low/index.m3u8"));
        assert_eq!(pick("bandwidth<=3000000").as_deref(), Some("mid/720p.m3u8"));
        assert_eq!(pick("bandwidth<=5000000").as_deref(), Some("hd/1080p.m3u8"));
        // Nothing fits: the lowest rather than nothing.
        assert_eq!(pick("bandwidth<=1000").as_deref(), Some("low/index.m3u8"));
        assert_eq!(pick("1280x720").as_deref(), Some("mid/720p.m3u8"));
        assert_eq!(pick("1080p").as_deref(), Some("hd/1080p.m3u8"));
        assert_eq!(pick("LOW").as_deref(), Some("low/index.m3u8"));
        assert_eq!(pick("name=mid").as_deref(), Some("mid/720p.m3u8"));
        assert_eq!(pick("4k"), None);
        assert_eq!(RenditionChoice::default(), RenditionChoice::Highest);
        assert!("bandwidth<=lots".parse::<RenditionChoice>().is_err());
        assert!("".parse::<RenditionChoice>().is_err());
        let c: RenditionChoice = "bandwidth<=3000000".parse().expect("choice");
        assert_eq!(c.to_string(), "bandwidth<=3000000");
    }

    #[test]
    fn reloads_follow_the_target_duration_and_backoff_is_capped() {
        let t = Duration::from_secs(2);
        assert_eq!(reload_after(t, true), t);
        assert_eq!(reload_after(t, false), Duration::from_secs(1));
        assert_eq!(
            request_timeout(Duration::from_secs(1)),
            Duration::from_secs(2)
        );
        assert_eq!(
            request_timeout(Duration::from_secs(6)),
            Duration::from_secs(9)
        );
        let mut b = Backoff::default();
        let delays: Vec<u128> = (0..7).map(|_| b.fail().as_millis()).collect();
        assert_eq!(delays, vec![250, 500, 1000, 2000, 3000, 3000, 3000]);
        assert_eq!(b.failures(), 7);
        b.succeed();
        assert_eq!(b.fail(), Backoff::FIRST);
    }
}
