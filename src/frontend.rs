//! What both front ends run beside the fetch engine: the directory prefetch, the cache limit,
//! access recording and list prefetch, the fetch policy and the control service.
//!
//! The fanotify worker and the FUSE front end start them here alike, so that one store behaves
//! the same under either. They differ in two things only:
//! - `group`: the fanotify group whose ignore marks silence complete files. FUSE has none: it is
//!   asked for every open, so it needs no mark placed or taken off.
//! - `exposed`: the path the front end's fds show in `/proc/self/fd`, which names a file to the
//!   prefetch and the recorder. Event fds show the mount point; FUSE's own fds show the store's
//!   tree.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use crate::access_list::{ListService, Lists, Recorder};
use crate::engine::{Engine, Need};
use crate::evict::Usage;
use crate::metrics::Metrics;
use crate::policy::{Denial, Policy};
use crate::prefetch::DirPrefetch;
use crate::store::Store;
use crate::sys::fanotify::{DenyErrno, Group};
use crate::sys::shm::Shared;
use crate::worker::WorkerOptions;

/// The services one daemon runs beside its engine (see the module doc).
pub struct Services {
    pub prefetch: Option<Arc<DirPrefetch>>,
    /// The cache limit's tally of uses, when one is set.
    pub usage: Option<Arc<Usage>>,
    /// `--record-access`.
    pub recorder: Option<Arc<Recorder>>,
    /// Access lists' prefetch (`--prefetch-list`, `hsm hydrate --list`), and their hits.
    pub lists: Option<Arc<Lists>>,
    /// None: every process may cause fetches.
    pub policy: Option<Policy>,
    /// What answers `hsm hydrate`, `release`, `pin`, `stats`... (see `control`).
    control: Arc<dyn crate::control::Service>,
    control_group: Option<u32>,
}

impl Services {
    /// Start what `opts` asks for on `store`, and its control socket. `resumed`: a restarted
    /// worker (the access list it wrote goes on).
    pub fn start(
        engine: &Arc<Engine>,
        store: &Store,
        opts: &WorkerOptions,
        group: Option<Arc<Group>>,
        exposed: &Path,
    ) -> anyhow::Result<Services> {
        let policy = Policy::new(&opts.policy).map_err(anyhow::Error::msg)?;
        let prefetch = DirPrefetch::start(
            engine.clone(),
            group.clone(),
            store.open_tree()?,
            exposed,
            opts.dir_prefetch,
        );
        let usage = match opts.cache_limit {
            Some(limit) => {
                let usage = Arc::new(Usage::new(limit));
                engine.set_space(Arc::new(crate::evict::Space {
                    usage: usage.clone(),
                    engine: Arc::downgrade(engine),
                    tree: store.open_tree()?,
                    group: group.clone(),
                    zero_pool: store.zero_pool().ok(),
                }));
                usage.start(
                    &store.tree(),
                    store.open_tree()?,
                    engine.clone(),
                    group.clone(),
                    store.zero_pool().ok(),
                );
                if group.is_some() {
                    // Opens of complete files stay reported, as uses (see `evict`).
                    crate::event::ignore_only_accesses();
                }
                Some(usage)
            }
            None => None,
        };
        if let (Some(p), true) = (&prefetch, opts.record_access.is_some()) {
            p.without_marks();
        }
        let recorder = match opts.record_access.clone() {
            Some(path) => Some(Recorder::start(
                path,
                exposed,
                Shared::<Metrics>::from_fd(engine.metrics.fd().try_clone_to_owned()?)?,
                // A restarted worker goes on with the list the one before it wrote.
                engine.metrics.snapshot().worker_starts > 1,
            )),
            None => None,
        };
        let lists = Some(Lists::new(engine.clone(), store.open_tree()?));
        // `hsm hydrate`, `release`, `pin` on the served store come through here (see `control`).
        let operations = crate::manage::Operations {
            engine: Some(engine.clone()),
            tree: store.open_tree()?,
            group,
            zero_pool: store.zero_pool().ok(),
            usage: usage.clone(),
        };
        let control = Arc::new(ListService {
            inner: Arc::new(operations),
            recorder: recorder.clone(),
            lists: lists.clone(),
        });
        if let (Some(lists), false) = (&lists, opts.prefetch_lists.is_empty()) {
            start_list_prefetch(
                lists.clone(),
                opts.prefetch_lists.clone(),
                opts.prefetch_on_first_open,
            );
        }
        let services = Services {
            prefetch,
            usage,
            recorder,
            lists,
            policy,
            control,
            control_group: opts.control_group,
        };
        services.serve_control_at(&store.tree());
        Ok(services)
    }

    /// Answer the commands given a path under `tree` (the store's tree, or a mount point that
    /// shows another device and inode than it: FUSE's). Not fatal: serving goes on without it
    /// (the commands then say the store is in use).
    pub fn serve_control_at(&self, tree: &Path) {
        match crate::control::listen(tree) {
            Ok(listener) => crate::control::serve(
                listener,
                self.control.clone(),
                crate::control::Access {
                    group: self.control_group,
                },
            ),
            Err(e) => warn!(
                "no control socket for {}: {e:#}; hsm hydrate, release and pin cannot reach \
                 this daemon there",
                tree.display()
            ),
        }
    }

    /// An open (`range` None) or access of the file behind `fd` by `pid`: a use for the cache
    /// limit, an entry for the recorder, a hit for the lists.
    pub fn note_use(&self, fd: BorrowedFd<'_>, pid: i32, range: Option<(u64, u64)>) {
        if let Some(usage) = &self.usage {
            usage.used(fd);
        }
        if let Some(r) = &self.recorder {
            r.note(fd, pid, range);
        }
        if let Some(l) = &self.lists {
            l.note_read(fd, range);
        }
    }

    /// Whether the fetch policy keeps `pid` from having `need` of the file at `fd` fetched: the
    /// errno to fail its access with (counted and logged), or None. What is present is never
    /// kept from anyone.
    pub fn kept_from_fetching(
        &self,
        engine: &Engine,
        pid: i32,
        fd: BorrowedFd<'_>,
        need: Need,
    ) -> Option<DenyErrno> {
        let policy = self.policy.as_ref()?;
        if engine.is_present(fd, need).unwrap_or(false) {
            return None;
        }
        let denial = policy.decide(&policy.process(pid)?, Instant::now())?;
        Some(count_denial(engine, pid, fd, denial))
    }

    /// At the daemon's stop: the access list is written a last time.
    pub fn finish(&self) {
        if let Some(r) = &self.recorder {
            r.finish();
        }
    }
}

/// Count and log a fetch the policy kept from `pid`; the errno to fail it with.
pub fn count_denial(engine: &Engine, pid: i32, fd: BorrowedFd<'_>, denial: Denial) -> DenyErrno {
    let metrics = &engine.metrics;
    let (errno, counter, why) = match denial {
        Denial::Listed(errno) => (errno, &metrics.policy_denied_listed, "a listed process"),
        Denial::Rate => (
            DenyErrno::Again,
            &metrics.policy_denied_rate,
            "its uid is over its fetch rate",
        ),
    };
    Metrics::add(counter, 1);
    info!(
        pid,
        file = %crate::engine::fd_path(fd),
        "fetch policy: denied with {} ({why})",
        crate::policy::errno_name(errno),
    );
    errno
}

/// Fetch `paths` (access lists) ahead in the background, in order: at once (the program they
/// were recorded from is starting now), or each when its first file is opened.
fn start_list_prefetch(lists: Arc<Lists>, paths: Vec<std::path::PathBuf>, on_first_open: bool) {
    std::thread::spawn(move || {
        for path in paths {
            match crate::access_list::load(&path) {
                Ok(entries) => {
                    if on_first_open {
                        lists.wait_for_first_open(&entries);
                    }
                    let t = Instant::now();
                    let s = lists.run(&entries, crate::access_list::IN_FLIGHT);
                    info!(list = %path.display(), ?s, took = ?t.elapsed(), "access list fetched ahead");
                }
                Err(e) => warn!("access list not fetched: {e:#}"),
            }
        }
    });
}
