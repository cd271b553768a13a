//! Cluster mode (issue 12; the patent's FIG. 7, claims 11-13 and 15): the control center as
//! several servers coordinated through etcd.
//!
//! * **Membership**: each node holds one lease (TTL `--lease-ttl`, kept alive at a third of it)
//!   and announces itself under it ([`keys::NodeRecord`]: URL and load, refreshed every
//!   [`REFRESH`]).
//! * **Logical DCMs owned under leases**: a channel's DCM is the key `{prefix}/dcm/{channel}`,
//!   created in a transaction only if it does not exist, bound to the owner's lease; its create
//!   revision is the fencing token. A node claims a DCM when a peer or `GET /api/locate` asks
//!   for a channel that nobody owns, and, for channels it runs, when their key disappears
//!   (its owner's lease expired): live nodes race after a delay that grows with their load, and
//!   the transaction lets one win.
//! * **Resource service locator**: [`Cluster::place`] answers where a channel's DCM runs;
//!   `GET /api/locate` and the WebSocket's [`protocol::ServerMsg::Redirect`] use it.
//! * **Failover**: peers of a dead node reconnect through the locator with their resume token
//!   ([`resume`]); the new owner adopts them with their links and rebuilds the trees from their
//!   heartbeats ([`coordinator::Event::Resume`]). Looped channels run on every node on one
//!   timeline (`{prefix}/start/{channel}`), so every node cuts the same packets with the same
//!   numbers and serves any peer's fallback fetches.
//! * **Fencing**: a node that learns its lease is gone (etcd answers its keep-alive with TTL 0)
//!   or that another node owns one of its DCMs releases those DCMs: its peers are sent to the
//!   owner. While etcd cannot be reached at all, nodes keep serving what they own; nobody can
//!   claim anything meanwhile, so no DCM is owned twice.
//!
//! The etcd I/O runs in tasks spawned by [`start`]; the decisions about what a change means are
//! in [`View`], which takes the cluster's records in and says what to do.

pub mod keys;
mod reissue;
pub mod resume;
mod view;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, WatchOptions,
};
use protocol::PeerId;
use thiserror::Error;

use crate::events::DcmEvent;
use crate::AppState;
pub use keys::{NodeRecord, OwnerRecord};
pub use view::{Change, View};

/// How often a node refreshes its record (load).
pub const REFRESH: Duration = Duration::from_secs(2);

/// Each place in the load ranking delays a node's claim of an orphaned DCM by this much, so the
/// least-loaded live node usually wins the race.
const CLAIM_STEP: Duration = Duration::from_millis(150);

/// Everything a node needs to join a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd endpoints (`http://host:2379`).
    pub etcd: Vec<String>,
    /// This node's name, unique in the cluster.
    pub node_id: String,
    /// Base URL peers and other nodes reach this node at.
    pub advertise_url: String,
    /// Lease time-to-live, seconds.
    pub lease_ttl_s: i64,
    /// Shared by all nodes: signs resume tokens (and, without `--signing-key`, seeds the
    /// stream's signing key so every node signs the same packets alike).
    pub secret: Vec<u8>,
    /// Key prefix in etcd (several clusters may share one etcd).
    pub prefix: String,
    /// How long a resume token opens a resume after it was issued (`--resume-token-ttl`);
    /// connected peers are sent a fresh one at about half of it.
    pub resume_ttl: Duration,
}

/// The shortest resume token lifetime: connected peers are sent fresh tokens about every half
/// of it.
pub const MIN_RESUME_TTL: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("cannot reach etcd at {endpoints}: {message}")]
    Unreachable { endpoints: String, message: String },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("the cluster secret must be at least 16 bytes (--cluster-secret)")]
    WeakSecret,
    #[error("node id {0:?}: use 1-64 letters, digits, '-', '_' or '.'")]
    BadNodeId(String),
    #[error("advertise URL {0:?} must start with http:// or https://")]
    BadAdvertiseUrl(String),
    #[error("the resume token lifetime must be at least {} s (--resume-token-ttl)", MIN_RESUME_TTL.as_secs())]
    ShortResumeTtl,
}

/// Where a channel's DCM runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// On this node.
    Here,
    /// On another node, at this base URL.
    There { url: String },
    /// Nobody can say now (etcd unreachable, or the channel is unknown to the whole cluster).
    Unavailable(String),
}

/// Counts for `/metrics` and the dashboard.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    pub redirects: AtomicU64,
    /// DCMs this node took over after their owner's lease expired.
    pub failovers_lease: AtomicU64,
    /// DCMs this node took over from a live owner that handed them over (it was stopped).
    pub failovers_handover: AtomicU64,
    /// DCMs this node released because it lost its lease or another node owned them.
    pub failovers_fenced: AtomicU64,
    /// DCMs this node handed over when it was stopped (SIGTERM).
    pub failovers_drain: AtomicU64,
    pub claims: AtomicU64,
    pub etcd_errors: AtomicU64,
}

/// A node's membership of the cluster.
pub struct Cluster {
    config: ClusterConfig,
    keys: keys::Keys,
    client: Client,
    view: Mutex<View>,
    lease: AtomicU64,
    pub counters: ClusterCounters,
    draining: std::sync::atomic::AtomicBool,
    /// The server this node runs (set by [`Cluster::run`]): its channels' DCMs are told when
    /// they are claimed or released.
    state: std::sync::OnceLock<AppState>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.config.node_id)
            .field("url", &self.config.advertise_url)
            .finish_non_exhaustive()
    }
}

/// Checks the configuration before anything connects.
pub fn validate(config: &ClusterConfig) -> Result<(), ClusterError> {
    let id_ok = !config.node_id.is_empty()
        && config.node_id.len() <= 64
        && config
            .node_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !id_ok {
        return Err(ClusterError::BadNodeId(config.node_id.clone()));
    }
    let url = &config.advertise_url;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ClusterError::BadAdvertiseUrl(url.clone()));
    }
    if config.secret.len() < 16 {
        return Err(ClusterError::WeakSecret);
    }
    if config.resume_ttl < MIN_RESUME_TTL {
        return Err(ClusterError::ShortResumeTtl);
    }
    Ok(())
}

/// Connects to etcd, takes a lease, announces this node and reads the cluster's records. Fails
/// with [`ClusterError::Unreachable`] (naming the endpoints) when etcd does not answer within a
/// few seconds. The background tasks start with [`Cluster::run`].
pub async fn connect(config: ClusterConfig) -> Result<Arc<Cluster>, ClusterError> {
    validate(&config)?;
    let endpoints = config.etcd.join(",");
    let unreachable = |message: String| ClusterError::Unreachable {
        endpoints: endpoints.clone(),
        message,
    };
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        Client::connect(config.etcd.clone(), Some(options)),
    )
    .await
    .map_err(|_| unreachable("no answer within 5 s".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let keys = keys::Keys::new(&config.prefix);
    let mut c = client.clone();
    let lease = tokio::time::timeout(
        Duration::from_secs(5),
        c.lease_grant(config.lease_ttl_s.max(1), None),
    )
    .await
    .map_err(|_| unreachable("no answer within 5 s".into()))?
    .map_err(|e| unreachable(e.to_string()))?
    .id();
    let view = View::new(&config.node_id);
    let cluster = Arc::new(Cluster {
        keys,
        client,
        view: Mutex::new(view),
        lease: AtomicU64::new(lease as u64),
        counters: ClusterCounters::default(),
        draining: std::sync::atomic::AtomicBool::new(false),
        state: std::sync::OnceLock::new(),
        config,
    });
    cluster
        .announce(&NodeRecord {
            url: cluster.config.advertise_url.clone(),
            peers: 0,
            owned: 0,
            heartbeats_per_s: 0,
            cpu_percent: 0,
        })
        .await?;
    tracing::info!(node = %cluster.config.node_id, url = %cluster.config.advertise_url, lease, "joined the cluster");
    Ok(cluster)
}

impl Cluster {
    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    pub fn url(&self) -> &str {
        &self.config.advertise_url
    }

    pub fn secret(&self) -> &[u8] {
        &self.config.secret
    }

    fn state_channel(&self, name: &str) -> Option<crate::SharedChannel> {
        self.state.get()?.channel(name)
    }

    fn lease(&self) -> i64 {
        self.lease.load(Ordering::Relaxed) as i64
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live nodes' base URLs, this one first.
    pub fn node_urls(&self) -> Vec<String> {
        let v = self.view();
        let mut urls = vec![self.config.advertise_url.clone()];
        urls.extend(
            v.nodes()
                .filter(|(id, _)| **id != self.config.node_id)
                .map(|(_, n)| n.url.clone()),
        );
        urls
    }

    /// The live nodes and what each owns (the operator's view).
    pub fn nodes(&self) -> BTreeMap<String, (NodeRecord, Vec<String>)> {
        self.view().nodes_with_dcms()
    }

    /// Logical DCMs this node owns.
    pub fn owned(&self) -> Vec<String> {
        self.view().owned()
    }

    /// The token with which `peer` may resume on `channel` on any node, issued at `now_ms`
    /// (wall clock, ms since the Unix epoch).
    pub fn resume_token(&self, channel: &str, peer: PeerId, now_ms: u64) -> String {
        resume::token(&self.config.secret, channel, peer, now_ms)
    }

    /// Checks a resume token at `now_ms` (see [`resume::verify`]).
    pub fn verify_resume(
        &self,
        channel: &str,
        peer: PeerId,
        token: &str,
        now_ms: u64,
    ) -> Result<(), resume::ResumeError> {
        let ttl_ms = self.resume_ttl_ms();
        resume::verify(&self.config.secret, channel, peer, token, now_ms, ttl_ms)
    }

    /// The resume tokens' lifetime, ms.
    pub fn resume_ttl_ms(&self) -> u64 {
        self.config.resume_ttl.as_millis().min(u128::from(u64::MAX)) as u64
    }

    /// Where `channel`'s DCM runs. When nobody owns it and this node runs the channel, this
    /// node claims it (a peer is here for it).
    pub async fn place(&self, channel: &str, runs_here: bool) -> Placement {
        if self.draining.load(Ordering::Relaxed) {
            return match self.view().least_loaded_other() {
                Some(url) => Placement::There { url },
                None => Placement::Unavailable("this server is stopping".into()),
            };
        }
        match self.view().owner(channel) {
            Some(o) if o.node == self.config.node_id => return Placement::Here,
            Some(o) => return Placement::There { url: o.url },
            None => {}
        }
        if !runs_here {
            return Placement::Unavailable(format!(
                "no server of the cluster runs channel {channel:?} now"
            ));
        }
        match self.claim(channel).await {
            Ok(None) => Placement::Here,
            Ok(Some(o)) if o.node == self.config.node_id => Placement::Here,
            Ok(Some(o)) if o.url.is_empty() => {
                Placement::Unavailable(format!("channel {channel:?}'s owner is unknown"))
            }
            Ok(Some(o)) => Placement::There { url: o.url },
            Err(e) => Placement::Unavailable(format!("the cluster's store is unreachable: {e}")),
        }
    }

    /// Claims `dcm` for this node if nobody owns it: `Ok(None)` when this node won, the owner
    /// otherwise.
    pub async fn claim(&self, dcm: &str) -> Result<Option<OwnerRecord>, etcd_client::Error> {
        let key = self.keys.dcm(dcm);
        let record = OwnerRecord {
            node: self.config.node_id.clone(),
            url: self.config.advertise_url.clone(),
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let marker = self.keys.handover(dcm);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(self.lease())),
                ),
                // A stopping owner left this: the DCM is taken over, not orphaned by a death.
                TxnOp::delete(marker, Some(DeleteOptions::new().with_prev_key())),
            ])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut c = self.client.clone();
        let resp = c.txn(txn).await.inspect_err(|_| {
            self.counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
        })?;
        if resp.succeeded() {
            let token = resp.header().map_or(0, |h| h.revision());
            let handed_over = resp.op_responses().iter().any(|op| {
                matches!(op, etcd_client::TxnOpResponse::Delete(d) if !d.prev_kvs().is_empty())
            });
            let orphaned = {
                let mut v = self.view();
                v.set_owner(dcm, record, token);
                v.take_orphaned(dcm)
            };
            if let Some(ch) = self.state_channel(dcm) {
                ch.released.store(false, Ordering::Relaxed);
            }
            self.counters.claims.fetch_add(1, Ordering::Relaxed);
            if handed_over {
                self.counters
                    .failovers_handover
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(dcm, token, "took over a DCM its owner handed over");
            } else if orphaned {
                self.counters
                    .failovers_lease
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(dcm, token, "took over a DCM whose owner's lease expired");
            } else {
                tracing::info!(dcm, token, "claimed the DCM");
            }
            return Ok(None);
        }
        for op in resp.op_responses() {
            if let etcd_client::TxnOpResponse::Get(g) = op {
                if let Some(kv) = g.kvs().first() {
                    if let Ok(o) = serde_json::from_slice::<OwnerRecord>(kv.value()) {
                        self.view().set_owner(dcm, o.clone(), kv.create_revision());
                        return Ok(Some(o));
                    }
                }
            }
        }
        // Owned, but the record does not say by whom: not ours, and nowhere to send peers.
        tracing::warn!(dcm, "the DCM's owner record is unreadable");
        Ok(Some(OwnerRecord {
            node: String::new(),
            url: String::new(),
        }))
    }

    /// When `channel`'s timeline began (ms since the Unix epoch): the first node to ask sets it
    /// to `now_ms`; every node loops the channel's source on it.
    pub async fn start_time(&self, channel: &str, now_ms: u64) -> Result<u64, ClusterError> {
        let key = self.keys.start(channel);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), now_ms.to_string(), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut c = self.client.clone();
        let resp = c.txn(txn).await?;
        if resp.succeeded() {
            return Ok(now_ms);
        }
        for op in resp.op_responses() {
            if let etcd_client::TxnOpResponse::Get(g) = op {
                if let Some(t) = g
                    .kvs()
                    .first()
                    .and_then(|kv| kv.value_str().ok()?.parse().ok())
                {
                    return Ok(t);
                }
            }
        }
        Ok(now_ms)
    }

    async fn announce(&self, record: &NodeRecord) -> Result<(), etcd_client::Error> {
        let mut c = self.client.clone();
        let value = serde_json::to_vec(record).unwrap_or_default();
        c.put(
            self.keys.node(&self.config.node_id),
            value,
            Some(PutOptions::new().with_lease(self.lease())),
        )
        .await?;
        self.view().set_node(&self.config.node_id, record.clone());
        Ok(())
    }

    /// Starts the background work: keep-alive, load refresh and the watch.
    pub fn run(self: &Arc<Self>, state: AppState) {
        let _ = self.state.set(state.clone());
        tokio::spawn(self.clone().keep_alive(state.clone()));
        tokio::spawn(self.clone().refresh(state.clone()));
        tokio::spawn(reissue::run(self.clone(), state.clone()));
        tokio::spawn(self.clone().watch(state));
    }

    /// Keeps the lease alive at a third of its TTL. A lease etcd no longer knows (it expired
    /// while this node could not reach etcd) means others may own our DCMs now: a new lease is
    /// taken, and each DCM is claimed again or released to its new owner.
    async fn keep_alive(self: Arc<Self>, state: AppState) {
        let period = Duration::from_millis((self.config.lease_ttl_s.max(1) as u64 * 1000) / 3);
        let mut backoff = Duration::from_millis(200);
        loop {
            if self.draining.load(Ordering::Relaxed) {
                return;
            }
            let mut c = self.client.clone();
            let lease = self.lease();
            let (mut keeper, mut stream) = match c.lease_keep_alive(lease).await {
                Ok(k) => k,
                Err(e) => {
                    self.counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("etcd keep-alive: {e}; serving on, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            loop {
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(period.max(Duration::from_millis(300)), stream.message())
                    .await
                {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => backoff = Duration::from_millis(200),
                    Ok(Ok(Some(_))) if self.draining.load(Ordering::Relaxed) => return,
                    Ok(Ok(Some(_))) => {
                        self.lease_lost(&state).await;
                        break;
                    }
                    _ => {
                        self.counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                tokio::time::sleep(period).await;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Our lease expired: take a new one, announce again, and keep each DCM only if nobody
    /// else took it meanwhile.
    async fn lease_lost(&self, state: &AppState) {
        tracing::warn!(node = %self.config.node_id, "lease expired: re-registering and re-claiming");
        let mut c = self.client.clone();
        match c.lease_grant(self.config.lease_ttl_s.max(1), None).await {
            Ok(r) => self.lease.store(r.id() as u64, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!("etcd lease grant: {e}");
                return;
            }
        }
        let record = self.record(state);
        if let Err(e) = self.announce(&record).await {
            tracing::warn!("announcing the node: {e}");
        }
        let owned = self.view().forget_owned();
        for dcm in owned {
            match self.claim(&dcm).await {
                Ok(None) => {}
                Ok(Some(o)) if o.node == self.config.node_id => {}
                Ok(Some(o)) => self.release(state, &dcm, Some(o.url), "fenced"),
                Err(_) => self.release(state, &dcm, None, "fenced"),
            }
        }
    }

    /// Tells `dcm`'s local driver that this node no longer owns it.
    fn release(&self, state: &AppState, dcm: &str, url: Option<String>, cause: &str) {
        let counter = match cause {
            "drain" => &self.counters.failovers_drain,
            _ => &self.counters.failovers_fenced,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(dcm, ?url, cause, "releasing a DCM");
        if let Some(ch) = state.channel(dcm) {
            // Joins queued behind the release are turned away by the DCM from now on.
            ch.released.store(true, Ordering::Relaxed);
            // Not `try_send`: a full queue (a burst of heartbeats) must not lose the release.
            tokio::spawn(async move {
                let _ = ch.dcm.send(DcmEvent::Release { url }).await;
            });
        }
    }

    fn record(&self, state: &AppState) -> NodeRecord {
        let (peers, _) = state.load();
        NodeRecord {
            url: self.config.advertise_url.clone(),
            peers,
            owned: self.view().owned().len() as u64,
            heartbeats_per_s: 0,
            cpu_percent: 0,
        }
    }

    /// Refreshes this node's record every [`REFRESH`], with the rates since the last one.
    async fn refresh(self: Arc<Self>, state: AppState) {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = (state.load().1, cpu_ticks(), std::time::Instant::now());
        loop {
            tick.tick().await;
            if self.draining.load(Ordering::Relaxed) {
                return;
            }
            let now = (state.load().1, cpu_ticks(), std::time::Instant::now());
            let secs = now.2.duration_since(last.2).as_secs_f64().max(0.001);
            let mut record = self.record(&state);
            record.heartbeats_per_s = (now.0.saturating_sub(last.0) as f64 / secs) as u64;
            if let (Some(a), Some(b)) = (last.1, now.1) {
                // Clock ticks are 1/100 s on Linux.
                record.cpu_percent = (b.saturating_sub(a) as f64 / secs) as u32;
            }
            last = now;
            if self.announce(&record).await.is_err() {
                self.counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Follows every change under the prefix; after a broken stream, reads everything again and
    /// goes on from there.
    async fn watch(self: Arc<Self>, state: AppState) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut c = self.client.clone();
            let all = self.keys.all();
            let snapshot = match c
                .get(all.clone(), Some(GetOptions::new().with_prefix()))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    self.counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("etcd read: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            let revision = snapshot.header().map_or(0, |h| h.revision());
            let records: Vec<(String, Vec<u8>, i64)> = snapshot
                .kvs()
                .iter()
                .filter_map(|kv| {
                    Some((
                        kv.key_str().ok()?.to_string(),
                        kv.value().to_vec(),
                        kv.create_revision(),
                    ))
                })
                .collect();
            let changes = self.view().resync(&self.keys, records, revision);
            self.act(&state, changes);
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let mut stream = match c.watch(all, Some(options)).await {
                Ok(s) => s,
                Err(e) => {
                    self.counters.etcd_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("etcd watch: {e}");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            loop {
                let msg = match stream.message().await {
                    Ok(Some(m)) => m,
                    _ => break,
                };
                if msg.canceled() {
                    break;
                }
                let mut changes = Vec::new();
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Ok(key) = kv.key_str() else { continue };
                    let mut v = self.view();
                    changes.extend(match ev.event_type() {
                        EventType::Put => v.put(&self.keys, key, kv.value(), kv.create_revision()),
                        EventType::Delete => v.delete(&self.keys, key),
                    });
                }
                self.act(&state, changes);
            }
            tokio::time::sleep(backoff).await;
        }
    }

    /// Does what the view's changes call for.
    fn act(self: &Arc<Self>, state: &AppState, changes: Vec<Change>) {
        for change in changes {
            match change {
                // A drain gives its DCMs up itself (and redirects their peers).
                Change::Lost { .. } if self.draining.load(Ordering::Relaxed) => {}
                Change::Lost { dcm, url } => self.release(state, &dcm, url, "fenced"),
                Change::Orphaned { dcm } => {
                    if self.draining.load(Ordering::Relaxed) || state.channel(&dcm).is_none() {
                        continue;
                    }
                    let delay = CLAIM_STEP * self.view().load_rank(&self.config.node_id);
                    let me = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        if me.view().owner(&dcm).is_some() {
                            return;
                        }
                        // Counted as a failover by `claim` when this node wins.
                        let _ = me.claim(&dcm).await;
                    });
                }
            }
        }
    }

    /// A planned stop (SIGTERM): each owned DCM is deleted (only if still ours) and its peers
    /// are sent to the least-loaded other node, which claims it when they arrive. Returns the
    /// DCMs handed over.
    pub async fn drain(&self, state: &AppState) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        let owned = self.view().owned_tokens();
        let target = self.view().least_loaded_other();
        let mut n = 0;
        for (dcm, token) in owned {
            self.view().forget(&dcm);
            let key = self.keys.dcm(&dcm);
            let txn = Txn::new()
                .when([Compare::create_revision(
                    key.clone(),
                    CompareOp::Equal,
                    token,
                )])
                .and_then([
                    TxnOp::delete(key, None),
                    TxnOp::put(self.keys.handover(&dcm), self.config.node_id.clone(), None),
                ]);
            let mut c = self.client.clone();
            if let Err(e) = c.txn(txn).await {
                tracing::warn!(dcm, "handing over: {e}");
            }
            self.release(state, &dcm, target.clone(), "drain");
            n += 1;
        }
        let mut c = self.client.clone();
        let _ = c.lease_revoke(self.lease()).await;
        n
    }
}

/// The process's user + system CPU time in clock ticks (`/proc/self/stat`), where there is one.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces, inside parentheses).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}
