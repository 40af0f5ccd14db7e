//! The control interface: `hsm hydrate`, `release`, `pin` and `unpin` act through the running
//! daemon when the store is served, so that one process changes the store at a time; `hsm
//! stats` asks it for its figures (the worker serves the socket: it has the shared counters and
//! the per-file ones).
//!
//! An abstract unix stream socket named after the store's tree (`hsm-control:DEV:INO`, the
//! tree's device and inode): a user who may not look into STORE (it is root's alone) still finds
//! it from a path under the mount point, whose root is that very directory. One JSON line per
//! request and per reply. An abstract socket has no file mode: every connection's peer
//! credentials are checked, and only root, or members of a group named at `hsm serve
//! --control-group`, are served. A request names one file by its path in the tree; clients run
//! several connections for parallel work.
//!
//! When no daemon serves the store, the same operations run in the calling process
//! ([`Service`] has both forms), under the store's lock, which `hsm serve` holds while it runs:
//! the two never work on one store at once.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Connections served at once; more are refused (a client retries).
const MAX_CONNECTIONS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Hydrate,
    Release,
    Pin,
    Unpin,
    /// Write the records of what was filled (after a hydrate): `hsm status` says complete.
    Flush,
    /// The daemon's figures (`hsm stats`); the path is not used.
    Stats,
    /// `hsm sync`: apply a listing of the source (the path field holds the request, see
    /// `sync::serve_request`).
    Sync,
    /// Write the access list being recorded now (`hsm record --flush`, see `access_list`).
    WriteAccessList,
    /// Fetch an access list ahead; the request's `path` carries the list's text.
    PrefetchList,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub op: Op,
    /// The file's path in the tree (bytes: names need not be UTF-8).
    pub path: Vec<u8>,
}

/// What one request did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Done {
    /// Complete now; `fetched` bytes were fetched for it.
    Hydrated {
        fetched: u64,
    },
    /// Present bytes given back.
    Released {
        bytes: u64,
    },
    /// Nothing was present.
    AlreadyStub,
    /// Not done, the file untouched, and why.
    Refused {
        reason: String,
    },
    Pinned {
        fetched: u64,
    },
    Unpinned,
    /// Records written.
    Flushed,
    /// The figures of `hsm stats`.
    Stats(Box<crate::metrics::Stats>),
    /// What a sync did.
    Synced {
        report: crate::sync::SyncReport,
    },
    /// The access list was written, with this many files.
    AccessListWritten {
        files: u64,
    },
    ListPrefetched(crate::access_list::Summary),
}

pub type Reply = Result<Done, String>;

/// Carries out requests: the daemon's worker, or the calling process when no daemon runs.
pub trait Service: Send + Sync {
    fn run(&self, op: Op, path: &[u8]) -> Reply;
}

/// Who may use the socket besides root.
#[derive(Clone, Copy, Debug, Default)]
pub struct Access {
    pub group: Option<u32>,
}

/// The socket's name for the tree with this device and inode.
fn socket_name(dev: u64, ino: u64) -> String {
    format!("hsm-control:{dev}:{ino}")
}

fn abstract_addr(name: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

/// Listen for the store whose tree is `tree` (through the daemon's view: the same inode).
pub fn listen(tree: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(tree).with_context(|| format!("cannot stat {}", tree.display()))?;
    let name = socket_name(md.dev(), md.ino());
    UnixListener::bind_addr(&abstract_addr(&name)?).with_context(|| {
        format!("cannot listen on the control socket @{name} (another daemon of this store?)")
    })
}

/// Whether the process at the other end may use the socket: root, or a member of the group.
fn permitted(stream: &UnixStream, access: Access) -> Result<(), String> {
    let (pid, uid) = crate::sys::ipc::peer_credentials(stream.as_fd())
        .map_err(|e| format!("cannot read the caller's credentials: {e}"))?;
    if uid == 0 {
        return Ok(());
    }
    if let Some(gid) = access.group {
        if process_groups(pid).contains(&gid) {
            return Ok(());
        }
    }
    Err(format!(
        "permission denied: uid {uid} is not root{}",
        if access.group.is_some() {
            " nor in the control group"
        } else {
            " (hsm serve --control-group allows a group)"
        }
    ))
}

/// The effective and supplementary groups of `pid`.
fn process_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    let mut groups = Vec::new();
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("Gid:") {
            // Real, effective, saved, filesystem: the effective one counts.
            groups.extend(
                rest.split_whitespace()
                    .nth(1)
                    .and_then(|g| g.parse::<u32>().ok()),
            );
        } else if let Some(rest) = line.strip_prefix("Groups:") {
            groups.extend(
                rest.split_whitespace()
                    .filter_map(|g| g.parse::<u32>().ok()),
            );
        }
    }
    groups
}

/// Serve requests on a thread per connection, until the process exits.
pub fn serve(listener: UnixListener, service: Arc<dyn Service>, access: Access) {
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::Relaxed);
                let _ = reply_line(&mut stream, &Err("too many connections; try again".into()));
                continue;
            }
            let (service, open) = (service.clone(), open.clone());
            std::thread::spawn(move || {
                match permitted(&stream, access) {
                    Ok(()) => connection(stream, &*service),
                    Err(why) => refuse(stream, why),
                }
                open.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
}

fn connection(stream: UnixStream, service: &dyn Service) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                // A panic fails this request, not the daemon.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    service.run(req.op, &req.path)
                }));
                let reply =
                    run.unwrap_or_else(|_| Err("internal error (a bug): see the log".into()));
                if req.op == Op::Stats {
                    // A page of figures: not worth a log line each time someone looks.
                    tracing::debug!("control request: stats");
                } else {
                    info!(op = ?req.op, path = %String::from_utf8_lossy(&req.path), ?reply, "control request");
                }
                reply
            }
            Err(e) => Err(format!("malformed request: {e}")),
        };
        if reply_line(&mut out, &reply).is_err() {
            return;
        }
    }
}

/// Answer the caller's first request with why it is not served, then hang up.
fn refuse(stream: UnixStream, why: String) {
    warn!("control socket: {why}");
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut line = String::new();
    let _ = BufReader::new(stream).read_line(&mut line);
    let _ = reply_line(&mut out, &Err(why));
}

fn reply_line(out: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)
}

/// A connection to a running daemon.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connect to the daemon serving the tree that holds `path` (under its mount point, or
    /// under STORE/tree); with `path`'s place in that tree. `Ok(None)` when no daemon serves it.
    pub fn find(path: &Path) -> anyhow::Result<Option<(Client, PathBuf)>> {
        use std::os::unix::fs::MetadataExt;
        let abs = path
            .canonicalize()
            .with_context(|| format!("cannot find {}", path.display()))?;
        for dir in abs.ancestors() {
            let Ok(md) = std::fs::metadata(dir) else {
                continue;
            };
            if !md.is_dir() {
                continue;
            }
            let name = socket_name(md.dev(), md.ino());
            if let Some(client) = Client::connect(&name)? {
                let rel = abs.strip_prefix(dir).unwrap_or(Path::new("")).to_path_buf();
                return Ok(Some((client, rel)));
            }
        }
        Ok(None)
    }

    fn connect(name: &str) -> anyhow::Result<Option<Client>> {
        match UnixStream::connect_addr(&abstract_addr(name)?) {
            Ok(s) => {
                // Any process may bind an abstract name: only root's daemon is believed (or, in
                // a test run by a user, that user's own).
                let (pid, uid) = crate::sys::ipc::peer_credentials(s.as_fd())?;
                if uid != 0 && uid != crate::sys::users::effective_uid() {
                    anyhow::bail!(
                        "@{name} is held by pid {pid} of uid {uid}, not by hsm serve (root): \
                         refusing to use it"
                    );
                }
                Ok(Some(Client {
                    writer: s.try_clone()?,
                    reader: BufReader::new(s),
                }))
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot connect to @{name}")),
        }
    }

    /// The daemon's socket name: the same for every path of one served tree.
    pub fn name(&self) -> String {
        use std::os::linux::net::SocketAddrExt;
        self.writer
            .peer_addr()
            .ok()
            .and_then(|a| {
                a.as_abstract_name()
                    .map(|n| String::from_utf8_lossy(n).into_owned())
            })
            .unwrap_or_default()
    }

    /// Another connection to the same daemon.
    pub fn again(&self) -> anyhow::Result<Client> {
        let addr = self.writer.peer_addr()?;
        let s = UnixStream::connect_addr(&addr)?;
        Ok(Client {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// Carry out one request. A refusal by the daemon (not permitted) is an error.
    pub fn call(&mut self, op: Op, path: &[u8]) -> anyhow::Result<Reply> {
        let mut line = serde_json::to_vec(&Request {
            op,
            path: path.to_vec(),
        })?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            anyhow::bail!("the daemon closed the connection (it stopped, or its worker restarted)");
        }
        serde_json::from_str(&answer).context("malformed reply from the daemon")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl Service for Echo {
        fn run(&self, op: Op, path: &[u8]) -> Reply {
            match (op, path) {
                (_, b"boom") => panic!("a bug"),
                (Op::Release, p) => Ok(Done::Refused {
                    reason: format!("{} is open", String::from_utf8_lossy(p)),
                }),
                (Op::Hydrate, _) => Ok(Done::Hydrated { fetched: 7 }),
                _ => Err("no".into()),
            }
        }
    }

    #[test]
    fn requests_round_trip_and_a_panic_fails_only_its_request() {
        let dir = std::env::temp_dir().join(format!("hsm-control-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/file"), b"x").unwrap();
        assert!(Client::find(&dir.join("sub/file")).unwrap().is_none());
        let listener = listen(&dir).unwrap();
        assert!(listen(&dir).is_err(), "one daemon per tree");
        serve(listener, Arc::new(Echo), Access::default());
        let (mut c, rel) = Client::find(&dir.join("sub/file")).unwrap().unwrap();
        assert_eq!(rel, Path::new("sub/file"));
        assert_eq!(
            c.call(Op::Hydrate, b"a/b").unwrap(),
            Ok(Done::Hydrated { fetched: 7 })
        );
        let name = [b'x', 0xff, b'y'];
        let mut c2 = c.again().unwrap();
        assert_eq!(
            c2.call(Op::Release, &name).unwrap(),
            Ok(Done::Refused {
                reason: "x\u{fffd}y is open".into()
            })
        );
        assert!(c.call(Op::Pin, b"boom").unwrap().is_err());
        // The connection still works after the panic.
        assert_eq!(c.call(Op::Unpin, b"z").unwrap(), Err("no".into()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn groups_of_this_process_include_its_effective_gid() {
        // A file made by this process has its effective gid.
        use std::os::unix::fs::MetadataExt;
        let probe = std::env::temp_dir().join(format!("hsm-gid-{}", std::process::id()));
        std::fs::write(&probe, b"").unwrap();
        let gid = std::fs::metadata(&probe).unwrap().gid();
        std::fs::remove_file(&probe).unwrap();
        assert!(process_groups(std::process::id() as i32).contains(&gid));
    }
}
