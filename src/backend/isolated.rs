//! Remote backends run in a separate, unprivileged process.
//!
//! The code that talks to the network and parses what a server sends (HTTP, TLS, XML listings) is
//! the part most exposed to hostile input, and the daemon runs as root. So for `s3://`, `gs://`,
//! `az://` and `http(s)://` sources the worker does not call the backend itself: it starts
//! `hsm serve-fetcher`, which drops to an unprivileged user and answers range requests over a
//! socket. A compromised fetcher can return wrong bytes (which the per-chunk digests and size
//! checks catch) and nothing more: it holds no fd on the store.
//!
//! Every thread of the fetcher is unprivileged, because the drop happens before any other
//! thread exists: credentials, capabilities, `no_new_privs` and seccomp filters are per thread,
//! and threads created later inherit them. So the fetcher reads, as root and without threads,
//! only what root alone may read (the fetch user's ids, the S3 shared credentials file, a GCS
//! key file: `backend::prepare`); then drops to the user (no groups, every capability set empty, no new
//! privileges, not dumpable: `sys::privilege`), installs its seccomp filter (`sys::seccomp`), and
//! only then builds the backend, whose async runtime starts the threads that do the I/O.
//! Credentials fetched later (web identity token files, instance roles) are read as the fetch
//! user.
//!
//! Credentials are re-read the same way: the fetcher can no longer read what only root may, so
//! on SIGHUP the worker (root) re-reads the static S3 keys and hands them over this socket
//! ([`CredentialReload`]); the fetcher swaps them into its client in place (`s3::RotatingKeys`),
//! and reads in flight go on.
//!
//! Framing on a `SOCK_STREAM` socket pair, little-endian:
//! request `len u32 | id u64 | offset u64 | want u32 | SourceRecord (postcard)`,
//! response `len u32 | id u64 | status u8 | payload` (the bytes, or an error message);
//! new keys `len u32 | RELOAD_ID | StaticKeys (postcard)`, answered `len u32 | RELOAD_ID |
//! status u8 | message`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tracing::{error, warn};

use super::{Backend, FetchError};
use crate::record::SourceRecord;
use crate::sys::{ipc, privilege, seccomp};

const STATUS_OK: u8 = 0;
const STATUS_NOT_FOUND: u8 = 1;
const STATUS_CHANGED: u8 = 2;
const STATUS_SHORT: u8 = 3;
const STATUS_ESCAPE: u8 = 4;
const STATUS_IO: u8 = 5;
const STATUS_REMOTE: u8 = 6;
const STATUS_UNTRUSTED: u8 = 7;
/// The id of a frame that carries new keys, and of its answer (requests count up from 1).
const RELOAD_ID: u64 = u64::MAX;
/// Largest frame accepted either way: a chunk plus headers, with room to spare.
const MAX_FRAME: usize = 256 << 20;

fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame too large"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(body)
}

fn read_frame(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "oversized frame",
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

fn encode_error(e: &FetchError) -> (u8, Vec<u8>) {
    match e {
        FetchError::NotFound => (STATUS_NOT_FOUND, Vec::new()),
        FetchError::Changed(m) => (STATUS_CHANGED, m.as_bytes().to_vec()),
        FetchError::Short { got, .. } => (STATUS_SHORT, (*got as u64).to_le_bytes().to_vec()),
        FetchError::Escape => (STATUS_ESCAPE, Vec::new()),
        // The errno first (0: none), so that the reader is told EAGAIN for a timeout, not EIO.
        FetchError::Io(e) => {
            let mut body = super::errno_of(e).to_le_bytes().to_vec();
            body.extend_from_slice(e.to_string().as_bytes());
            (STATUS_IO, body)
        }
        FetchError::Remote(m) => (STATUS_REMOTE, m.as_bytes().to_vec()),
        FetchError::Untrusted(m) => (STATUS_UNTRUSTED, m.as_bytes().to_vec()),
    }
}

fn decode_reply(
    status: u8,
    payload: Vec<u8>,
    offset: u64,
    want: usize,
) -> Result<Vec<u8>, FetchError> {
    let text = || String::from_utf8_lossy(&payload).into_owned();
    match status {
        STATUS_OK if payload.len() == want => Ok(payload),
        STATUS_OK => Err(FetchError::Short {
            offset,
            want,
            got: payload.len(),
        }),
        STATUS_NOT_FOUND => Err(FetchError::NotFound),
        STATUS_CHANGED => Err(FetchError::Changed(text())),
        STATUS_SHORT => Err(FetchError::Short {
            offset,
            want,
            got: payload
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes) as usize,
        }),
        STATUS_ESCAPE => Err(FetchError::Escape),
        STATUS_IO => {
            let (errno, message) = match payload.split_first_chunk::<4>() {
                Some((n, rest)) => (i32::from_le_bytes(*n), String::from_utf8_lossy(rest)),
                None => (0, String::from_utf8_lossy(&payload[..])),
            };
            Err(FetchError::Io(match errno {
                0 => io::Error::other(message.into_owned()),
                n => io::Error::from_raw_os_error(n),
            }))
        }
        STATUS_REMOTE => Err(FetchError::Remote(text())),
        STATUS_UNTRUSTED => Err(FetchError::Untrusted(text())),
        _ => Err(FetchError::Remote(
            "malformed reply from the fetcher".into(),
        )),
    }
}

/// Replies not yet claimed, by request id: `(status, payload)`.
type Waiters = Mutex<HashMap<u64, crossbeam_channel::Sender<(u8, Vec<u8>)>>>;

/// The worker's side: a `Backend` whose reads are done by the fetcher process.
pub struct IsolatedBackend {
    describe: String,
    writer: Mutex<UnixStream>,
    waiters: Arc<Waiters>,
    next_id: AtomicU64,
}

impl IsolatedBackend {
    /// `sock` is connected to a running `hsm serve-fetcher`. If the fetcher dies, this worker
    /// exits: the supervisor starts a new worker (and with it a new fetcher) and resends the
    /// events that were waiting.
    pub fn new(sock: OwnedFd) -> anyhow::Result<IsolatedBackend> {
        let stream = UnixStream::from(sock);
        let mut reader = stream.try_clone()?;
        // The fetcher's first frame says whether its backend works (credentials, reachability).
        let hello = read_frame(&mut reader)?
            .filter(|f| f.len() >= 9)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "the fetcher process exited before it was ready (its error is above)"
                )
            })?;
        let text = String::from_utf8_lossy(&hello[9..]).into_owned();
        if hello[8] != STATUS_OK {
            anyhow::bail!("{text}");
        }
        let describe = text;
        let waiters: Arc<Waiters> = Arc::new(Mutex::new(HashMap::new()));
        let w = waiters.clone();
        std::thread::spawn(move || loop {
            let frame = match read_frame(&mut reader) {
                Ok(Some(f)) if f.len() >= 9 => f,
                Ok(_) | Err(_) => {
                    error!("the fetcher process is gone; this worker exits and is replaced");
                    std::process::exit(3);
                }
            };
            let id = u64::from_le_bytes(frame[..8].try_into().unwrap_or_default());
            let tx = w.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            if let Some(tx) = tx {
                let _ = tx.send((frame[8], frame[9..].to_vec()));
            }
        });
        Ok(IsolatedBackend {
            describe,
            writer: Mutex::new(stream),
            waiters,
            next_id: AtomicU64::new(1),
        })
    }
}

impl IsolatedBackend {
    /// Hand `keys` to the fetcher; its answer.
    fn send_keys(&self, keys: &super::s3::StaticKeys) -> anyhow::Result<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(RELOAD_ID, tx);
        let mut body = RELOAD_ID.to_le_bytes().to_vec();
        body.extend_from_slice(&postcard::to_allocvec(keys)?);
        write_frame(
            &mut *self.writer.lock().unwrap_or_else(|p| p.into_inner()),
            &body,
        )
        .context("cannot reach the fetcher")?;
        let (status, message) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .context("the fetcher did not answer")?;
        if status != STATUS_OK {
            anyhow::bail!(
                "the fetcher refused them: {}",
                String::from_utf8_lossy(&message)
            );
        }
        Ok(())
    }
}

/// Re-reads an S3 source's keys as root and hands them to the fetcher: on SIGHUP, and
/// when the credentials file holds other keys than were last handed over (a tool that renews
/// session keys before they expire rewrites it).
pub struct CredentialReload {
    fetcher: Arc<IsolatedBackend>,
    /// The keys the fetcher has (as read at start: the fetcher read the same a moment before).
    last: Mutex<Option<super::s3::StaticKeys>>,
}

impl CredentialReload {
    pub fn new(fetcher: Arc<IsolatedBackend>) -> CredentialReload {
        CredentialReload {
            fetcher,
            last: Mutex::new(super::s3::static_keys().ok().flatten()),
        }
    }

    /// What was done, for the log; an error leaves the keys in use as they were.
    pub fn reload(&self) -> anyhow::Result<&'static str> {
        match super::s3::static_keys()? {
            Some(keys) => {
                self.fetcher.send_keys(&keys)?;
                *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(keys);
                Ok("the S3 keys were re-read and are used from now on")
            }
            None => Ok(
                "no static S3 keys (environment, credentials file): web identity, \
                 container or instance credentials are refreshed by the client itself",
            ),
        }
    }

    /// Hand over the static keys if they are not those last handed over: `Ok(true)` if it did.
    /// Keys that cannot be read now (a file being rewritten) are left for the next look.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let Ok(Some(keys)) = super::s3::static_keys() else {
            return Ok(false);
        };
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref() == Some(&keys) {
            return Ok(false);
        }
        self.fetcher.send_keys(&keys)?;
        *last = Some(keys);
        Ok(true)
    }
}

impl Backend for IsolatedBackend {
    fn read_range(
        &self,
        obj: &SourceRecord,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FetchError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let record = postcard::to_allocvec(obj).map_err(|e| FetchError::Io(io::Error::other(e)))?;
        let mut body = Vec::with_capacity(20 + record.len());
        body.extend_from_slice(&id.to_le_bytes());
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&(buf.len() as u32).to_le_bytes());
        body.extend_from_slice(&record);
        let sent = write_frame(
            &mut *self.writer.lock().unwrap_or_else(|p| p.into_inner()),
            &body,
        );
        if let Err(e) = sent {
            self.waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(FetchError::Io(e));
        }
        // No deadline here: the engine's fetch pool bounds how long a reader waits.
        let (status, payload) = rx
            .recv()
            .map_err(|_| FetchError::Remote("the fetcher process is gone".into()))?;
        let bytes = decode_reply(status, payload, offset, buf.len())?;
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

/// `hsm serve-fetcher`: the socket to the worker is fd 3 (see `worker::open_backend`). Any
/// other fd inherited is closed first, so that nothing the worker's parents left open reaches
/// the process most exposed to the network.
pub fn fetcher_main(url: &str, user: &str) -> anyhow::Result<()> {
    let sock = ipc::claim_inherited(3).context("the fetcher was started without its socket")?;
    ipc::close_inherited_from(4).context("cannot close inherited fds")?;
    run_fetcher(url, sock, user)
}

/// The fetcher process: read the source's configuration as root, drop privileges while this is
/// the only thread, restrict its syscalls, and only then build the backend (its async runtime
/// starts threads, which inherit all of it) and serve requests until the worker closes the
/// socket. See the module doc.
pub fn run_fetcher(url: &str, sock: OwnedFd, user: &str) -> anyhow::Result<()> {
    let mut stream = UnixStream::from(sock);
    // A SIGHUP is for the daemon (its worker re-reads the credentials and sends them here):
    // one sent to the whole process group must not end this process.
    signal_hook::flag::register(
        signal_hook::consts::SIGHUP,
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    )?;
    let mut keys = None;
    let opened = (|| {
        let ids = privilege::lookup(user).with_context(|| format!("no fetch user {user:?}"))?;
        let prepared = super::prepare(url)?;
        if let super::Prepared::S3(p) = &prepared {
            keys = p.keys();
        }
        privilege::drop_to(ids)
            .with_context(|| format!("cannot drop privileges to user {user:?}"))?;
        if !seccomp::restrict_fetcher().context("cannot restrict the fetcher's syscalls")? {
            warn!("no seccomp filter on this system: the fetcher runs without one");
        }
        let b = prepared.open()?;
        b.check()
            .with_context(|| format!("the source {} cannot be used", b.describe()))?;
        Ok(b)
    })();
    let mut hello = 0u64.to_le_bytes().to_vec();
    let backend = match opened {
        Ok(b) => {
            hello.push(STATUS_OK);
            hello.extend_from_slice(b.describe().as_bytes());
            write_frame(&mut stream, &hello)?;
            b
        }
        Err(e) => {
            hello.push(STATUS_REMOTE);
            hello.extend_from_slice(format!("{e:#}").as_bytes());
            let _ = write_frame(&mut stream, &hello);
            return Err(e);
        }
    };
    let mut reader = stream.try_clone()?;
    let writer = Arc::new(Mutex::new(stream));
    // As many threads as the worker's fetch pools have requests in flight: a reader's request
    // never queues here behind an access list's (see `engine::fill`).
    let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(64);
    for _ in 0..crate::engine::FETCHES_IN_FLIGHT {
        let rx = rx.clone();
        let backend = backend.clone();
        let writer = writer.clone();
        std::thread::spawn(move || {
            for req in rx {
                let reply = serve_request(&*backend, &req);
                if write_frame(
                    &mut *writer.lock().unwrap_or_else(|p| p.into_inner()),
                    &reply,
                )
                .is_err()
                {
                    return;
                }
            }
        });
    }
    while let Some(frame) = read_frame(&mut reader)? {
        if frame.get(..8) == Some(&RELOAD_ID.to_le_bytes()[..]) {
            let mut reply = RELOAD_ID.to_le_bytes().to_vec();
            match (&keys, postcard::from_bytes(&frame[8..])) {
                (Some(k), Ok(new)) => {
                    k.set(&new);
                    reply.push(STATUS_OK);
                }
                (None, _) => {
                    reply.push(STATUS_REMOTE);
                    reply.extend_from_slice(b"this source was opened without static keys");
                }
                (_, Err(e)) => {
                    reply.push(STATUS_REMOTE);
                    reply.extend_from_slice(format!("malformed keys: {e}").as_bytes());
                }
            }
            write_frame(
                &mut *writer.lock().unwrap_or_else(|p| p.into_inner()),
                &reply,
            )?;
            continue;
        }
        if tx.send(frame).is_err() {
            break;
        }
    }
    Ok(())
}

fn serve_request(backend: &dyn Backend, req: &[u8]) -> Vec<u8> {
    let id = req
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes);
    let mut reply = id.to_le_bytes().to_vec();
    let parsed = (|| {
        let offset = u64::from_le_bytes(req.get(8..16)?.try_into().ok()?);
        let want = u32::from_le_bytes(req.get(16..20)?.try_into().ok()?) as usize;
        let obj: SourceRecord = postcard::from_bytes(req.get(20..)?).ok()?;
        (want as u64 <= obj.chunk_size as u64 * 2).then_some((offset, want, obj))
    })();
    let Some((offset, want, obj)) = parsed else {
        reply.push(STATUS_REMOTE);
        reply.extend_from_slice(b"malformed request");
        return reply;
    };
    let mut buf = vec![0u8; want];
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        backend.read_range(&obj, offset, &mut buf)
    }))
    .unwrap_or_else(|_| Err(FetchError::Remote("backend read panicked".into())));
    match result {
        Ok(()) => {
            reply.push(STATUS_OK);
            reply.extend_from_slice(&buf);
        }
        Err(e) => {
            let (status, payload) = encode_error(&e);
            reply.push(status);
            reply.extend_from_slice(&payload);
        }
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_cross_the_socket_intact() {
        for e in [
            FetchError::NotFound,
            FetchError::Changed("etag".into()),
            FetchError::Escape,
            FetchError::Remote("503".into()),
            FetchError::Untrusted("UnknownIssuer".into()),
        ] {
            let (status, payload) = encode_error(&e);
            let back = decode_reply(status, payload, 0, 10).unwrap_err();
            assert_eq!(back.to_string(), e.to_string());
        }
        // An I/O error keeps its errno across the socket.
        for n in [libc::EAGAIN, libc::ETIMEDOUT, libc::ENOSPC] {
            let (status, payload) = encode_error(&FetchError::Io(io::Error::from_raw_os_error(n)));
            match decode_reply(status, payload, 0, 10).unwrap_err() {
                FetchError::Io(e) => assert_eq!(e.raw_os_error(), Some(n)),
                other => panic!("{other}"),
            }
        }
        assert!(decode_reply(STATUS_OK, vec![1, 2], 0, 3).is_err());
        assert_eq!(
            decode_reply(STATUS_OK, vec![1, 2, 3], 0, 3).unwrap(),
            vec![1, 2, 3]
        );
        assert!(decode_reply(99, vec![], 0, 0).is_err());
    }

    #[test]
    fn malformed_requests_get_an_error_reply() {
        struct Never;
        impl Backend for Never {
            fn read_range(&self, _: &SourceRecord, _: u64, _: &mut [u8]) -> Result<(), FetchError> {
                unreachable!()
            }
            fn describe(&self) -> String {
                String::new()
            }
        }
        let reply = serve_request(&Never, &[1, 2, 3]);
        assert_eq!(reply[8], STATUS_REMOTE);
    }
}
