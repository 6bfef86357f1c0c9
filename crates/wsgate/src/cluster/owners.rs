//! Which nodes hold which agent ids, as this node last learnt it: the cache
//! that keeps stream opens off Redis (docs/cluster.md §2).
//!
//! An id is looked up in Redis once (a miss); the answer is kept and then
//! kept current by the events of `wsgate:events` (an `up` adds a node to a
//! cached entry, a `down` takes it out, a `node-down` takes the node out of
//! every entry), so a steady stream of opens to a known id makes no Redis
//! command at all. Events about an id that come while its look-up is in
//! flight are applied to the answer when it comes: each event sets one
//! (node, id) pair, events arrive in the order Redis published them, and
//! one published before the look-up ran agrees with its answer, so the
//! answer with every such event applied is Redis's state after the last
//! one. While the
//! listener has lost the channel (Redis restarted or unreachable) the cache
//! goes on serving; once it follows the channel again, events may have been
//! missed, and everything is forgotten: the next open of each id looks it
//! up again.
//!
//! For opens that name no agent (the forward proxy, `/request` without
//! `X-PROXY-AGENT`), the catalog lists every id with its nodes and allow
//! patterns; it is read whole on first need and dropped on any change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::wire::Event;
use crate::tunnel::allow::AllowList;

/// Entries kept at most; past it the cache starts over (an id looked up
/// again costs one round trip).
pub const CAPACITY: usize = 100_000;

enum Slot {
    /// The nodes holding the id (none: known to be held nowhere).
    Known(Vec<Arc<str>>),
    /// A look-up is in flight: the events about the id since it started,
    /// to apply to its answer; `stale` when some may have been missed.
    Fetching { pending: Vec<Change>, stale: bool },
}

/// What an event does to one id's entry.
#[derive(Clone)]
enum Change {
    Add(Arc<str>),
    Remove(Arc<str>),
}

/// Events kept for one look-up in flight; past them it is not kept.
const MAX_PENDING: usize = 64;

impl Change {
    fn apply(&self, nodes: &mut Vec<Arc<str>>) {
        match self {
            Change::Add(n) => {
                if !nodes.contains(n) {
                    nodes.push(n.clone());
                }
            }
            Change::Remove(n) => nodes.retain(|x| x != n),
        }
    }
}

impl Slot {
    /// Applies a change: at once to a known entry, later to one in flight.
    fn change(&mut self, c: Change) {
        match self {
            Slot::Known(nodes) => c.apply(nodes),
            Slot::Fetching { pending, stale } => {
                if pending.len() < MAX_PENDING {
                    pending.push(c);
                } else {
                    *stale = true;
                }
            }
        }
    }
}

/// One id of the catalog: its nodes, each with the allow patterns its
/// connections there announced.
pub type Catalog = Vec<(String, Vec<(Arc<str>, AllowList)>)>;

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Slot>,
    catalog: Option<Arc<Catalog>>,
    /// Bumped whenever the catalog is dropped: a catalog read while it
    /// changed is not kept.
    catalog_epoch: u64,
}

/// The cache (one per node).
#[derive(Default)]
pub struct Owners {
    inner: Mutex<Inner>,
}

/// What the cache knows of an id.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit(Vec<Arc<str>>),
    /// Unknown: look it up, then call [`Owners::fetched`].
    Miss,
}

impl Owners {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The nodes known to hold `id`, or a miss (then a look-up is taken to
    /// be in flight).
    pub fn get(&self, id: &str) -> Lookup {
        let mut g = self.lock();
        match g.by_id.get(id) {
            Some(Slot::Known(nodes)) => Lookup::Hit(nodes.clone()),
            Some(Slot::Fetching { .. }) => Lookup::Miss,
            None => {
                if g.by_id.len() >= CAPACITY {
                    g.by_id.clear();
                }
                g.by_id.insert(
                    id.to_string(),
                    Slot::Fetching {
                        pending: vec![],
                        stale: false,
                    },
                );
                Lookup::Miss
            }
        }
    }

    /// A look-up of `id` answered `nodes`: kept, with the events that came
    /// meanwhile applied, unless some may have been missed (the cache was
    /// cleared).
    pub fn fetched(&self, id: &str, nodes: &[Arc<str>]) {
        let mut g = self.lock();
        match g.by_id.remove(id) {
            Some(Slot::Fetching {
                pending,
                stale: false,
            }) => {
                let mut nodes = nodes.to_vec();
                pending.iter().for_each(|c| c.apply(&mut nodes));
                g.by_id.insert(id.to_string(), Slot::Known(nodes));
            }
            Some(Slot::Fetching { stale: true, .. }) | None => {}
            Some(known) => {
                g.by_id.insert(id.to_string(), known);
            }
        }
    }

    /// A look-up of `id` failed: nothing is kept.
    pub fn fetch_failed(&self, id: &str) {
        let mut g = self.lock();
        if matches!(g.by_id.get(id), Some(Slot::Fetching { .. })) {
            g.by_id.remove(id);
        }
    }

    /// `node` answered that it does not hold `id`: it leaves the entry.
    pub fn not_at(&self, id: &str, node: &str) {
        let mut g = self.lock();
        if let Some(Slot::Known(nodes)) = g.by_id.get_mut(id) {
            nodes.retain(|n| &**n != node);
        }
        g.catalog = None;
        g.catalog_epoch += 1;
    }

    /// Applies an event of `wsgate:events`.
    pub fn apply(&self, e: &Event) {
        let mut g = self.lock();
        let touches_catalog = matches!(
            e,
            Event::Up { .. } | Event::Down { .. } | Event::NodeDown { .. }
        );
        if touches_catalog {
            g.catalog = None;
            g.catalog_epoch += 1;
        }
        match e {
            Event::Up { node, id } => {
                if let Some(slot) = g.by_id.get_mut(id) {
                    slot.change(Change::Add(Arc::from(node.as_str())));
                }
            }
            Event::Down { node, id } => {
                if let Some(slot) = g.by_id.get_mut(id) {
                    slot.change(Change::Remove(Arc::from(node.as_str())));
                }
            }
            Event::NodeDown { node } => {
                let node: Arc<str> = Arc::from(node.as_str());
                for slot in g.by_id.values_mut() {
                    slot.change(Change::Remove(node.clone()));
                }
            }
            _ => {}
        }
    }

    /// Forgets everything (events may have been missed).
    pub fn clear(&self) {
        let mut g = self.lock();
        for slot in g.by_id.values_mut() {
            if let Slot::Fetching { stale, .. } = slot {
                *stale = true;
            }
        }
        g.by_id.retain(|_, s| matches!(s, Slot::Fetching { .. }));
        g.catalog = None;
        g.catalog_epoch += 1;
    }

    /// Ids with a known entry.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock()
            .by_id
            .values()
            .filter(|s| matches!(s, Slot::Known(_)))
            .count()
    }

    /// The catalog, if it is held; else the epoch to pass to
    /// [`Owners::set_catalog`] after reading it.
    pub fn catalog(&self) -> Result<Arc<Catalog>, u64> {
        let g = self.lock();
        g.catalog.clone().ok_or(g.catalog_epoch)
    }

    /// Keeps a catalog read since `epoch`, unless it changed meanwhile.
    pub fn set_catalog(&self, epoch: u64, c: Arc<Catalog>) {
        let mut g = self.lock();
        if g.catalog_epoch == epoch {
            g.catalog = Some(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: &[&str]) -> Vec<Arc<str>> {
        n.iter().map(|s| Arc::from(*s)).collect()
    }

    fn up(node: &str, id: &str) -> Event {
        Event::Up {
            node: node.into(),
            id: id.into(),
        }
    }

    #[test]
    fn a_looked_up_entry_is_kept_and_follows_events() {
        let o = Owners::default();
        assert_eq!(o.get("site-a"), Lookup::Miss);
        o.fetched("site-a", &nodes(&["a"]));
        assert_eq!(o.get("site-a"), Lookup::Hit(nodes(&["a"])));
        o.apply(&up("b", "site-a"));
        o.apply(&up("b", "site-a"));
        assert_eq!(o.get("site-a"), Lookup::Hit(nodes(&["a", "b"])));
        o.apply(&Event::Down {
            node: "a".into(),
            id: "site-a".into(),
        });
        assert_eq!(o.get("site-a"), Lookup::Hit(nodes(&["b"])));
        o.apply(&Event::NodeDown { node: "b".into() });
        assert_eq!(o.get("site-a"), Lookup::Hit(vec![]));
        // Held nowhere is an answer too, and an `up` completes it.
        o.apply(&up("c", "site-a"));
        assert_eq!(o.get("site-a"), Lookup::Hit(nodes(&["c"])));
        o.not_at("site-a", "c");
        assert_eq!(o.get("site-a"), Lookup::Hit(vec![]));
        // Events about ids not cached are ignored.
        o.apply(&up("c", "other"));
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn events_during_a_look_up_are_applied_to_its_answer() {
        let o = Owners::default();
        assert_eq!(o.get("x"), Lookup::Miss);
        o.apply(&up("b", "x"));
        o.apply(&Event::Down {
            node: "a".into(),
            id: "x".into(),
        });
        o.apply(&up("c", "x"));
        o.apply(&Event::NodeDown { node: "c".into() });
        // The answer may or may not have seen them: the same either way.
        o.fetched("x", &nodes(&["a"]));
        assert_eq!(o.get("x"), Lookup::Hit(nodes(&["b"])));
        assert_eq!(o.get("y"), Lookup::Miss);
        o.apply(&up("b", "y"));
        o.fetched("y", &nodes(&["a", "b"]));
        assert_eq!(o.get("y"), Lookup::Hit(nodes(&["a", "b"])));
        // Too many events in flight: the answer is used once, not kept.
        assert_eq!(o.get("z"), Lookup::Miss);
        for i in 0..=MAX_PENDING {
            o.apply(&up(&format!("n{i}"), "z"));
        }
        o.fetched("z", &nodes(&["a"]));
        assert_eq!(o.get("z"), Lookup::Miss);
        o.fetch_failed("z");
        // Clearing forgets answers and spoils look-ups in flight.
        assert_eq!(o.get("w"), Lookup::Miss);
        o.clear();
        o.fetched("w", &nodes(&["a"]));
        assert_eq!(o.get("x"), Lookup::Miss);
        assert_eq!(o.get("w"), Lookup::Miss);
        o.fetch_failed("w");
        assert_eq!(o.get("w"), Lookup::Miss);
    }

    #[test]
    fn the_catalog_is_dropped_on_any_change() {
        let o = Owners::default();
        let epoch = o.catalog().unwrap_err();
        o.set_catalog(epoch, Arc::new(vec![]));
        assert!(o.catalog().is_ok());
        o.apply(&Event::Disconnect { id: "x".into() });
        assert!(o.catalog().is_ok());
        o.apply(&up("a", "x"));
        let epoch = o.catalog().unwrap_err();
        o.apply(&up("a", "y"));
        o.set_catalog(epoch, Arc::new(vec![]));
        assert!(o.catalog().is_err(), "read before a change: not kept");
    }
}
