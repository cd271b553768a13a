//! The top tier: preferred nodes and their flooding mesh (patent FIG. 3, FIG. 6 steps 604-606).
//!
//! Per channel, a few high-capacity, stable nodes of each region are *preferred nodes*
//! ([`select_preferred`]: ranked by history, re-evaluated with hysteresis). A region with no such
//! node gets a *waypoint* instead (a configured relay server, or the origin itself). Clients and
//! waypoints are the two kinds of preferred node (claim 6). Together with the origin they form an
//! overlay [`Mesh`] that is c-connected and floods packets with duplicate elimination (the rule
//! lives in [`protocol::mesh`], shared with the wasm peer).
//!
//! # Construction
//!
//! The members sit on a ring and each links to its `h = ⌈c/2⌉` nearest members on each side: the
//! circulant graph `C_m(1..h)`, i.e. Harary's `H_{2h,m}`, which is `2h`-connected (≥ c) whenever
//! `m > 2h`; with fewer members it is the complete graph, the best possible. A join or leave only
//! changes the links of the `2h` ring neighbours around it, so the mesh is maintained
//! incrementally and few preferred nodes need new instructions. (For odd `c`, Harary's exact
//! construction would save one link per node but moves every diameter chord when the ring size
//! changes: every member would be re-instructed on each change.)
//!
//! A member of degree `d` forwards each new packet on at most `d − 1` links, so a client is
//! eligible only with upload ≥ `(d − 1) ×` stream rate ([`MeshConfig::min_upload_kbps`]): then
//! every virtual link can carry more than the stream rate, as the patent requires.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use protocol::PeerId;

/// A member of the top-tier mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MeshNode {
    /// The channel's source: packets enter the mesh here.
    Origin,
    /// A client preferred node (first kind).
    Peer(PeerId),
    /// A server preferred node: a waypoint standing in for a region without capable clients,
    /// possibly run by a third party (second kind; index into the configured relays).
    Waypoint(u32),
}

/// The two kinds of preferred node (claim 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreferredKind {
    Client,
    Server,
}

impl MeshNode {
    pub fn kind(&self) -> PreferredKind {
        match self {
            MeshNode::Peer(_) => PreferredKind::Client,
            MeshNode::Origin | MeshNode::Waypoint(_) => PreferredKind::Server,
        }
    }
}

/// Parameters of the top tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshConfig {
    /// Required vertex connectivity (survives `c − 1` simultaneous failures); at least 1.
    pub c: u32,
    /// Stream rate, kbit/s.
    pub stream_kbps: u32,
    /// Client preferred nodes wanted per region.
    pub per_region: u32,
    /// A challenger replaces an incumbent preferred node only when its score beats the
    /// incumbent's by this many percent, so the tier does not flap on noisy measurements.
    pub hysteresis_percent: u32,
    /// Members the origin feeds directly, spread evenly around the ring, besides its ring
    /// neighbours (0: ring links only). On a ring every member is about `m / 2c` hops from the
    /// origin, and each hop crosses regions and serializes the whole stream: with ten regions
    /// the far side of the ring got packets too late for the tiers below it. Each shortcut
    /// costs the origin one stream.
    pub origin_shortcuts: u32,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            c: 3,
            stream_kbps: 1000,
            per_region: 2,
            hysteresis_percent: 25,
            origin_shortcuts: 8,
        }
    }
}

impl MeshConfig {
    /// Links per member once the mesh is large enough: `2⌈c/2⌉`.
    pub fn degree(&self) -> u32 {
        2 * self.c.max(1).div_ceil(2)
    }

    /// Upload a client needs to be a preferred node: every one of its links but the one a packet
    /// came in on carries the full stream.
    pub fn min_upload_kbps(&self) -> u32 {
        (self.degree() - 1).saturating_mul(self.stream_kbps)
    }
}

/// The c-connected flooding overlay of one channel. Always contains [`MeshNode::Origin`].
#[derive(Debug, Clone)]
pub struct Mesh {
    cfg: MeshConfig,
    /// Members in ring order (sorted, so the result does not depend on the order of events).
    ring: Vec<MeshNode>,
    adj: BTreeMap<MeshNode, Vec<MeshNode>>,
}

impl Mesh {
    pub fn new(cfg: MeshConfig) -> Self {
        let mut m = Mesh {
            cfg: MeshConfig {
                c: cfg.c.max(1),
                ..cfg
            },
            ring: vec![MeshNode::Origin],
            adj: BTreeMap::new(),
        };
        m.relink();
        m
    }

    pub fn config(&self) -> &MeshConfig {
        &self.cfg
    }

    /// Adds a member; returns the members whose neighbours changed (the newcomer included).
    pub fn insert(&mut self, node: MeshNode) -> BTreeSet<MeshNode> {
        match self.ring.binary_search(&node) {
            Ok(_) => BTreeSet::new(),
            Err(i) => {
                self.ring.insert(i, node);
                self.relink()
            }
        }
    }

    /// Removes a member (never the origin); returns the members whose neighbours changed.
    pub fn remove(&mut self, node: MeshNode) -> BTreeSet<MeshNode> {
        if node == MeshNode::Origin {
            return BTreeSet::new();
        }
        match self.ring.binary_search(&node) {
            Ok(i) => {
                self.ring.remove(i);
                let mut changed = self.relink();
                changed.remove(&node);
                changed
            }
            Err(_) => BTreeSet::new(),
        }
    }

    pub fn contains(&self, node: MeshNode) -> bool {
        self.ring.binary_search(&node).is_ok()
    }

    pub fn members(&self) -> &[MeshNode] {
        &self.ring
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// The node's flooding neighbours (empty for non-members).
    pub fn neighbours(&self, node: MeshNode) -> &[MeshNode] {
        self.adj.get(&node).map_or(&[], Vec::as_slice)
    }

    pub fn adjacency(&self) -> &BTreeMap<MeshNode, Vec<MeshNode>> {
        &self.adj
    }

    /// Connectivity the mesh guarantees now: `min(2⌈c/2⌉, members − 1)`.
    pub fn connectivity(&self) -> u32 {
        self.cfg
            .degree()
            .min(self.ring.len().saturating_sub(1) as u32)
    }

    /// Recomputes the circulant links and reports members whose neighbour set changed. O(m·c):
    /// the mesh holds a few nodes per region, so this is microseconds, and only the `2h` ring
    /// neighbours of a change actually differ.
    fn relink(&mut self) -> BTreeSet<MeshNode> {
        let m = self.ring.len();
        let h = self.cfg.c.div_ceil(2) as usize;
        let mut adj = BTreeMap::new();
        for (i, node) in self.ring.iter().enumerate() {
            let mut v: Vec<MeshNode> = if m <= 2 * h + 1 {
                // Complete graph: every other member.
                self.ring.iter().copied().filter(|x| x != node).collect()
            } else {
                (1..=h)
                    .flat_map(|d| [self.ring[(i + d) % m], self.ring[(i + m - d) % m]])
                    .collect()
            };
            v.sort_unstable();
            v.dedup();
            adj.insert(*node, v);
        }
        self.add_origin_shortcuts(&mut adj);
        let changed = adj
            .iter()
            .filter(|(n, v)| self.adj.get(n) != Some(v))
            .map(|(n, _)| *n)
            .chain(self.adj.keys().filter(|n| !adj.contains_key(n)).copied())
            .collect();
        self.adj = adj;
        changed
    }
}

impl Mesh {
    /// Links the origin to `origin_shortcuts` members spread evenly around the ring (see
    /// [`MeshConfig::origin_shortcuts`]); members next to it already are not counted twice.
    fn add_origin_shortcuts(&self, adj: &mut BTreeMap<MeshNode, Vec<MeshNode>>) {
        let m = self.ring.len();
        let Ok(at) = self.ring.binary_search(&MeshNode::Origin) else {
            return;
        };
        let s = self.cfg.origin_shortcuts as usize;
        if s == 0 || m <= 2 {
            return;
        }
        for j in 1..=s {
            // Offsets j·m/(s+1) from the origin: evenly between its ring neighbours' reach.
            let off = j * m / (s + 1);
            if off == 0 || off >= m {
                continue;
            }
            let node = self.ring[(at + off) % m];
            if node == MeshNode::Origin {
                continue;
            }
            for (a, b) in [(MeshNode::Origin, node), (node, MeshNode::Origin)] {
                if let Some(v) = adj.get_mut(&a) {
                    if let Err(i) = v.binary_search(&b) {
                        v.insert(i, b);
                    }
                }
            }
        }
    }
}

/// Whether the graph stays connected after removing any `c − 1` vertices (and has more than `c`
/// vertices): vertex connectivity ≥ `c`, by Menger's theorem with unit-capacity max-flows.
///
/// If a cut `S` with `|S| < c` exists, one of any `c` fixed vertices lies outside `S` and is
/// separated from some non-adjacent vertex; so checking the local connectivity from `c` fixed
/// sources to every non-adjacent vertex suffices: `c · m` flows of at most `c` augmenting paths.
pub fn is_c_connected<N: Ord + Copy>(adj: &BTreeMap<N, Vec<N>>, c: u32) -> bool {
    let nodes: Vec<N> = adj.keys().copied().collect();
    let m = nodes.len();
    if c == 0 {
        return true;
    }
    if m <= c as usize {
        return false;
    }
    let index: BTreeMap<N, usize> = nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let g: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| {
            adj.get(n)
                .into_iter()
                .flatten()
                .filter_map(|x| index.get(x).copied())
                .filter(|x| nodes[*x] != *n)
                .collect()
        })
        .collect();
    for s in 0..c as usize {
        for t in 0..m {
            if t != s && !g[s].contains(&t) && local_connectivity(&g, s, t, c) < c {
                return false;
            }
        }
    }
    true
}

/// Vertex-disjoint `s`–`t` paths, counted up to `limit` (vertex splitting: `v_in → v_out` with
/// capacity 1, edges with capacity 1 both ways; BFS augmenting paths).
fn local_connectivity(g: &[Vec<usize>], s: usize, t: usize, limit: u32) -> u32 {
    let m = g.len();
    // Node ids: v_in = 2v, v_out = 2v + 1. Residual capacities in a map keyed by arc.
    let mut cap: BTreeMap<(usize, usize), i32> = BTreeMap::new();
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); 2 * m];
    let mut arc = |a: usize, b: usize, c: i32, cap: &mut BTreeMap<(usize, usize), i32>| {
        *cap.entry((a, b)).or_insert(0) += c;
        cap.entry((b, a)).or_insert(0);
        out[a].push(b);
        out[b].push(a);
    };
    for (v, next) in g.iter().enumerate() {
        let inner = if v == s || v == t { limit as i32 } else { 1 };
        arc(2 * v, 2 * v + 1, inner, &mut cap);
        for &w in next {
            arc(2 * v + 1, 2 * w, 1, &mut cap);
        }
    }
    let (src, dst) = (2 * s + 1, 2 * t);
    let mut flow = 0;
    while flow < limit {
        let mut prev = vec![usize::MAX; 2 * m];
        prev[src] = src;
        let mut q = VecDeque::from([src]);
        while let Some(a) = q.pop_front() {
            if a == dst {
                break;
            }
            for &b in &out[a] {
                if prev[b] == usize::MAX && cap.get(&(a, b)).is_some_and(|c| *c > 0) {
                    prev[b] = a;
                    q.push_back(b);
                }
            }
        }
        if prev[dst] == usize::MAX {
            break;
        }
        let mut b = dst;
        while b != src {
            let a = prev[b];
            *cap.entry((a, b)).or_insert(0) -= 1;
            *cap.entry((b, a)).or_insert(0) += 1;
            b = a;
        }
        flow += 1;
    }
    flow
}

/// What the control center knows of a peer's past (claim 10): the basis of its ranking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct History {
    /// Seconds connected so far.
    pub uptime_s: u32,
    /// Share of the packets it was asked to forward that its children reported, ‰ (1000 when
    /// unknown yet, so newcomers are not penalised for having no record).
    pub delivered_permille: u16,
    /// Upload its heartbeats show it actually achieved, kbit/s (0: no measurement yet).
    pub measured_upload_kbps: u32,
}

impl History {
    /// Upload to plan with: the declared value, capped once heartbeats have measured something
    /// at twice what the peer actually uploaded (a peer may not have been asked for more, so the
    /// cap leaves room to grow, but an absurd declaration is not believed).
    pub fn effective_upload_kbps(&self, declared_kbps: u32) -> u32 {
        if self.measured_upload_kbps == 0 {
            declared_kbps
        } else {
            declared_kbps.min(self.measured_upload_kbps.saturating_mul(2))
        }
    }

    /// Ranking score: capacity × reliability × stability. Uptime saturates after an hour, and
    /// starts at a floor so a capable newcomer can still be chosen where nobody better exists.
    pub fn score(&self, declared_kbps: u32) -> u64 {
        u64::from(self.effective_upload_kbps(declared_kbps))
            * u64::from(self.delivered_permille.min(1000))
            * (600 + u64::from(self.uptime_s.min(3600)))
    }
}

/// A peer that could become a preferred node of some region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<R> {
    pub peer: PeerId,
    pub region: R,
    pub upload_kbps: u32,
    pub history: History,
}

/// The preferred nodes per region, chosen among `candidates` (claims 10 and 18).
///
/// Per region, up to `per_region` eligible candidates (upload ≥ [`MeshConfig::min_upload_kbps`])
/// with the best scores; but an incumbent (in `current` and still eligible) keeps its place unless
/// a challenger beats its score by `hysteresis_percent`. Regions absent from the result have no
/// capable client and need a waypoint.
pub fn select_preferred<R: Ord + Copy>(
    cfg: &MeshConfig,
    current: &BTreeSet<PeerId>,
    candidates: &[Candidate<R>],
) -> BTreeMap<R, Vec<PeerId>> {
    let mut by_region: BTreeMap<R, Vec<(u64, PeerId)>> = BTreeMap::new();
    for c in candidates {
        if c.history.effective_upload_kbps(c.upload_kbps) >= cfg.min_upload_kbps() {
            by_region
                .entry(c.region)
                .or_default()
                .push((c.history.score(c.upload_kbps), c.peer));
        }
    }
    let want = cfg.per_region.max(1) as usize;
    let mut out = BTreeMap::new();
    for (region, mut ranked) in by_region {
        // Best first; ties broken by id so the result is deterministic.
        ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let (mut kept, challengers): (Vec<_>, Vec<_>) =
            ranked.into_iter().partition(|(_, p)| current.contains(p));
        kept.truncate(want);
        let mut challengers = challengers.into_iter().peekable();
        while kept.len() < want {
            match challengers.next() {
                Some(c) => kept.push(c),
                None => break,
            }
        }
        // Swap the weakest incumbent for the strongest challenger while the margin is clear.
        for c in challengers {
            kept.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let Some(weakest) = kept.last_mut() else {
                break;
            };
            let bar = u128::from(weakest.0) * u128::from(100 + cfg.hysteresis_percent);
            if u128::from(c.0) * 100 > bar {
                *weakest = c;
            } else {
                break;
            }
        }
        let mut peers: Vec<PeerId> = kept.into_iter().map(|(_, p)| p).collect();
        peers.sort_unstable();
        out.insert(region, peers);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use protocol::mesh::{Flood, Flooder};

    use protocol::rng::XorShift as Rng;

    fn mesh(c: u32, peers: u64) -> Mesh {
        let mut m = Mesh::new(MeshConfig {
            c,
            ..MeshConfig::default()
        });
        for i in 0..peers {
            m.insert(MeshNode::Peer(PeerId(i)));
        }
        m
    }

    /// Connected after deleting `removed` (BFS from any survivor).
    fn connected_without(m: &Mesh, removed: &BTreeSet<MeshNode>) -> bool {
        let alive: Vec<MeshNode> = m
            .members()
            .iter()
            .copied()
            .filter(|n| !removed.contains(n))
            .collect();
        let Some(&start) = alive.first() else {
            return true;
        };
        let mut seen = BTreeSet::from([start]);
        let mut q = VecDeque::from([start]);
        while let Some(x) = q.pop_front() {
            for &y in m.neighbours(x) {
                if !removed.contains(&y) && seen.insert(y) {
                    q.push_back(y);
                }
            }
        }
        seen.len() == alive.len()
    }

    fn subsets(items: &[MeshNode], size: usize, f: &mut impl FnMut(&BTreeSet<MeshNode>)) {
        fn go(
            items: &[MeshNode],
            size: usize,
            cur: &mut Vec<MeshNode>,
            f: &mut impl FnMut(&BTreeSet<MeshNode>),
        ) {
            if cur.len() == size {
                f(&cur.iter().copied().collect());
                return;
            }
            for (i, x) in items.iter().enumerate() {
                cur.push(*x);
                go(&items[i + 1..], size, cur, f);
                cur.pop();
            }
        }
        go(items, size, &mut Vec::new(), f);
    }

    #[test]
    fn mesh_survives_removing_any_c_minus_1_nodes_exhaustively() {
        for c in 1..=4 {
            for peers in 0..14 {
                let m = mesh(c, peers);
                let members = m.members().to_vec();
                if members.len() > c as usize {
                    assert!(
                        is_c_connected(m.adjacency(), c),
                        "c={c} m={}",
                        members.len()
                    );
                }
                let mut cuts = 0;
                subsets(&members, (c as usize - 1).min(members.len()), &mut |s| {
                    cuts += 1;
                    assert!(
                        connected_without(&m, s),
                        "c={c} m={} cut {s:?}",
                        members.len()
                    );
                });
                assert!(cuts > 0);
            }
        }
    }

    #[test]
    fn large_mesh_survives_random_c_minus_1_failures_and_churn() {
        let mut rng = Rng(11);
        let mut m = mesh(3, 120);
        for step in 0..200u64 {
            // Churn: one leaves, one joins; only ring neighbours are re-linked, and the
            // origin's shortcuts, which move with the ring's size.
            let shortcuts = 2 * m.config().origin_shortcuts as usize;
            let members = m.members().to_vec();
            let victim = members[1 + rng.below(members.len() as u64 - 1) as usize];
            let changed = m.remove(victim);
            assert!(
                changed.len() <= 2 * m.config().degree() as usize + shortcuts,
                "{changed:?}"
            );
            let changed = m.insert(MeshNode::Peer(PeerId(1000 + step)));
            assert!(changed.len() <= 2 * m.config().degree() as usize + 1 + shortcuts);
            let members = m.members().to_vec();
            let removed: BTreeSet<MeshNode> = (0..2)
                .map(|_| members[rng.below(members.len() as u64) as usize])
                .collect();
            assert!(connected_without(&m, &removed), "step {step}: {removed:?}");
        }
        assert!(is_c_connected(m.adjacency(), 3));
        assert!(is_c_connected(m.adjacency(), 4));
        assert!(!is_c_connected(m.adjacency(), 5));
    }

    #[test]
    fn origin_shortcuts_bring_every_member_within_a_few_hops() {
        let hops_from_origin = |m: &Mesh| {
            let mut dist: BTreeMap<MeshNode, u32> = BTreeMap::from([(MeshNode::Origin, 0)]);
            let mut q = VecDeque::from([MeshNode::Origin]);
            while let Some(x) = q.pop_front() {
                for y in m.neighbours(x) {
                    if !dist.contains_key(y) {
                        dist.insert(*y, dist[&x] + 1);
                        q.push_back(*y);
                    }
                }
            }
            assert_eq!(dist.len(), m.len());
            dist.values().copied().max().unwrap_or(0)
        };
        for (shortcuts, most) in [(0, u32::MAX), (8, 3)] {
            let mut m = Mesh::new(MeshConfig {
                c: 3,
                origin_shortcuts: shortcuts,
                ..MeshConfig::default()
            });
            m.insert(MeshNode::Origin);
            for i in 0..80 {
                m.insert(MeshNode::Peer(PeerId(i)));
            }
            let far = hops_from_origin(&m);
            if shortcuts == 0 {
                assert!(far >= 10, "a ring of 81 with 2 links each way: {far}");
            } else {
                assert!(far <= most, "{far} hops");
                assert_eq!(m.neighbours(MeshNode::Origin).len(), 4 + 8);
            }
            assert!(is_c_connected(m.adjacency(), 3));
        }
    }

    #[test]
    fn connectivity_check_agrees_with_known_graphs() {
        let ring = |m: u32| -> BTreeMap<u32, Vec<u32>> {
            (0..m)
                .map(|i| (i, vec![(i + 1) % m, (i + m - 1) % m]))
                .collect()
        };
        assert!(is_c_connected(&ring(6), 2));
        assert!(!is_c_connected(&ring(6), 3));
        // Two triangles joined at one vertex: 1-connected.
        let bowtie: BTreeMap<u32, Vec<u32>> = [
            (0, vec![1, 2]),
            (1, vec![0, 2]),
            (2, vec![0, 1, 3, 4]),
            (3, vec![2, 4]),
            (4, vec![2, 3]),
        ]
        .into_iter()
        .collect();
        assert!(is_c_connected(&bowtie, 1));
        assert!(!is_c_connected(&bowtie, 2));
        // K4 is 3-connected, never 4 (needs more than c vertices).
        let k4: BTreeMap<u32, Vec<u32>> = (0..4)
            .map(|i| (i, (0..4).filter(|j| *j != i).collect()))
            .collect();
        assert!(is_c_connected(&k4, 3));
        assert!(!is_c_connected(&k4, 4));
    }

    #[test]
    fn small_meshes_are_complete_and_origin_stays() {
        let mut m = mesh(3, 3);
        assert_eq!(m.len(), 4);
        assert_eq!(m.neighbours(MeshNode::Origin).len(), 3);
        assert_eq!(m.connectivity(), 3);
        assert!(m.remove(MeshNode::Origin).is_empty());
        assert!(m.contains(MeshNode::Origin));
        assert!(m.insert(MeshNode::Peer(PeerId(0))).is_empty());
        let changed = m.insert(MeshNode::Waypoint(0));
        assert!(changed.contains(&MeshNode::Waypoint(0)));
        assert_eq!(MeshNode::Waypoint(0).kind(), PreferredKind::Server);
        assert_eq!(MeshNode::Peer(PeerId(0)).kind(), PreferredKind::Client);
    }

    /// The origin injects packets; `c − 1` members have failed; messages arrive in a random
    /// order. Every surviving member accepts every packet exactly once.
    #[test]
    fn flooding_over_the_mesh_delivers_once_despite_failures() {
        let mut rng = Rng(3);
        for peers in [5u64, 20, 60] {
            let m = mesh(3, peers);
            let members = m.members().to_vec();
            let failed: BTreeSet<MeshNode> = (0..2)
                .map(|_| members[1 + rng.below(members.len() as u64 - 1) as usize])
                .collect();
            let mut state: BTreeMap<MeshNode, Flooder> =
                members.iter().map(|n| (*n, Flooder::default())).collect();
            let mut accepted: BTreeMap<(MeshNode, u64), u32> = BTreeMap::new();
            let mut pending: Vec<(MeshNode, Option<MeshNode>, u64)> =
                (0..30).map(|seq| (MeshNode::Origin, None, seq)).collect();
            while !pending.is_empty() {
                let (to, from, seq) = pending.swap_remove(rng.below(pending.len() as u64) as usize);
                if failed.contains(&to) {
                    continue;
                }
                let f = state.get_mut(&to).unwrap();
                if let Flood::Forward(next) = f.on_packet(seq, from, m.neighbours(to)) {
                    *accepted.entry((to, seq)).or_default() += 1;
                    pending.extend(next.into_iter().map(|n| (n, Some(to), seq)));
                }
            }
            for n in members.iter().filter(|n| !failed.contains(n)) {
                for seq in 0..30 {
                    assert_eq!(accepted.get(&(*n, seq)), Some(&1), "{n:?} seq {seq}");
                }
            }
        }
    }

    fn cand(peer: u64, region: u8, upload: u32, uptime: u32) -> Candidate<u8> {
        Candidate {
            peer: PeerId(peer),
            region,
            upload_kbps: upload,
            history: History {
                uptime_s: uptime,
                delivered_permille: 1000,
                measured_upload_kbps: 0,
            },
        }
    }

    #[test]
    fn preferred_nodes_are_the_best_eligible_per_region() {
        let cfg = MeshConfig::default(); // c = 3: degree 4, needs 3000 kbit/s
        let cands = [
            cand(1, 0, 10_000, 3600),
            cand(2, 0, 5_000, 3600),
            cand(3, 0, 20_000, 0), // most capacity, but just arrived: ranks below 2
            cand(4, 1, 2_999, 3600), // not eligible: region 1 needs a waypoint
            cand(5, 2, 3_000, 10),
        ];
        let sel = select_preferred(&cfg, &BTreeSet::new(), &cands);
        assert_eq!(sel.get(&0), Some(&vec![PeerId(1), PeerId(2)]));
        assert_eq!(sel.get(&1), None);
        assert_eq!(sel.get(&2), Some(&vec![PeerId(5)]));
    }

    #[test]
    fn hysteresis_keeps_incumbents_against_slightly_better_challengers() {
        let cfg = MeshConfig {
            per_region: 1,
            ..MeshConfig::default()
        };
        let current = BTreeSet::from([PeerId(1)]);
        let close = [cand(1, 0, 10_000, 3600), cand(2, 0, 12_000, 3600)];
        assert_eq!(
            select_preferred(&cfg, &current, &close)[&0],
            vec![PeerId(1)]
        );
        let clear = [cand(1, 0, 10_000, 3600), cand(2, 0, 13_000, 3600)];
        assert_eq!(
            select_preferred(&cfg, &current, &clear)[&0],
            vec![PeerId(2)]
        );
        // Without an incumbent the best simply wins.
        assert_eq!(
            select_preferred(&cfg, &BTreeSet::new(), &close)[&0],
            vec![PeerId(2)]
        );
    }

    #[test]
    fn absurd_declared_capacity_is_capped_by_measurements() {
        let h = History {
            uptime_s: 100,
            delivered_permille: 1000,
            measured_upload_kbps: 800,
        };
        assert_eq!(h.effective_upload_kbps(1_000_000), 1600);
        assert_eq!(h.effective_upload_kbps(1000), 1000);
        assert_eq!(History::default().effective_upload_kbps(5), 5);
    }
}
