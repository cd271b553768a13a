//! Many native peers in one process: worker threads, each a current-thread tokio runtime with
//! a `LocalSet` holding its share of the peers (a peer is `!Send`, see [`crate::peer`]). Used by
//! the binary (`--peers N`), by `cargo xtask swarm --native-viewers N` and by the e2e tests.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use protocol::report::PeerReport;
use tokio::sync::watch;

use crate::peer::{run, PeerConfig};
use crate::Error;

#[derive(Debug, Clone)]
pub struct SwarmConfig {
    pub peer: PeerConfig,
    pub peers: usize,
    /// Worker threads (each runs its peers on one core).
    pub threads: usize,
    /// Pause between two joins (a whole swarm joining at once is a thundering herd).
    pub join_every: Duration,
    /// Upload capacities cycled over the peers (peer `i` gets `upload_cycle[i % len]`);
    /// empty: every peer declares `peer.upload_kbps`.
    pub upload_cycle: Vec<u32>,
}

/// Per peer: how its run ended (`None` while it runs).
type Outcomes = Arc<Mutex<Vec<Option<Result<(), String>>>>>;

pub struct NativeSwarm {
    stop: watch::Sender<bool>,
    reports: Vec<Arc<Mutex<PeerReport>>>,
    outcomes: Outcomes,
    workers: Vec<JoinHandle<()>>,
}

impl NativeSwarm {
    /// Starts the peers; they join one after another, `join_every` apart.
    pub fn start(cfg: SwarmConfig) -> Result<NativeSwarm, Error> {
        crate::init_crypto();
        let (stop, stop_rx) = watch::channel(false);
        let reports: Vec<_> = (0..cfg.peers)
            .map(|_| Arc::new(Mutex::new(PeerReport::default())))
            .collect();
        let outcomes = Arc::new(Mutex::new(vec![None; cfg.peers]));
        let threads = cfg.threads.clamp(1, cfg.peers.max(1));
        let mut workers = Vec::new();
        for w in 0..threads {
            let mine: Vec<usize> = (w..cfg.peers).step_by(threads).collect();
            let cfg = cfg.clone();
            let stop_rx = stop_rx.clone();
            let reports = reports.clone();
            let outcomes = outcomes.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?;
            let handle = std::thread::Builder::new()
                .name(format!("waypoint-{w}"))
                .spawn(move || {
                    let local = tokio::task::LocalSet::new();
                    local.block_on(&rt, async move {
                        let mut tasks = Vec::new();
                        for i in mine {
                            let mut cfg_i = cfg.peer.clone();
                            if !cfg.upload_cycle.is_empty() {
                                cfg_i.upload_kbps = cfg.upload_cycle[i % cfg.upload_cycle.len()];
                            }
                            let stop_i = stop_rx.clone();
                            let (report, http) = (reports[i].clone(), http.clone());
                            let outcomes = outcomes.clone();
                            let delay = cfg.join_every * i as u32;
                            tasks.push(tokio::task::spawn_local(async move {
                                tokio::time::sleep(delay).await;
                                if *stop_i.borrow() {
                                    return;
                                }
                                let res = run(cfg_i, http, stop_i, report).await;
                                if let Err(e) = &res {
                                    tracing::warn!(peer = i, "native peer ended: {e}");
                                }
                                if let Ok(mut o) = outcomes.lock() {
                                    o[i] = Some(res.map_err(|e| e.to_string()));
                                }
                            }));
                        }
                        for t in tasks {
                            let _ = t.await;
                        }
                    });
                })?;
            workers.push(handle);
        }
        Ok(NativeSwarm {
            stop,
            reports,
            outcomes,
            workers,
        })
    }

    /// The latest statistics of every peer (refreshed twice a second).
    pub fn reports(&self) -> Vec<PeerReport> {
        self.reports
            .iter()
            .map(|r| r.lock().map(|r| r.clone()).unwrap_or_default())
            .collect()
    }

    /// Peers whose run ended with an error, and why.
    pub fn failures(&self) -> Vec<(usize, String)> {
        self.outcomes
            .lock()
            .map(|o| {
                o.iter()
                    .enumerate()
                    .filter_map(|(i, r)| match r {
                        Some(Err(e)) => Some((i, e.clone())),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every peer leaves; returns their final statistics.
    pub fn stop(mut self) -> Vec<PeerReport> {
        self.shutdown();
        self.reports()
    }

    fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for NativeSwarm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
