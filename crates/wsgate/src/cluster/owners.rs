//! Which nodes hold which agent ids, as this node last learnt it: the cache
//! that keeps stream opens off Redis (docs/cluster.md §2).
//!
//! An id is looked up in Redis once (a miss); the answer is kept and then
//! kept current by the events of `wsgate:events` (an `up` adds a node to a
//! cached entry, a `down` takes it out, a `node-down` takes the node out of
//! every entry), so a steady stream of opens to a known id makes no Redis
//! command at all. An answer that was in flight while an event about its id
//! came is used once and not kept (it may predate the event). While the
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
    /// A look-up is in flight; `stale` once an event about the id came.
    Fetching { stale: bool },
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
                g.by_id
                    .insert(id.to_string(), Slot::Fetching { stale: false });
                Lookup::Miss
            }
        }
    }

    /// A look-up of `id` answered `nodes`: kept, unless an event about the
    /// id came meanwhile (or the cache was cleared).
    pub fn fetched(&self, id: &str, nodes: &[Arc<str>]) {
        let mut g = self.lock();
        match g.by_id.get(id) {
            Some(Slot::Fetching { stale: false }) => {
                g.by_id.insert(id.to_string(), Slot::Known(nodes.to_vec()));
            }
            Some(Slot::Fetching { stale: true }) => {
                g.by_id.remove(id);
            }
            _ => {}
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
            Event::Up { node, id } => match g.by_id.get_mut(id) {
                Some(Slot::Known(nodes)) => {
                    if !nodes.iter().any(|n| &**n == node) {
                        nodes.push(Arc::from(node.as_str()));
                    }
                }
                Some(Slot::Fetching { stale }) => *stale = true,
                None => {}
            },
            Event::Down { node, id } => match g.by_id.get_mut(id) {
                Some(Slot::Known(nodes)) => nodes.retain(|n| &**n != node),
                Some(Slot::Fetching { stale }) => *stale = true,
                None => {}
            },
            Event::NodeDown { node } => {
                for slot in g.by_id.values_mut() {
                    match slot {
                        Slot::Known(nodes) => nodes.retain(|n| &**n != node),
                        Slot::Fetching { stale } => *stale = true,
                    }
                }
            }
            _ => {}
        }
    }

    /// Forgets everything (events may have been missed).
    pub fn clear(&self) {
        let mut g = self.lock();
        for slot in g.by_id.values_mut() {
            if let Slot::Fetching { stale } = slot {
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
    fn an_answer_overtaken_by_an_event_is_not_kept() {
        let o = Owners::default();
        assert_eq!(o.get("x"), Lookup::Miss);
        o.apply(&up("b", "x"));
        o.fetched("x", &nodes(&["a"]));
        assert_eq!(o.get("x"), Lookup::Miss, "looked up again");
        o.fetched("x", &nodes(&["a", "b"]));
        assert_eq!(o.get("x"), Lookup::Hit(nodes(&["a", "b"])));
        // Clearing forgets answers and spoils look-ups in flight.
        assert_eq!(o.get("y"), Lookup::Miss);
        o.clear();
        o.fetched("y", &nodes(&["a"]));
        assert_eq!(o.get("x"), Lookup::Miss);
        assert_eq!(o.get("y"), Lookup::Miss);
        o.fetch_failed("y");
        assert_eq!(o.get("y"), Lookup::Miss);
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
