//! Sources that feed a channel's origin: a looped clip, standard input and HTTP ingest
//! ([`ingest`]), RTMP publishers ([`rtmp`], through the pure FLV → fMP4 remuxer [`flv`]), a live
//! HLS/CMAF playlist followed over HTTP ([`hls`]), and a file's carousel for downloads
//! ([`carousel`]). They run on the tokio runtime and publish through
//! [`crate::channel::Channel`]; the pure cutting and storing they use is in [`crate::origin`].
//! [`urls`] tells the operator where to send each channel.

pub mod carousel;
pub mod flv;
pub mod hls;
pub mod ingest;
pub mod rtmp;
pub mod urls;
