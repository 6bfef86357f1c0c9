//! Child processes: every contender runs in its own process group, dies with
//! the load generator (`PR_SET_PDEATHSIG`), and is killed — its whole group,
//! so socat's per-connection children too — when its handle is dropped.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// A running child; dropping it kills its process group.
pub struct Proc {
    pub name: String,
    child: std::process::Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `argv` with stderr appended to `log`. `stdout_line` names a
    /// prefix to wait for on stdout (the text after it is returned); without
    /// one, stdout goes to the log as well.
    pub fn start(
        name: &str,
        argv: &[String],
        log: &Path,
        stdout_line: Option<&str>,
    ) -> anyhow::Result<(Proc, Option<String>)> {
        let logf = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stderr(logf.try_clone()?);
        if stdout_line.is_some() {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(logf);
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("start {}", argv[0]))?;
        let mut found = None;
        if let Some(prefix) = stdout_line {
            let out = child.stdout.take().expect("piped");
            let (tx, rx) = std::sync::mpsc::channel();
            let want = prefix.to_string();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.strip_prefix(&want) {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(rest.trim().to_string());
                        }
                    }
                }
            });
            let mut p = Proc {
                name: name.into(),
                child,
            };
            match rx.recv_timeout(Duration::from_secs(15)) {
                Ok(v) => found = Some(v),
                Err(_) => {
                    let status = p.child.try_wait().ok().flatten();
                    bail!(
                        "{name} did not print {prefix:?} (exit status {status:?}); see {}",
                        log.display()
                    )
                }
            }
            return Ok((p, found));
        }
        Ok((
            Proc {
                name: name.into(),
                child,
            },
            found,
        ))
    }

    /// The port the process listens on, read from /proc (for programs that
    /// do not print the port they were given by `:0`).
    pub fn listening_port(&mut self) -> anyhow::Result<u16> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(port) = listening_port_of(self.pid())? {
                return Ok(port);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}) before listening", self.name);
            }
            if Instant::now() > deadline {
                bail!("{} is not listening after 15 s", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process group: SIGTERM, then SIGKILL after a grace period.
    pub fn stop(&mut self) {
        let pgid = self.pid() as libc::pid_t;
        // SAFETY: plain syscalls on a process group we created.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Whatever is left of the group (socat's forked children included).
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Finds a TCP socket in LISTEN state among `pid`'s file descriptors.
fn listening_port_of(pid: u32) -> anyhow::Result<Option<u16>> {
    let mut inodes = HashSet::new();
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| anyhow!("{pid}: {e}"))?;
    for entry in dir.flatten() {
        if let Ok(link) = std::fs::read_link(entry.path()) {
            let link = link.to_string_lossy().into_owned();
            if let Some(ino) = link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
            {
                inodes.insert(ino.to_string());
            }
        }
    }
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                if let Some((_, port)) = f[1].rsplit_once(':') {
                    return Ok(Some(u16::from_str_radix(port, 16)?));
                }
            }
        }
    }
    Ok(None)
}
