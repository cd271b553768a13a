//! What a node knows of the cluster, rebuilt from etcd's records and changes, and what each
//! change means for it: sans-IO (records in, [`Change`]s out), so every case is unit-tested
//! without an etcd.

use std::collections::BTreeMap;

use super::keys::{Key, Keys, NodeRecord, OwnerRecord};

/// What a change of the records asks this node to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A DCM this node owned is no longer its own: release it, sending its peers to `url` (the
    /// new owner) when known.
    Lost { dcm: String, url: Option<String> },
    /// Nobody owns `dcm` any more (its owner's lease expired, or it handed the DCM over):
    /// nodes that run the channel race to claim it.
    Orphaned { dcm: String },
}

/// The cluster as one node sees it.
#[derive(Debug, Clone)]
pub struct View {
    me: String,
    nodes: BTreeMap<String, NodeRecord>,
    /// Owner of each logical DCM and its fencing token (the key's create revision).
    owners: BTreeMap<String, (OwnerRecord, i64)>,
    /// DCMs nobody owns since their owner went.
    orphaned: std::collections::BTreeSet<String>,
}

impl View {
    pub fn new(me: &str) -> Self {
        View {
            me: me.to_string(),
            nodes: BTreeMap::new(),
            owners: BTreeMap::new(),
            orphaned: std::collections::BTreeSet::new(),
        }
    }

    /// Whether `dcm` was orphaned before this node claimed it: a failover to count.
    pub fn take_orphaned(&mut self, dcm: &str) -> bool {
        self.orphaned.remove(dcm)
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&String, &NodeRecord)> {
        self.nodes.iter()
    }

    /// Each live node with the DCMs it owns.
    pub fn nodes_with_dcms(&self) -> BTreeMap<String, (NodeRecord, Vec<String>)> {
        let mut m: BTreeMap<String, (NodeRecord, Vec<String>)> = self
            .nodes
            .iter()
            .map(|(id, n)| (id.clone(), (n.clone(), Vec::new())))
            .collect();
        for (dcm, (o, _)) in &self.owners {
            if let Some(e) = m.get_mut(&o.node) {
                e.1.push(dcm.clone());
            }
        }
        m
    }

    pub fn owner(&self, dcm: &str) -> Option<OwnerRecord> {
        self.owners.get(dcm).map(|(o, _)| o.clone())
    }

    pub fn owned(&self) -> Vec<String> {
        self.owned_tokens().into_iter().map(|(d, _)| d).collect()
    }

    pub fn owned_tokens(&self) -> Vec<(String, i64)> {
        self.owners
            .iter()
            .filter(|(_, (o, _))| o.node == self.me)
            .map(|(d, (_, t))| (d.clone(), *t))
            .collect()
    }

    pub fn set_owner(&mut self, dcm: &str, owner: OwnerRecord, token: i64) {
        if owner.node != self.me {
            self.orphaned.remove(dcm);
        }
        self.owners.insert(dcm.to_string(), (owner, token));
    }

    pub fn set_node(&mut self, id: &str, record: NodeRecord) {
        self.nodes.insert(id.to_string(), record);
    }

    pub fn forget(&mut self, dcm: &str) {
        self.owners.remove(dcm);
    }

    /// Forgets every DCM this node owned (its lease is gone) and names them.
    pub fn forget_owned(&mut self) -> Vec<String> {
        let mine = self.owned();
        for d in &mine {
            self.owners.remove(d);
        }
        mine
    }

    /// The load order of live nodes: fewest peers, then fewest DCMs, then by id.
    fn by_load(&self) -> Vec<(&String, &NodeRecord)> {
        let mut v: Vec<_> = self.nodes.iter().collect();
        v.sort_by(|a, b| (a.1.peers, a.1.owned, a.0).cmp(&(b.1.peers, b.1.owned, b.0)));
        v
    }

    /// `node`'s place in the load order (0: least loaded; 0 too when unknown).
    pub fn load_rank(&self, node: &str) -> u32 {
        self.by_load()
            .iter()
            .position(|(id, _)| *id == node)
            .unwrap_or(0) as u32
    }

    /// The URL of the least-loaded live node other than this one.
    pub fn least_loaded_other(&self) -> Option<String> {
        self.by_load()
            .into_iter()
            .find(|(id, _)| **id != self.me)
            .map(|(_, n)| n.url.clone())
    }

    /// A key was created or changed.
    pub fn put(
        &mut self,
        keys: &Keys,
        key: &str,
        value: &[u8],
        create_revision: i64,
    ) -> Vec<Change> {
        match keys.parse(key) {
            Some(Key::Node(id)) => {
                if let Ok(n) = serde_json::from_slice::<NodeRecord>(value) {
                    self.nodes.insert(id, n);
                }
                Vec::new()
            }
            Some(Key::Dcm(dcm)) => {
                let Ok(owner) = serde_json::from_slice::<OwnerRecord>(value) else {
                    return Vec::new();
                };
                // An event older than what we know (our own claim may be applied before the
                // watch delivers what preceded it) changes nothing.
                if self
                    .owners
                    .get(&dcm)
                    .is_some_and(|(_, token)| *token > create_revision)
                {
                    return Vec::new();
                }
                let was_mine = self
                    .owners
                    .get(&dcm)
                    .is_some_and(|(o, _)| o.node == self.me);
                let lost = was_mine && owner.node != self.me;
                let url = owner.url.clone();
                if owner.node != self.me {
                    self.orphaned.remove(&dcm);
                }
                self.owners.insert(dcm.clone(), (owner, create_revision));
                if lost {
                    vec![Change::Lost {
                        dcm,
                        url: Some(url),
                    }]
                } else {
                    Vec::new()
                }
            }
            Some(Key::Start(_) | Key::Handover(_)) | None => Vec::new(),
        }
    }

    /// A key was deleted (or its lease expired).
    pub fn delete(&mut self, keys: &Keys, key: &str) -> Vec<Change> {
        match keys.parse(key) {
            Some(Key::Node(id)) => {
                self.nodes.remove(&id);
                Vec::new()
            }
            Some(Key::Dcm(dcm)) => match self.owners.remove(&dcm) {
                // Our own key went: our lease expired while we could not renew it. Whoever
                // claims it next owns it; until we know who, our peers are told to look it up.
                Some((o, _)) if o.node == self.me => vec![
                    Change::Lost {
                        dcm: dcm.clone(),
                        url: None,
                    },
                    Change::Orphaned { dcm },
                ],
                _ => {
                    self.orphaned.insert(dcm.clone());
                    vec![Change::Orphaned { dcm }]
                }
            },
            Some(Key::Start(_) | Key::Handover(_)) | None => Vec::new(),
        }
    }

    /// Replaces everything with a fresh read of all records (after the watch broke), as the
    /// changes between the two would have.
    /// `revision` is the store's revision of the read: an owner we learnt of after it (our own
    /// claim, made while the read was under way) is kept.
    pub fn resync(
        &mut self,
        keys: &Keys,
        records: Vec<(String, Vec<u8>, i64)>,
        revision: i64,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut seen_dcms = Vec::new();
        self.nodes.clear();
        for (key, value, rev) in &records {
            if let Some(Key::Dcm(d)) = keys.parse(key) {
                seen_dcms.push(d);
            }
            changes.extend(self.put(keys, key, value, *rev));
        }
        let gone: Vec<String> = self
            .owners
            .iter()
            .filter(|(d, (_, token))| !seen_dcms.contains(d) && *token <= revision)
            .map(|(d, _)| d.clone())
            .collect();
        for d in gone {
            changes.extend(self.delete(keys, &keys.dcm(&d)));
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn owner(node: &str) -> Vec<u8> {
        serde_json::to_vec(&OwnerRecord {
            node: node.into(),
            url: format!("http://{node}"),
        })
        .unwrap()
    }

    fn node(peers: u64) -> Vec<u8> {
        serde_json::to_vec(&NodeRecord {
            url: format!("http://n{peers}"),
            peers,
            owned: 0,
            heartbeats_per_s: 0,
            cpu_percent: 0,
        })
        .unwrap()
    }

    #[test]
    fn an_expired_owner_orphans_its_dcm_and_a_new_owner_is_followed() {
        let keys = Keys::new("/p2p");
        let mut v = View::new("b");
        assert!(v.put(&keys, "/p2p/dcm/demo", &owner("a"), 7).is_empty());
        assert_eq!(v.owner("demo").unwrap().node, "a");
        assert_eq!(
            v.delete(&keys, "/p2p/dcm/demo"),
            vec![Change::Orphaned { dcm: "demo".into() }]
        );
        assert!(v.take_orphaned("demo"), "a failover when claimed");
        assert!(!v.take_orphaned("demo"));
        assert!(v.owner("demo").is_none());
        assert!(v.put(&keys, "/p2p/dcm/demo", &owner("b"), 9).is_empty());
        assert_eq!(v.owned_tokens(), vec![("demo".to_string(), 9)]);
    }

    #[test]
    fn a_dcm_taken_by_another_node_is_lost_and_names_the_new_owner() {
        let keys = Keys::new("/p2p");
        let mut v = View::new("a");
        v.set_owner(
            "demo",
            OwnerRecord {
                node: "a".into(),
                url: "http://a".into(),
            },
            3,
        );
        assert_eq!(
            v.put(&keys, "/p2p/dcm/demo", &owner("c"), 11),
            vec![Change::Lost {
                dcm: "demo".into(),
                url: Some("http://c".into())
            }]
        );
        assert!(v.owned().is_empty());
        // Our own key expiring: lost, and up for grabs.
        v.set_owner(
            "other",
            OwnerRecord {
                node: "a".into(),
                url: "http://a".into(),
            },
            4,
        );
        let ch = v.delete(&keys, "/p2p/dcm/other");
        assert_eq!(ch.len(), 2);
        assert!(matches!(&ch[0], Change::Lost { url: None, .. }));
    }

    #[test]
    fn resync_reports_what_vanished_while_the_watch_was_down() {
        let keys = Keys::new("/p2p");
        let mut v = View::new("b");
        v.put(&keys, "/p2p/dcm/x", &owner("a"), 1);
        v.put(&keys, "/p2p/dcm/y", &owner("a"), 2);
        v.put(&keys, "/p2p/nodes/a", &node(5), 1);
        // Our own claim of z, made while the read was under way (after its revision 10).
        v.set_owner(
            "z",
            OwnerRecord {
                node: "b".into(),
                url: "http://b".into(),
            },
            12,
        );
        let changes = v.resync(
            &keys,
            vec![
                ("/p2p/dcm/y".into(), owner("a"), 2),
                ("/p2p/nodes/b".into(), node(1), 3),
            ],
            10,
        );
        assert_eq!(
            v.owned(),
            vec!["z".to_string()],
            "a claim newer than the read is kept"
        );
        assert_eq!(changes, vec![Change::Orphaned { dcm: "x".into() }]);
        assert_eq!(v.nodes().count(), 1, "node a is gone");
    }

    #[test]
    fn a_stale_put_does_not_take_a_newer_claim_away() {
        let keys = Keys::new("/p2p");
        let mut v = View::new("b");
        v.set_owner(
            "demo",
            OwnerRecord {
                node: "b".into(),
                url: "http://b".into(),
            },
            20,
        );
        // The dead owner's record, delivered late by the watch.
        assert!(v.put(&keys, "/p2p/dcm/demo", &owner("a"), 7).is_empty());
        assert_eq!(v.owned(), vec!["demo".to_string()]);
    }

    #[test]
    fn the_least_loaded_node_ranks_first() {
        let keys = Keys::new("/p2p");
        let mut v = View::new("b");
        v.put(&keys, "/p2p/nodes/a", &node(50), 1);
        v.put(&keys, "/p2p/nodes/b", &node(10), 1);
        v.put(&keys, "/p2p/nodes/c", &node(20), 1);
        assert_eq!(v.load_rank("b"), 0);
        assert_eq!(v.load_rank("c"), 1);
        assert_eq!(v.load_rank("a"), 2);
        assert_eq!(v.least_loaded_other().as_deref(), Some("http://n20"));
        // Garbage in a record is ignored, not a panic.
        assert!(v.put(&keys, "/p2p/dcm/z", b"not json", 5).is_empty());
        assert!(v.put(&keys, "/p2p/nodes/d", b"\xff", 5).is_empty());
    }
}
