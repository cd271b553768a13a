//! The cluster's records in etcd: where each lives and what it holds. A leaf module.
//!
//! Everything lives under one prefix (`/p2p` by default):
//!
//! * `{prefix}/nodes/{node}`: a live node, bound to its lease: [`NodeRecord`].
//! * `{prefix}/dcm/{dcm}`: the owner of a logical DCM, bound to the owner's lease:
//!   [`OwnerRecord`]. The key's create revision is the owner's fencing token.
//! * `{prefix}/start/{channel}`: when a looped channel's timeline began (ms since the Unix
//!   epoch), so that every node cuts the same packets with the same numbers. Not leased.
//! * `{prefix}/handover/{dcm}`: written by a stopping owner in the transaction that gives the
//!   DCM up, and deleted by the claim that takes it: the claimer learns that it took the DCM
//!   over from a live owner, not from one whose lease expired.

use serde::{Deserialize, Serialize};

/// A node as it announces itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Base URL peers and other nodes reach it at (`http://host:port`).
    pub url: String,
    /// Joined sessions.
    #[serde(default)]
    pub peers: u64,
    /// Logical DCMs it owns.
    #[serde(default)]
    pub owned: u64,
    /// Heartbeats handled per second (last few seconds).
    #[serde(default)]
    pub heartbeats_per_s: u64,
    /// The process's CPU use, percent of one core.
    #[serde(default)]
    pub cpu_percent: u32,
}

/// The owner of a logical DCM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub node: String,
    pub url: String,
}

/// What a key under the prefix names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Node(String),
    Dcm(String),
    Start(String),
    Handover(String),
}

/// The key layout under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// Everything the cluster writes (watched as one range).
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}/nodes/{node}", self.prefix)
    }

    pub fn dcm(&self, dcm: &str) -> String {
        format!("{}/dcm/{dcm}", self.prefix)
    }

    pub fn start(&self, channel: &str) -> String {
        format!("{}/start/{channel}", self.prefix)
    }

    pub fn handover(&self, dcm: &str) -> String {
        format!("{}/handover/{dcm}", self.prefix)
    }

    /// What `key` names, if it is one of ours.
    pub fn parse(&self, key: &str) -> Option<Key> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let (kind, name) = rest.split_once('/')?;
        if name.is_empty() {
            return None;
        }
        match kind {
            "nodes" => Some(Key::Node(name.to_string())),
            "dcm" => Some(Key::Dcm(name.to_string())),
            "start" => Some(Key::Start(name.to_string())),
            "handover" => Some(Key::Handover(name.to_string())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_strangers_are_ignored() {
        let k = Keys::new("/p2p/");
        assert_eq!(k.dcm("demo"), "/p2p/dcm/demo");
        assert_eq!(k.parse(&k.dcm("demo")), Some(Key::Dcm("demo".into())));
        assert_eq!(k.parse(&k.node("a-1")), Some(Key::Node("a-1".into())));
        assert_eq!(k.parse(&k.start("x")), Some(Key::Start("x".into())));
        assert_eq!(k.parse("/p2p/dcm/"), None);
        assert_eq!(k.parse("/p2p/other/x"), None);
        assert_eq!(k.parse("/p2px/dcm/x"), None);
        assert_eq!(k.parse("/elsewhere/dcm/x"), None);
    }
}
