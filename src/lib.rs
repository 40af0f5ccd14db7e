//! `hsm`: a hierarchical storage manager on fanotify pre-content events.
//!
//! Modules, each with one job:
//! - [`sys`]: the kernel interface (fanotify, mount API, reflinks, xattrs); all `unsafe` lives here.
//! - [`record`], [`ranges`]: the per-file records kept in `trusted.*` xattrs.
//! - [`store`]: the store's layout and configuration.
//! - [`backend`]: where content lives.
//! - [`engine`]: fetching missing ranges into stubs, once, and remembering them.
//! - [`event`], [`daemon`]: owning and answering events; the `serve` service.
//! - [`populate`], [`status`], [`demo`]: the other commands.

pub mod backend;
pub mod daemon;
pub mod demo;
pub mod engine;
pub mod event;
pub mod metrics;
pub mod populate;
pub mod ranges;
pub mod record;
pub mod status;
pub mod store;
pub mod sys;
