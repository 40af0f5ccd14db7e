//! The control interface: `hsm hydrate`, `release`, `pin` and `unpin` act through the running
//! daemon when the store is served, so that one process changes the store at a time.
//!
//! A unix stream socket at `STORE/.hsm/control.sock`, one JSON line per request and per reply.
//! Only root may connect (the socket file is 0600), or members of a group named at `hsm serve
//! --control-group` (0660): the peer's credentials are checked again on every connection, as
//! the file's mode alone says nothing once a descriptor is passed on. A request names one file
//! by its path in the tree; clients run several connections for parallel work.
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

/// The socket, in the store's `.hsm`.
pub const SOCKET: &str = "control.sock";
/// Connections served at once; more are refused (a client retries).
const MAX_CONNECTIONS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Hydrate,
    Release,
    Pin,
    Unpin,
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

/// Listen at `meta/control.sock` (`meta`: the store's `.hsm`, through the daemon's view).
pub fn listen(meta: &Path, access: Access) -> anyhow::Result<UnixListener> {
    let path = meta.join(SOCKET);
    // Left by a daemon that died: this process holds the store's lock, so it is stale.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen at {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    let mode = if access.group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(&path, Some(0), Some(gid))?;
    }
    Ok(listener)
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
            if let Err(why) = permitted(&stream, access) {
                warn!("control socket: {why}");
                let _ = reply_line(&mut stream, &Err(why));
                continue;
            }
            if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::Relaxed);
                let _ = reply_line(&mut stream, &Err("too many connections; try again".into()));
                continue;
            }
            let (service, open) = (service.clone(), open.clone());
            std::thread::spawn(move || {
                connection(stream, &*service);
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
                info!(op = ?req.op, path = %String::from_utf8_lossy(&req.path), ?reply, "control request");
                reply
            }
            Err(e) => Err(format!("malformed request: {e}")),
        };
        if reply_line(&mut out, &reply).is_err() {
            return;
        }
    }
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
    /// Connect to the daemon serving `store`; `Ok(None)` when none listens.
    pub fn connect(store: &Path) -> anyhow::Result<Option<Client>> {
        let path = socket_path(store);
        match UnixStream::connect(&path) {
            Ok(s) => Ok(Some(Client {
                writer: s.try_clone()?,
                reader: BufReader::new(s),
            })),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
                ) =>
            {
                Ok(None)
            }
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => anyhow::bail!(
                "permission denied on {}: only root (or the group named at hsm serve \
                 --control-group) may use the daemon",
                path.display()
            ),
            Err(e) => Err(e).with_context(|| format!("cannot connect to {}", path.display())),
        }
    }

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
        Ok(serde_json::from_str(&answer).context("malformed reply from the daemon")?)
    }
}

pub fn socket_path(store: &Path) -> PathBuf {
    store.join(".hsm").join(SOCKET)
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
        std::fs::create_dir_all(dir.join(".hsm")).unwrap();
        let listener = listen(&dir.join(".hsm"), Access::default()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(socket_path(&dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        serve(listener, Arc::new(Echo), Access::default());
        let mut c = Client::connect(&dir).unwrap().unwrap();
        assert_eq!(
            c.call(Op::Hydrate, b"a/b").unwrap(),
            Ok(Done::Hydrated { fetched: 7 })
        );
        let name = [b'x', 0xff, b'y'];
        assert_eq!(
            c.call(Op::Release, &name).unwrap(),
            Ok(Done::Refused {
                reason: "x\u{fffd}y is open".into()
            })
        );
        assert!(c.call(Op::Pin, b"boom").unwrap().is_err());
        // The connection still works after the panic.
        assert_eq!(c.call(Op::Unpin, b"z").unwrap(), Err("no".into()));
        drop(c);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(Client::connect(&dir).unwrap().is_none());
    }

    #[test]
    fn groups_of_this_process_include_its_effective_gid() {
        // SAFETY: plain syscall.
        let gid = unsafe { libc::getegid() };
        assert!(process_groups(std::process::id() as i32).contains(&gid));
    }
}
