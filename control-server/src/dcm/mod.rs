//! Delivery coordinator manager (FIG. 7): one task per channel that owns the channel's
//! multi-tree and the outbound queues of its peers. Joins, leaves, signaling and heartbeats come
//! in as [`DcmEvent`]s; instructions, relayed signals and origin packets go out. The topology
//! decisions themselves are made by the pure [`crate::topology::MultiTree`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use protocol::{ErrorCode, Heartbeat, PeerId, ServerMsg, Signal, Source};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::channel::Channel;
use crate::topology::{MultiTree, MultiTreeConfig};

/// What a session's writer task sends to its WebSocket.
#[derive(Debug)]
pub enum Outbound {
    Msg(ServerMsg),
    Packet(Bytes),
    Close(String),
}

pub type OutboundTx = mpsc::Sender<Outbound>;

#[derive(Debug)]
pub enum DcmEvent {
    Join {
        peer: PeerId,
        upload_kbps: u32,
        out: OutboundTx,
    },
    Leave {
        peer: PeerId,
    },
    Signal {
        from: PeerId,
        to: PeerId,
        signal: Signal,
    },
    Heartbeat {
        peer: PeerId,
        heartbeat: Box<Heartbeat>,
    },
    /// New packets from the origin: pushed to the peers whose parent is the origin.
    Packets(Vec<(u64, Bytes)>),
    Snapshot {
        reply: oneshot::Sender<TopologySnapshot>,
    },
}

/// The channel's current distribution topology, for `/api/channels/{id}/topology` and tests.
#[derive(Debug, Clone, Serialize)]
pub struct TopologySnapshot {
    pub channel: String,
    pub substreams: u32,
    pub stream_kbps: u32,
    pub epoch: u64,
    pub max_depth: u32,
    pub peers: Vec<PeerView>,
    /// Peers the origin feeds directly, per substream.
    pub origin_children: Vec<Vec<PeerId>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    pub id: PeerId,
    pub upload_kbps: u32,
    pub interior_tree: Option<u32>,
    pub plan: Vec<protocol::SubstreamPlan>,
    pub last_heartbeat: Option<Heartbeat>,
}

struct PeerEntry {
    out: OutboundTx,
    upload_kbps: u32,
    last_heartbeat: Option<Heartbeat>,
}

/// State of one DCM. Kept separate from the task loop so it can be driven directly in tests.
pub struct Dcm {
    channel: Arc<Channel>,
    k: u32,
    tree: MultiTree,
    peers: HashMap<PeerId, PeerEntry>,
    epoch: u64,
}

impl Dcm {
    pub fn new(channel: Arc<Channel>, k: u32, origin_fanout: u32, max_fanout: u32) -> Self {
        let stream_kbps = channel.media.read().map(|m| m.stream_kbps).unwrap_or(1000);
        Dcm {
            channel,
            k,
            tree: MultiTree::new(MultiTreeConfig {
                k,
                stream_kbps,
                origin_fanout,
                max_fanout,
            }),
            peers: HashMap::new(),
            epoch: 0,
        }
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<DcmEvent>) {
        while let Some(ev) = events.recv().await {
            self.handle(ev);
        }
        tracing::debug!(channel = %self.channel.name, "DCM stopped");
    }

    pub fn handle(&mut self, ev: DcmEvent) {
        match ev {
            DcmEvent::Join {
                peer,
                upload_kbps,
                out,
            } => {
                self.peers.insert(
                    peer,
                    PeerEntry {
                        out,
                        upload_kbps,
                        last_heartbeat: None,
                    },
                );
                let changes = self.tree.join(peer, upload_kbps);
                tracing::info!(channel = %self.channel.name, %peer, upload_kbps, affected = changes.affected.len(), "peer joined");
                self.send_instructions(changes.affected);
            }
            DcmEvent::Leave { peer } => {
                if self.peers.remove(&peer).is_some() {
                    let changes = self.tree.leave(peer);
                    tracing::info!(channel = %self.channel.name, %peer, affected = changes.affected.len(), "peer left");
                    self.send_instructions(changes.affected);
                }
            }
            DcmEvent::Signal { from, to, signal } => self.relay_signal(from, to, signal),
            DcmEvent::Heartbeat { peer, heartbeat } => {
                if let Some(e) = self.peers.get_mut(&peer) {
                    e.last_heartbeat = Some(*heartbeat);
                }
            }
            DcmEvent::Packets(packets) => self.push_from_origin(packets),
            DcmEvent::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
        }
    }

    fn send_instructions(&mut self, affected: BTreeSet<PeerId>) {
        if affected.is_empty() {
            return;
        }
        self.epoch += 1;
        for peer in affected {
            let Some(plan) = self.tree.plan(peer) else {
                continue;
            };
            let msg = ServerMsg::Instructions {
                epoch: self.epoch,
                substreams: plan,
            };
            self.send(peer, Outbound::Msg(msg));
        }
    }

    fn send(&mut self, peer: PeerId, msg: Outbound) {
        let Some(entry) = self.peers.get(&peer) else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = entry.out.try_send(msg) {
            // A peer that cannot keep up with its control queue is cut loose rather than
            // allowed to hold up every other viewer of the channel.
            tracing::warn!(%peer, "outbound queue full; closing session");
            let _ = entry
                .out
                .try_send(Outbound::Close("outbound queue full".into()));
        }
    }

    fn linked(&self, a: PeerId, b: PeerId) -> bool {
        self.tree.plan(a).is_some_and(|plan| {
            plan.iter()
                .any(|s| s.parent == Source::Peer { id: b } || s.children.contains(&b))
        })
    }

    fn relay_signal(&mut self, from: PeerId, to: PeerId, signal: Signal) {
        if !self.peers.contains_key(&to) || !self.linked(from, to) {
            self.send(
                from,
                Outbound::Msg(ServerMsg::Error {
                    code: ErrorCode::NotLinked,
                    message: format!("{to} is not linked with {from}; signaling refused"),
                }),
            );
            return;
        }
        self.send(to, Outbound::Msg(ServerMsg::Signal { from, signal }));
    }

    fn push_from_origin(&mut self, packets: Vec<(u64, Bytes)>) {
        if let Some(edge) = packets.last().map(|p| p.0) {
            let ids: Vec<PeerId> = self.peers.keys().copied().collect();
            for id in ids {
                self.send(id, Outbound::Msg(ServerMsg::LiveEdge { seq: edge }));
            }
        }
        let mut pushed = 0u64;
        for (seq, bytes) in packets {
            let sub = protocol::substream_of(seq, self.k);
            for child in self.tree.origin_children(sub) {
                if let Some(entry) = self.peers.get(&child) {
                    // Dropped when the peer's queue is full: it fetches the packet over HTTP.
                    if entry.out.try_send(Outbound::Packet(bytes.clone())).is_ok() {
                        pushed += bytes.len() as u64;
                    }
                }
            }
        }
        self.channel
            .counters
            .origin_push_bytes
            .fetch_add(pushed, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> TopologySnapshot {
        let mut peers: Vec<PeerView> = self
            .peers
            .iter()
            .map(|(id, e)| PeerView {
                id: *id,
                upload_kbps: e.upload_kbps,
                interior_tree: self.tree.interior_tree(*id),
                plan: self.tree.plan(*id).unwrap_or_default(),
                last_heartbeat: e.last_heartbeat.clone(),
            })
            .collect();
        peers.sort_by_key(|p| p.id);
        TopologySnapshot {
            channel: self.channel.name.clone(),
            substreams: self.k,
            stream_kbps: self
                .channel
                .media
                .read()
                .map(|m| m.stream_kbps)
                .unwrap_or(0),
            epoch: self.epoch,
            max_depth: self.tree.max_depth(),
            peers,
            origin_children: (0..self.k).map(|s| self.tree.origin_children(s)).collect(),
        }
    }
}
