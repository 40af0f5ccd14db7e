//! Fault injection, for tests only: make the worker panic or abort while serving one file, so
//! that the real kernel tests can show what a crashing fetch does to readers (tests/safety.rs).
//!
//! Set `HSM_FAULT_INJECT` in the environment of `hsm serve` (the worker inherits it):
//! - `panic:NAME`: every fill of a file named NAME (the last component of its path) panics on the
//!   thread serving it; the worker catches it and fails that access with EIO.
//! - `abort:NAME`: every fill of a file named NAME aborts the whole worker process, as a crash
//!   the worker cannot catch would; the supervisor restarts it and, if it keeps dying, fails the
//!   waiting accesses with EIO.
//!
//! Read once, when the worker starts. Unset (as in production, where only root sets the
//! daemon's environment) it costs one atomic load per fill and nothing else.

use std::os::fd::BorrowedFd;
use std::sync::OnceLock;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    Panic(String),
    Abort(String),
}

/// The environment variable read by [`init`].
pub const ENV: &str = "HSM_FAULT_INJECT";

static FAULT: OnceLock<Option<Fault>> = OnceLock::new();

impl Fault {
    /// `panic:NAME` or `abort:NAME`; anything else is no fault.
    pub fn parse(spec: &str) -> Option<Fault> {
        let (kind, name) = spec.split_once(':')?;
        if name.is_empty() {
            return None;
        }
        match kind {
            "panic" => Some(Fault::Panic(name.to_string())),
            "abort" => Some(Fault::Abort(name.to_string())),
            _ => None,
        }
    }
}

/// Read `HSM_FAULT_INJECT` (once; later calls change nothing).
pub fn init() {
    FAULT.get_or_init(|| {
        let spec = std::env::var(ENV).ok()?;
        let fault = Fault::parse(&spec);
        match &fault {
            Some(f) => tracing::warn!("fault injection for tests is on: {f:?}"),
            None => tracing::warn!("{ENV}={spec:?} is not panic:NAME or abort:NAME; ignored"),
        }
        fault
    });
}

/// Called where the worker starts a fill for an event on `fd`: panics or aborts if the file is
/// the one named in the fault.
pub fn at_fill(fd: BorrowedFd<'_>) {
    let Some(Some(fault)) = FAULT.get() else {
        return;
    };
    let path = crate::engine::fd_path(fd);
    let name = std::path::Path::new(&path).file_name();
    match fault {
        Fault::Panic(n) if name == Some(n.as_ref()) => {
            panic!("fault injected ({ENV}): panic while serving {path}")
        }
        Fault::Abort(n) if name == Some(n.as_ref()) => {
            tracing::error!("fault injected ({ENV}): aborting while serving {path}");
            std::process::abort()
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_the_two_forms() {
        assert_eq!(Fault::parse("panic:a"), Some(Fault::Panic("a".into())));
        assert_eq!(Fault::parse("abort:b:c"), Some(Fault::Abort("b:c".into())));
        assert_eq!(Fault::parse("panic:"), None);
        assert_eq!(Fault::parse("exit:a"), None);
        assert_eq!(Fault::parse("a"), None);
    }
}
