//! Make-before-break: a tree link the control center moves stays up until its replacement
//! delivers.
//!
//! New instructions reach the two old ends of a moved link and its new parent at about the same
//! time, but the new link needs a data channel (0.3-1.5 s to open in a browser under load) or at
//! least the parent's next packet. Without a handover the old parent stops sending the moment
//! its instructions arrive, and the child is left with nothing but the origin's bridge and its
//! own fallback fetches until the new parent's first packet; a moved leaf's gaps cost one fetch
//! each, a moved forwarder's one per descendant.
//!
//! So both old ends keep the link for up to [`EngineConfig::handover_ms`](super::EngineConfig):
//! * the **old parent** keeps sending the tree to its former child (after its real children:
//!   the queue is in arrival order, and a handover send is never reported in heartbeats);
//! * the **child** keeps the old parent's link open and takes what it sends until the new
//!   parent's first packet of the tree arrives, then closes that link (unless the plan still
//!   uses it), which is what tells the old parent to stop: the driver reports the close as
//!   [`Input::LinkClosed`](super::Input::LinkClosed).
//!
//! A child that left the swarm closes its links as it goes, so the old parent never spends
//! upload on a handover to a peer whose link the driver already reported closed.

use protocol::PeerId;

/// A child moved away from this peer in tree `tree`, still fed until `until` (ms).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Leaving {
    child: PeerId,
    tree: u32,
    until: f64,
}

#[derive(Debug, Default)]
pub(super) struct Handover {
    leaving: Vec<Leaving>,
    /// Per tree: the previous peer parent, kept until the new one delivers or until when (ms).
    former: Vec<Option<(PeerId, f64)>>,
}

impl Handover {
    /// New instructions moved `child` of `tree` away from us: keep feeding it until `until`.
    pub fn child_moved(&mut self, child: PeerId, tree: u32, until: f64) {
        self.child_back(child, tree);
        self.leaving.push(Leaving { child, tree, until });
    }

    /// `child` is our child in `tree` again (or its link closed): no handover for it there.
    pub fn child_back(&mut self, child: PeerId, tree: u32) {
        self.leaving
            .retain(|l| !(l.child == child && l.tree == tree));
    }

    /// New instructions replaced `old`, our parent in `tree`, which had delivered: keep its
    /// link until the new parent's first packet of the tree, or until `until`. A move back to
    /// the former parent ends the handover.
    pub fn parent_changed(&mut self, tree: u32, old: PeerId, until: f64) {
        let i = tree as usize;
        if self.former.len() <= i {
            self.former.resize(i + 1, None);
        }
        self.former[i] = Some((old, until));
    }

    /// The tree's current parent is `parent`: a handover from that same peer is over.
    pub fn parent_is(&mut self, tree: u32, parent: Option<PeerId>) {
        if let Some(f) = self.former.get_mut(tree as usize) {
            if f.is_some_and(|(old, _)| Some(old) == parent) {
                *f = None;
            }
        }
    }

    /// The peer that fed `tree` before its current parent, while the handover lasts.
    pub fn former_parent(&self, tree: u32) -> Option<PeerId> {
        self.former
            .get(tree as usize)
            .copied()
            .flatten()
            .map(|f| f.0)
    }

    /// The new parent of `tree` delivered: the old one is no longer needed. Whether anything
    /// changed.
    pub fn new_parent_delivered(&mut self, tree: u32) -> bool {
        self.former
            .get_mut(tree as usize)
            .and_then(|f| f.take())
            .is_some()
    }

    /// The link to `peer` closed: every handover through it is over.
    pub fn closed(&mut self, peer: PeerId) -> bool {
        let before = self.leaving.len();
        self.leaving.retain(|l| l.child != peer);
        let mut changed = before != self.leaving.len();
        for f in &mut self.former {
            if f.is_some_and(|(old, _)| old == peer) {
                *f = None;
                changed = true;
            }
        }
        changed
    }

    /// Ends the handovers due by `now`; whether any did.
    pub fn expire(&mut self, now: f64) -> bool {
        if self.leaving.is_empty() && self.former.iter().all(Option::is_none) {
            return false;
        }
        let before = self.leaving.len();
        self.leaving.retain(|l| l.until > now);
        let mut changed = before != self.leaving.len();
        for f in &mut self.former {
            if f.is_some_and(|(_, until)| until <= now) {
                *f = None;
                changed = true;
            }
        }
        changed
    }

    /// Former children of `tree` still fed.
    pub fn leaving_children(&self, tree: u32) -> impl Iterator<Item = PeerId> + '_ {
        self.leaving
            .iter()
            .filter(move |l| l.tree == tree)
            .map(|l| l.child)
    }

    pub fn is_leaving(&self, child: PeerId, tree: u32) -> bool {
        self.leaving
            .iter()
            .any(|l| l.child == child && l.tree == tree)
    }

    /// Every peer a handover keeps a link to.
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.leaving
            .iter()
            .map(|l| l.child)
            .chain(self.former.iter().flatten().map(|f| f.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> PeerId {
        PeerId(n as u64)
    }

    #[test]
    fn a_moved_child_is_fed_until_its_link_closes_or_the_time_is_up() {
        let mut h = Handover::default();
        h.child_moved(id(1), 0, 1_000.0);
        h.child_moved(id(2), 0, 1_000.0);
        h.child_moved(id(2), 1, 1_500.0);
        assert_eq!(
            h.leaving_children(0).collect::<Vec<_>>(),
            vec![id(1), id(2)]
        );
        assert!(h.closed(id(2)), "a closed link ends both of its handovers");
        assert!(!h.is_leaving(id(2), 1));
        assert!(!h.expire(999.0));
        assert!(h.expire(1_000.0));
        assert_eq!(h.peers().count(), 0);
    }

    #[test]
    fn the_old_parent_is_kept_until_the_new_one_delivers() {
        let mut h = Handover::default();
        h.parent_changed(2, id(7), 1_000.0);
        assert_eq!(h.former_parent(2), Some(id(7)));
        assert_eq!(h.peers().collect::<Vec<_>>(), vec![id(7)]);
        assert!(h.new_parent_delivered(2));
        assert!(!h.new_parent_delivered(2));
        assert_eq!(h.former_parent(2), None);
        // A move back to the former parent ends the handover at once.
        h.parent_changed(0, id(7), 1_000.0);
        h.parent_is(0, Some(id(7)));
        assert_eq!(h.former_parent(0), None);
    }
}
