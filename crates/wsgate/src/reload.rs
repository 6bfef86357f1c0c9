//! What makes a running gateway reload: SIGHUP, and a change to a file its
//! settings come from (the config file, certificates and keys, CA bundles,
//! the agent token file, and whatever else [`Config::files`] lists).
//!
//! Files are watched by polling their metadata (length, modification time,
//! inode) once a second: it needs no platform API, sees a file replaced by a
//! rename as well as one written in place, and costs a few `stat` calls. A
//! change is acted on once the files have stayed the same for one more
//! poll, so an editor's several writes make one reload.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::config::Config;

/// How often watched files are looked at.
pub const POLL: Duration = Duration::from_secs(1);

/// What one file looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn look(path: &PathBuf) -> Option<Seen> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Seen {
        len: m.len(),
        modified: m.modified().ok(),
        inode,
    })
}

/// The watched files and how they looked.
#[derive(Debug)]
pub struct Watch {
    files: Vec<(PathBuf, Option<Seen>)>,
    /// A change seen at the last poll, not yet settled.
    pending: bool,
}

impl Watch {
    /// Watches `config_file` (if the settings came from one) and every file
    /// `config` names.
    pub fn new(config_file: Option<&PathBuf>, config: &Config) -> Watch {
        let mut paths: Vec<PathBuf> = config_file.into_iter().cloned().collect();
        paths.extend(config.files());
        paths.sort();
        paths.dedup();
        Watch {
            files: paths
                .into_iter()
                .map(|p| {
                    let s = look(&p);
                    (p, s)
                })
                .collect(),
            pending: false,
        }
    }

    /// Looks at the files again: `true` once a change has settled (the
    /// files changed at an earlier poll and stayed the same since).
    pub fn poll(&mut self) -> bool {
        let mut changed = false;
        for (path, seen) in &mut self.files {
            let now = look(path);
            if now != *seen {
                changed = true;
                *seen = now;
            }
        }
        if changed {
            self.pending = true;
            return false;
        }
        std::mem::take(&mut self.pending)
    }

    /// The files watched.
    pub fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.files.iter().map(|(p, _)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_reported_once_it_has_settled() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "a").unwrap();
        let config = crate::config::parse(
            "c.toml",
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[[route]]\nto = \"echo:\"\n",
            dir.path(),
        )
        .unwrap();
        let mut w = Watch::new(Some(&file), &config);
        assert_eq!(w.paths().count(), 1);
        assert!(!w.poll(), "nothing changed");
        std::fs::write(&file, "ab").unwrap();
        assert!(!w.poll(), "changed: wait for it to settle");
        assert!(w.poll(), "settled: reload");
        assert!(!w.poll(), "once");
        // Replaced by a rename (same length): the inode tells.
        let tmp = dir.path().join("new");
        std::fs::write(&tmp, "xy").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert!(!w.poll());
        assert!(w.poll());
        // Removed: a change too (the reload will say what is wrong).
        std::fs::remove_file(&file).unwrap();
        assert!(!w.poll());
        assert!(w.poll());
    }
}
