//! `hsm`: a hierarchical storage manager on fanotify pre-content events.
//!
//! Modules, each with one job:
//! - [`sys`]: the kernel interface (fanotify, mount API, reflinks, xattrs); all `unsafe` lives here.
//! - [`record`], [`ranges`]: the per-file records kept in `trusted.*` xattrs.
//! - [`store`]: the store's layout and configuration.
//! - [`backend`]: where content lives.
//! - [`engine`]: fetching missing ranges into stubs, once, and remembering them.
//! - [`prefetch`]: fetching ahead of a walk through a directory of small files.
//! - [`event`]: owning and answering events exactly once.
//! - [`fault`]: fault injection in the worker, for tests only.
//! - [`kernel_reader`]: opens after which the kernel reads a file without events.
//! - [`guard`]: holding the store's group while no daemon runs, so that stubs fail closed.
//! - [`supervisor`], [`worker`], [`protocol`]: `hsm serve`, split so that a fetch can crash
//!   without losing or mis-answering an event; [`defaults`]: its options' defaults.
//! - [`populate`], [`status`], [`demo`]: the other commands.
//! - [`manifest`]: the list of files an HTTP(S) source holds (`hsm manifest DIR`).
//! - [`access_list`]: recording what a program reads, and fetching it ahead next time.

pub mod access_list;
pub mod backend;
pub mod config;
pub mod control;
pub mod defaults;
pub mod demo;
pub mod digest;
pub mod engine;
pub mod event;
pub mod evict;
pub mod exporter;
pub mod fault;
pub mod frontend;
pub mod fuse;
pub mod guard;
pub mod kernel_reader;
pub mod lifecycle;
pub mod manage;
pub mod manifest;
pub mod metrics;
pub mod owed;
pub mod policy;
pub mod populate;
pub mod prefetch;
pub mod protocol;
pub mod published;
pub mod ranges;
pub mod record;
pub mod round_trip;
pub mod stats;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod sync;
pub mod sys;
pub mod units;
pub mod verify;
pub mod worker;

/// The span of one permission event's log lines, in the supervisor and in the worker alike:
/// `event{id=N}` on every line logged inside it (`EventMsg::id`, assigned by the supervisor).
pub fn event_span(id: u64) -> tracing::Span {
    tracing::info_span!("event", id)
}
