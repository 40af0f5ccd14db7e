//! `hsm stats`: the daemon's figures for a person, or as JSON. Asked of the running daemon over
//! its control socket (see `control`), because the figures live there: the counters in memory
//! the supervisor and the worker share, the files fetched most in the worker's engine. The
//! worker serves the socket, so it answers ([`gather`]); the command prints ([`run`]).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::control::{Client, Done, Op};
use crate::engine::Engine;
use crate::metrics::{backend_label, render_stats, Stats};

/// How many of the files fetched most are sent (the command shows `--top` of them).
pub const TOP_SENT: usize = 50;

/// How old the present bytes may be: walking the store's records costs a read of every file's
/// records, so one walk serves the requests of a minute.
const PRESENT_FOR: Duration = Duration::from_secs(60);

/// The last walk: when, present bytes, total bytes.
static PRESENT: Mutex<Option<(Instant, u64, u64)>> = Mutex::new(None);

/// The figures, in the daemon: `tree` is the store's tree through its private view.
pub fn gather(engine: &Engine, tree: BorrowedFd<'_>) -> Stats {
    let source = engine.source();
    let (present_bytes, total_bytes) = present(engine, tree);
    Stats {
        backend: backend_label(&source),
        source,
        counters: engine.metrics.snapshot(),
        latency: engine.metrics.latency(),
        present_bytes,
        total_bytes,
        top_files: engine.top_files.top(TOP_SENT),
    }
}

/// Present and total bytes of the store's files, from a walk at most [`PRESENT_FOR`] old. The
/// walk reads the records, so what was filled is recorded first (as `hsm hydrate` does).
fn present(engine: &Engine, tree: BorrowedFd<'_>) -> (u64, u64) {
    let mut last = PRESENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, present, total)) = *last {
        if at.elapsed() < PRESENT_FOR {
            return (present, total);
        }
    }
    engine.flush(true);
    // The trailing `.` resolves the fd's link: the walk starts at the directory itself.
    let path = PathBuf::from(format!("/proc/self/fd/{}/.", tree.as_raw_fd()));
    // Files that cannot be read are left out of the totals (`hsm status` names them).
    let (present, total) = match crate::status::scan(&[path], |_| {}) {
        Ok(scan) => (scan.totals.present_bytes, scan.totals.total_bytes),
        Err(_) => (0, 0),
    };
    *last = Some((Instant::now(), present, total));
    (present, total)
}

/// `hsm stats PATH`: PATH is the store, its mount point, or any path under either.
pub fn run(path: &Path, json: bool, top: usize) -> anyhow::Result<()> {
    let tree = if crate::status::is_store_root(path) {
        path.join("tree")
    } else {
        path.to_path_buf()
    };
    let Some((mut client, _)) = Client::find(&tree)? else {
        bail!(
            "no hsm serve serves {}: stats come from a running daemon (the counters of the last \
             run are in STORE/.hsm/metrics.json)",
            path.display()
        );
    };
    let reply = client
        .call(Op::Stats, b"")
        .context("cannot ask the daemon for its figures")?;
    let mut stats = match reply {
        Ok(Done::Stats(stats)) => stats,
        Ok(other) => bail!("the daemon answered {other:?}: is it an older hsm? restart it"),
        Err(e) => bail!("the daemon refused: {e}"),
    };
    stats.top_files.truncate(top);
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        print!("{}", render_stats(&stats));
    }
    Ok(())
}
