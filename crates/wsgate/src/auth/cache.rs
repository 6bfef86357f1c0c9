//! A small bounded cache with a time to live, for credentials already
//! checked (a Basic user and password, an auth hook's answer). Keys are
//! digests of the credential (never the credential itself); at most `cap`
//! entries: when full, expired entries go first, then everything (a flood of
//! distinct credentials costs their hashes again, never memory).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct TtlCache<K, V> {
    ttl: Duration,
    cap: usize,
    map: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    pub fn new(ttl: Duration, cap: usize) -> Self {
        TtlCache {
            ttl,
            cap,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the cache keeps anything at all.
    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero() && self.cap > 0
    }

    pub fn get(&self, k: &K) -> Option<V> {
        if !self.enabled() {
            return None;
        }
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(k) {
            Some((v, until)) if *until > Instant::now() => Some(v.clone()),
            Some(_) => {
                m.remove(k);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, k: K, v: V) {
        if !self.enabled() {
            return;
        }
        let now = Instant::now();
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= self.cap {
            m.retain(|_, (_, until)| *until > now);
            if m.len() >= self.cap {
                m.clear();
            }
        }
        m.insert(k, (v, now + self.ttl));
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A SHA-256 digest of `parts` under a per-process random `salt`: cache keys
/// that say nothing about the credential.
pub fn digest(salt: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(salt);
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// A fresh random salt.
pub fn salt() -> [u8; 32] {
    use rand::RngCore;
    let mut s = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_size_is_bounded() {
        let c = TtlCache::new(Duration::from_millis(50), 3);
        for i in 0..10u32 {
            c.insert(i, i);
            assert!(c.len() <= 3);
        }
        assert_eq!(c.get(&9), Some(9));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.get(&9), None);
        let off = TtlCache::new(Duration::ZERO, 3);
        off.insert(1, 1);
        assert_eq!(off.get(&1), None);
        let s = salt();
        assert_ne!(digest(&s, &[b"ab", b"c"]), digest(&s, &[b"a", b"bc"]));
    }
}
