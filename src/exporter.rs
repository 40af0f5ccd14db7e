//! `hsm serve --metrics ADDR:PORT`: the counters as Prometheus (OpenMetrics) text at
//! `/metrics`. Served by the supervisor, on threads of its own, so that a scrape never waits on
//! the event loop and the endpoint outlives worker restarts; it reads the counters the
//! supervisor and the worker share (see `metrics`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use tracing::{info, warn};

use crate::metrics::{prometheus_text, Metrics};
use crate::sys::shm::Shared;

/// How often the present-bytes gauge is recomputed (a walk of the store's records).
pub const PRESENT_EVERY: Duration = Duration::from_secs(60);

/// A non-loopback address is refused unless the config allows it (`metrics_allow_remote`).
pub fn check_addr(addr: SocketAddr, allow_remote: bool) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() && !allow_remote {
        bail!(
            "--metrics {addr}: not a loopback address; the counters (file counts, sizes, \
             rates) are served to anyone who can reach it. Set metrics_allow_remote = true in \
             the config file to allow it"
        );
    }
    Ok(())
}

/// Start serving `/metrics` at `addr` (bound before this returns: a busy port is an error at
/// start). `tree` is the store's tree through the daemon's view, walked for the present bytes.
pub fn start(
    addr: SocketAddr,
    metrics: &Shared<Metrics>,
    backend: &'static str,
    tree: PathBuf,
) -> anyhow::Result<()> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot serve metrics at {addr}"))?;
    // Mappings of their own, for threads that live as long as the process.
    let map = || -> anyhow::Result<Shared<Metrics>> {
        let fd = metrics.fd().try_clone_to_owned()?;
        Ok(Shared::<Metrics>::from_fd(fd)?)
    };
    let for_http = map()?;
    let for_walk = map()?;
    info!(%addr, "serving metrics at http://{addr}/metrics");
    std::thread::Builder::new()
        .name("hsm-metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let path = request.url().split('?').next().unwrap_or("");
                let response = if path == "/metrics" && *request.method() == tiny_http::Method::Get
                {
                    let body = prometheus_text(&for_http.snapshot(), backend);
                    let ctype = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                    )
                    .ok();
                    let mut r = tiny_http::Response::from_string(body);
                    if let Some(h) = ctype {
                        r.add_header(h);
                    }
                    r
                } else {
                    tiny_http::Response::from_string("not found: try /metrics\n")
                        .with_status_code(404)
                };
                if let Err(e) = request.respond(response) {
                    warn!("metrics: answering a scrape failed: {e}");
                }
            }
        })?;
    std::thread::Builder::new()
        .name("hsm-present".into())
        .spawn(move || loop {
            // Errors on single files are left out of the total (status prints them).
            if let Ok(scan) = crate::status::scan(std::slice::from_ref(&tree), |_| {}) {
                for_walk.present_bytes.store(
                    scan.totals.present_bytes,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            std::thread::sleep(PRESENT_EVERY);
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_unless_allowed() {
        let ok = |a: &str, allow| check_addr(a.parse().unwrap(), allow).is_ok();
        assert!(ok("127.0.0.1:9100", false));
        assert!(ok("[::1]:9100", false));
        assert!(!ok("0.0.0.0:9100", false));
        assert!(!ok("192.0.2.1:9100", false));
        assert!(ok("0.0.0.0:9100", true));
        let e = check_addr("0.0.0.0:1".parse().unwrap(), false).unwrap_err();
        assert!(e.to_string().contains("metrics_allow_remote"), "{e}");
    }
}
