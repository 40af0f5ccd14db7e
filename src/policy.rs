//! The fetch policy: which processes may cause fetches.
//!
//! Scanners (updatedb, antivirus, indexers) read every file they meet; through an HSM that
//! recalls a whole tree. Listed processes (by `comm`, by executable path, or by effective uid)
//! are denied, with a chosen errno, every access to content that is not present; a per-uid
//! token bucket limits how many fetches a second any one uid may cause, beyond which its
//! accesses fail with EAGAIN. Content that is present is never affected: the worker asks the
//! policy only for an event that would fetch. Decided in the worker, which has the event's pid.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::sys::fanotify::DenyErrno;

/// The errnos a policy denial may use: those the kernel accepts in an answer to a pre-content
/// event (`FAN_DENY_ERRNO`; EACCES is not among them).
pub const ERRNOS: &[(&str, DenyErrno)] = &[
    ("EPERM", DenyErrno::Perm),
    ("EIO", DenyErrno::Io),
    ("EAGAIN", DenyErrno::Again),
    ("EBUSY", DenyErrno::Busy),
];

pub fn parse_errno(s: &str) -> Result<DenyErrno, String> {
    ERRNOS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
        .map(|(_, e)| *e)
        .ok_or_else(|| {
            let names: Vec<&str> = ERRNOS.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown errno {s:?} for a policy denial; one of {} (the kernel allows no \
                 other, EACCES included)",
                names.join(", ")
            )
        })
}

pub fn errno_name(e: DenyErrno) -> &'static str {
    ERRNOS
        .iter()
        .find(|(_, x)| *x == e)
        .map_or("EIO", |(n, _)| *n)
}

/// What `hsm serve` is told (config keys and options of the same names).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// Process names (`comm`, as `ps -o comm` shows it: at most 15 bytes) denied fetches.
    #[serde(default)]
    pub deny_comm: Vec<String>,
    /// Executable paths (`/proc/PID/exe`) denied fetches.
    #[serde(default)]
    pub deny_exe: Vec<PathBuf>,
    /// Effective uids denied fetches.
    #[serde(default)]
    pub deny_uid: Vec<u32>,
    /// The errno of those denials (EPERM unless told).
    #[serde(default)]
    pub deny_errno: Option<String>,
    /// Fetches a second any one uid may cause (0 or unset: no limit).
    #[serde(default)]
    pub uid_fetch_rate: Option<f64>,
    /// Fetches a uid may cause at once before the rate applies (default: one second's worth).
    #[serde(default)]
    pub uid_fetch_burst: Option<f64>,
}

impl PolicyConfig {
    /// Check the values; Err names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(e) = &self.deny_errno {
            parse_errno(e)?;
        }
        for (name, v) in [
            ("uid_fetch_rate", self.uid_fetch_rate),
            ("uid_fetch_burst", self.uid_fetch_burst),
        ] {
            if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                return Err(format!("{name} must be a number >= 0"));
            }
        }
        for c in &self.deny_comm {
            if c.is_empty() || c.contains('/') {
                return Err(format!(
                    "deny_comm {c:?}: a process name, not a path (use deny_exe for paths)"
                ));
            }
        }
        Ok(())
    }
}

/// The facts about a process the policy looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub comm: String,
    pub exe: Option<PathBuf>,
    pub uid: u32,
}

impl Process {
    /// From /proc; None if the process is gone.
    pub fn read(pid: i32, need_exe: bool) -> Option<Process> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let uid = status_euid(&status)?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim_end_matches('\n')
            .to_string();
        let exe = need_exe
            .then(|| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
            .flatten();
        Some(Process { comm, exe, uid })
    }
}

/// The effective uid from the text of /proc/PID/status (`Uid: real effective saved fs`).
fn status_euid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Why an access was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    /// The process is listed: denied with this errno.
    Listed(DenyErrno),
    /// Its uid is over its fetch rate: denied with EAGAIN.
    Rate,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct Policy {
    cfg: PolicyConfig,
    errno: DenyErrno,
    buckets: Mutex<HashMap<u32, Bucket>>,
}

impl Policy {
    /// None when the policy restricts nothing (then nothing is read from /proc).
    pub fn new(cfg: &PolicyConfig) -> Result<Option<Policy>, String> {
        cfg.validate()?;
        let active = !cfg.deny_comm.is_empty()
            || !cfg.deny_exe.is_empty()
            || !cfg.deny_uid.is_empty()
            || cfg.uid_fetch_rate.is_some_and(|r| r > 0.0);
        if !active {
            return Ok(None);
        }
        let errno = match &cfg.deny_errno {
            Some(e) => parse_errno(e)?,
            None => DenyErrno::Perm,
        };
        Ok(Some(Policy {
            cfg: cfg.clone(),
            errno,
            buckets: Mutex::new(HashMap::new()),
        }))
    }

    /// Is this process listed (a scanner)? Then the errno to deny its fetches with.
    pub fn listed(&self, p: &Process) -> Option<DenyErrno> {
        // comm is cut to 15 bytes by the kernel: compare names cut the same way.
        let cut = |s: &str| -> Vec<u8> { s.as_bytes().iter().take(15).copied().collect() };
        let by_comm = self.cfg.deny_comm.iter().any(|c| cut(c) == cut(&p.comm));
        let by_exe = p
            .exe
            .as_ref()
            .is_some_and(|e| self.cfg.deny_exe.iter().any(|x| x == e));
        let by_uid = self.cfg.deny_uid.contains(&p.uid);
        (by_comm || by_exe || by_uid).then_some(self.errno)
    }

    /// Does the policy restrict this pid at all (listed, or its uid rate-limited)? Reads /proc.
    pub fn process(&self, pid: i32) -> Option<Process> {
        Process::read(pid, !self.cfg.deny_exe.is_empty())
    }

    /// Are some processes listed (then every event's process is looked up)?
    pub fn has_lists(&self) -> bool {
        !self.cfg.deny_comm.is_empty()
            || !self.cfg.deny_exe.is_empty()
            || !self.cfg.deny_uid.is_empty()
    }

    pub fn rate_limited(&self) -> bool {
        self.cfg.uid_fetch_rate.is_some_and(|r| r > 0.0)
    }

    /// Take one fetch from `uid`'s bucket at `now`: false when it is empty.
    pub fn take_fetch(&self, uid: u32, now: Instant) -> bool {
        let Some(rate) = self.cfg.uid_fetch_rate.filter(|r| *r > 0.0) else {
            return true;
        };
        let burst = self.cfg.uid_fetch_burst.unwrap_or(rate).max(1.0);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 4096 {
            // Full buckets are the same as no bucket.
            buckets.retain(|_, b| now.saturating_duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(uid).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The decision for an access by `p` that would fetch: None (fetch) or why it is denied.
    /// Takes a token from `p`'s uid when it is rate-limited.
    pub fn decide(&self, p: &Process, now: Instant) -> Option<Denial> {
        if let Some(errno) = self.listed(p) {
            return Some(Denial::Listed(errno));
        }
        (!self.take_fetch(p.uid, now)).then_some(Denial::Rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn proc(comm: &str, exe: &str, uid: u32) -> Process {
        Process {
            comm: comm.into(),
            exe: Some(exe.into()),
            uid,
        }
    }

    #[test]
    fn inactive_policy_is_none() {
        assert!(Policy::new(&PolicyConfig::default()).unwrap().is_none());
        let zero = PolicyConfig {
            uid_fetch_rate: Some(0.0),
            ..Default::default()
        };
        assert!(Policy::new(&zero).unwrap().is_none());
    }

    #[test]
    fn lists_match_comm_exe_and_uid() {
        let p = Policy::new(&PolicyConfig {
            deny_comm: vec!["updatedb".into(), "a-very-long-scanner-name".into()],
            deny_exe: vec!["/usr/bin/clamscan".into()],
            deny_uid: vec![1234],
            deny_errno: Some("eagain".into()),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        let now = Instant::now();
        let denied = Some(Denial::Listed(DenyErrno::Again));
        assert_eq!(p.decide(&proc("updatedb", "/x/cat", 0), now), denied);
        // The kernel's comm is the first 15 bytes.
        assert_eq!(p.decide(&proc("a-very-long-sca", "/x", 0), now), denied);
        assert_eq!(p.decide(&proc("cat", "/usr/bin/clamscan", 0), now), denied);
        assert_eq!(p.decide(&proc("cat", "/bin/cat", 1234), now), denied);
        assert_eq!(p.decide(&proc("cat", "/bin/cat", 1000), now), None);
        assert_eq!(p.decide(&proc("updatedb.sh", "/bin/sh", 1000), now), None);
    }

    #[test]
    fn default_errno_is_eperm_and_bad_values_are_refused() {
        let p = Policy::new(&PolicyConfig {
            deny_uid: vec![7],
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert_eq!(p.listed(&proc("x", "/x", 7)), Some(DenyErrno::Perm));
        let bad = |cfg: PolicyConfig| Policy::new(&cfg).err().unwrap_or_default();
        let e = bad(PolicyConfig {
            deny_errno: Some("EACCES".into()),
            ..Default::default()
        });
        assert!(e.contains("EACCES") && e.contains("EPERM"), "{e}");
        let e = bad(PolicyConfig {
            uid_fetch_rate: Some(-1.0),
            ..Default::default()
        });
        assert!(e.contains("uid_fetch_rate"), "{e}");
        let e = bad(PolicyConfig {
            deny_comm: vec!["/usr/bin/updatedb".into()],
            ..Default::default()
        });
        assert!(e.contains("deny_exe"), "{e}");
    }

    #[test]
    fn the_token_bucket_allows_the_burst_then_the_rate() {
        let p = Policy::new(&PolicyConfig {
            uid_fetch_rate: Some(10.0),
            uid_fetch_burst: Some(3.0),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        let t0 = Instant::now();
        let taken = (0..5).filter(|_| p.take_fetch(1, t0)).count();
        assert_eq!(taken, 3, "the burst");
        // Another uid has its own bucket.
        assert!(p.take_fetch(2, t0));
        // 10 a second: one more after 100 ms, not before.
        assert!(!p.take_fetch(1, t0 + Duration::from_millis(50)));
        assert!(p.take_fetch(1, t0 + Duration::from_millis(160)));
        assert!(!p.take_fetch(1, t0 + Duration::from_millis(170)));
        // A long pause refills to the burst only.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| p.take_fetch(1, later)).count(), 3);
        assert_eq!(
            p.decide(&proc("cat", "/bin/cat", 1), later),
            Some(Denial::Rate)
        );
    }

    #[test]
    fn euid_is_read_from_status() {
        let status = "Name:\tcat\nUid:\t1000\t1001\t1000\t1001\nGid:\t0\t0\t0\t0\n";
        assert_eq!(status_euid(status), Some(1001));
        assert_eq!(status_euid("Name: x\n"), None);
        let me = Process::read(std::process::id() as i32, true).unwrap();
        assert_eq!(me.uid, unsafe_free_euid());
        assert!(me.exe.is_some());
    }

    fn unsafe_free_euid() -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").unwrap().uid()
    }
}
