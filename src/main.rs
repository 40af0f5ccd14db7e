use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use hsm::config::ServeConfig;
use hsm::control::Op;
use hsm::defaults;
use hsm::policy::PolicyConfig;
use hsm::populate::PopulateOptions;
use hsm::supervisor::ServeOptions;
use hsm::worker::WorkerOptions;

#[derive(Parser, Debug, PartialEq)]
#[command(
    name = "hsm",
    version,
    about = "Hierarchical storage manager on fanotify pre-content events"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Options renamed so that one concept has one name everywhere keep their old name for one
// release: a hidden argument of its own, moved into the new one by `Command::take_old_names`,
// which also says what to type instead.
#[derive(clap::Args, Debug, PartialEq)]
struct ManageArgs {
    /// Files or directories under MOUNTPOINT (while `hsm serve` runs: done by the daemon) or
    /// under STORE/tree.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Files worked on at once.
    #[arg(long, value_name = "N", default_value_t = 8)]
    threads: usize,
}

#[derive(clap::Args, Debug, PartialEq)]
struct HydrateArgs {
    #[command(flatten)]
    manage: ManageArgs,
    /// Fetch the files and ranges of this access list (`hsm serve --record-access`), in its
    /// order, many at once, instead of whole files: its paths are relative to the one PATH given
    /// (the mount point or STORE/tree).
    #[arg(long, value_name = "FILE")]
    list: Option<PathBuf>,
}

// Parsed once per run: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug, PartialEq)]
enum Command {
    /// Build a stub tree in STORE that mirrors SOURCE, recording where each file's content lives.
    Populate {
        /// A local directory (path or file:// URL), s3://BUCKET/PREFIX, gs://BUCKET/PREFIX,
        /// az://CONTAINER/PREFIX?account=NAME, or http(s)://HOST/BASE/.
        source: String,
        /// The store directory (on ext4, xfs or btrfs); created if missing.
        store: PathBuf,
        /// Chunk size for range fetches (a multiple of 4096; units: 512K, 4M).
        #[arg(long, value_name = "SIZE", default_value_t = hsm::store::DEFAULT_CHUNK,
              value_parser = hsm::units::parse_size_u32)]
        chunk_size: u32,
        /// Files smaller than this are fetched whole when first opened (units: 1M).
        #[arg(long, value_name = "SIZE", default_value_t = hsm::store::DEFAULT_WHOLE_BELOW,
              value_parser = hsm::units::parse_size)]
        whole_below: u64,
        /// ext4 only: fetch files range by range instead of whole on open. Copy tools that trust
        /// SEEK_DATA (cp, tar --sparse, rsync --sparse) then copy unfetched ranges as zeros.
        #[arg(long)]
        lazy_sparse: bool,
        /// Threads reading the source and making stubs (default: number of CPUs).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// Old name of --threads.
        #[arg(long, hide = true, conflicts_with = "threads")]
        jobs: Option<usize>,
        /// Record a BLAKE3 digest per chunk, checked on every fetch (reads every source file once).
        #[arg(long)]
        digests: bool,
        /// Remote sources: a manifest, as a path or an http(s) URL. HTTP default:
        /// SOURCE/.hsm-manifest.jsonl; object stores: optional, adds modes, owners and times to
        /// listed keys.
        #[arg(long)]
        manifest: Option<String>,
        /// Object stores: the server's URL (s3://: default AWS_ENDPOINT_URL, else AWS; gs://: the
        /// base URL; az://: the account's URL). For an emulator or a private endpoint.
        #[arg(long)]
        endpoint: Option<String>,
        /// s3:// sources: the region (default: AWS_REGION, else us-east-1).
        #[arg(long)]
        region: Option<String>,
        /// Remote sources: seconds one read may take, retries included, before it fails with
        /// EIO (default 20). Recorded in the store as the source URL's `fetch_deadline=` option.
        #[arg(long, value_name = "SECS")]
        fetch_deadline: Option<f64>,
    },
    /// Print a manifest of the tree at DIR (JSON lines) for serving DIR over HTTP(S).
    Manifest {
        /// The directory whose tree the manifest describes (the one an HTTP(S) server serves).
        dir: PathBuf,
        /// Also record each file's BLAKE3 digest (reads every file).
        #[arg(long)]
        digests: bool,
        /// Old name of --digests.
        #[arg(long, hide = true, conflicts_with = "digests")]
        digest: bool,
    },
    /// Expose STORE's tree at MOUNTPOINT and fetch content on access, until SIGINT or SIGTERM.
    Serve {
        /// The store `hsm populate` built (the directory holding `tree` and `.hsm`).
        store: PathBuf,
        /// Where the tree appears while this runs (an empty directory).
        mountpoint: PathBuf,
        /// Threads serving accesses (fetching, writing, answering).
        #[arg(long, value_name = "N", default_value_t = defaults::THREADS)]
        threads: usize,
        /// Old name of --threads.
        #[arg(long, hide = true, conflicts_with = "threads")]
        workers: Option<usize>,
        /// Bytes fetched ahead of a sequential reader (units: 8M); from a far source, once more
        /// per 5 ms of its round trip, up to 8 times.
        #[arg(long, value_name = "SIZE", default_value_t = defaults::READAHEAD,
              value_parser = hsm::units::parse_size)]
        readahead: u64,
        /// Present bytes the store may hold (units: 20G): beyond it, the least recently used
        /// files are released (as `hsm release`, skipping modified, pinned and open ones) down
        /// to 90% of it. Default: no limit.
        #[arg(long, value_name = "SIZE", value_parser = hsm::units::parse_size)]
        cache_limit: Option<u64>,
        /// Files fetched ahead of a walk through a directory (tar, grep -r, a build): once 3
        /// different stubs of a directory are opened within 2 s, up to this many of its other
        /// small files (64 MiB at most) are fetched in the background. 0: only what is read.
        #[arg(long, value_name = "N", default_value_t = defaults::DIR_PREFETCH)]
        dir_prefetch: usize,
        /// Seconds a backend read may take before the access fails with EAGAIN (a local-disk
        /// source: 15 s more, when the supervisor denies what the worker has not answered). A
        /// remote source's own deadline (`populate --fetch-deadline`) ends it with EIO first
        /// when it is shorter.
        #[arg(long, value_name = "SECS", default_value_t = defaults::FETCH_DEADLINE_SECS)]
        fetch_deadline: f64,
        /// Old name of --fetch-deadline.
        #[arg(long, hide = true, conflicts_with = "fetch_deadline")]
        fetch_timeout: Option<f64>,
        /// Seconds to keep serving already-open files after a stop is asked for.
        #[arg(long, value_name = "SECS", default_value_t = defaults::DRAIN_SECS)]
        drain: f64,
        /// The unprivileged user (name or uid) that remote backends run as, in their own process.
        #[arg(long, value_name = "USER", default_value = defaults::FETCH_USER)]
        fetch_user: String,
        /// A group (name or gid) whose members may use the control socket (`hsm hydrate`,
        /// `release`, `pin`, `unpin` on the served store) besides root.
        #[arg(long, value_name = "GROUP")]
        control_group: Option<String>,
        /// Mount over MOUNTPOINT even when it is not empty (its entries are hidden meanwhile).
        #[arg(long)]
        nonempty: bool,
        /// How accesses reach the daemon: `fanotify` (pre-content events, Linux 6.14+), `fuse`
        /// (a FUSE mount, any current kernel; complete files in passthrough from 6.9), or `auto`:
        /// fanotify where the kernel and the store's filesystem support it, else FUSE.
        #[arg(long, value_enum, default_value_t = hsm::fuse::Frontend::Auto)]
        frontend: hsm::fuse::Frontend,
        /// A TOML file with any of these options, by their long names with `_`
        /// (`fetch_deadline = 20`); options given here override it. See README, "Operating it".
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR:PORT/metrics (loopback only, unless the
        /// config file sets `metrics_allow_remote = true`).
        #[arg(long, value_name = "ADDR:PORT")]
        metrics: Option<SocketAddr>,
        /// Fetch policy: processes of this name (comm) never cause fetches; their accesses to
        /// content that is not present are denied (--deny-errno). Repeat or separate by commas.
        #[arg(long, value_name = "NAME", value_delimiter = ',')]
        deny_comm: Vec<String>,
        /// Fetch policy: as --deny-comm, by executable path.
        #[arg(long, value_name = "PATH", value_delimiter = ',')]
        deny_exe: Vec<PathBuf>,
        /// Fetch policy: as --deny-comm, by effective uid.
        #[arg(long, value_name = "UID", value_delimiter = ',')]
        deny_uid: Vec<u32>,
        /// The errno of fetch policy denials: EPERM (default), EIO, EAGAIN or EBUSY.
        #[arg(long, value_name = "ERRNO", value_parser = parse_errno_name)]
        deny_errno: Option<String>,
        /// Fetches a second any one uid may cause; beyond it, its accesses to content that is
        /// not present fail with EAGAIN (0: no limit).
        #[arg(long, value_name = "N")]
        uid_fetch_rate: Option<f64>,
        /// Fetches a uid may cause at once before --uid-fetch-rate applies (default: one
        /// second's worth).
        #[arg(long, value_name = "N")]
        uid_fetch_burst: Option<f64>,
        /// Record the files opened and the ranges read, in the order of their first access,
        /// into FILE (an access list: written when the daemon stops, every few seconds while it
        /// changes, and at `hsm record --flush`). See README, "Recording and replaying what a
        /// program reads".
        #[arg(long, value_name = "FILE")]
        record_access: Option<PathBuf>,
        /// Fetch this access list's files and ranges ahead as soon as the daemon starts, at a
        /// lower priority than readers' fetches. Repeatable.
        #[arg(long, value_name = "FILE")]
        prefetch_list: Vec<PathBuf>,
        /// Start each --prefetch-list only when a program opens (or reads) its first file,
        /// rather than at once.
        #[arg(long)]
        prefetch_on_first_open: bool,
        /// Run `hsm sync STORE` this often while serving (90s, 10m, 1h; see `hsm sync`).
        #[arg(long, value_name = "DURATION", value_parser = hsm::sync::parse_every_secs)]
        sync_every: Option<u32>,
    },
    /// Bring STORE's tree up to date with its source: new files appear, changed ones become
    /// stubs of the new version, removed ones go; files changed here are kept (a conflict
    /// when the source changed them too). Through the daemon while `hsm serve` runs. Exit
    /// status 0, 1 when there were conflicts, 2 on errors.
    Sync {
        /// The store `hsm populate` built.
        store: PathBuf,
        /// Print what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Remote sources: the manifest populate was given (HTTP default:
        /// SOURCE/.hsm-manifest.jsonl), as a path or an http(s) URL.
        #[arg(long)]
        manifest: Option<String>,
        /// Threads comparing and making stubs (default: number of CPUs).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
        /// Print the counts, conflicts and errors, not a line per change.
        #[arg(long)]
        quiet: bool,
    },
    /// Make files complete (directories: every file below), fetching what is missing.
    Hydrate(HydrateArgs),
    /// `hsm record --flush PATH`: the daemon serving PATH (its mount point or a path below it)
    /// writes the access list it records (`hsm serve --record-access`) now.
    Record {
        /// Write the list now.
        #[arg(long, required = true)]
        flush: bool,
        /// The mount point, or a path below it.
        path: PathBuf,
    },
    /// Give the space of files back: they become stubs again, fetched anew when read. Files
    /// with local changes, pinned files and files in use are refused (exit status 1).
    Release(ManageArgs),
    /// Keep files complete: hydrated now, never released or evicted.
    Pin(ManageArgs),
    /// Let pinned files be released or evicted again.
    Unpin(ManageArgs),
    /// The running daemon's figures: events by kind and outcome, bytes fetched, fetch latency
    /// percentiles, denials, prefetch, present and evicted bytes, the files fetched most.
    Stats {
        /// The store, its mount point, or a path under either.
        path: PathBuf,
        /// Machine-readable output (JSON).
        #[arg(long)]
        json: bool,
        /// How many of the files fetched most to show.
        #[arg(long, value_name = "N", default_value_t = 10)]
        top: usize,
    },
    /// The fetching process of `hsm serve` (started by it, not by hand).
    #[command(hide = true)]
    ServeWorker {
        store: PathBuf,
        mountpoint: PathBuf,
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        readahead: u64,
        #[arg(long)]
        dir_prefetch: usize,
        #[arg(long)]
        fetch_deadline: f64,
        #[arg(long)]
        fetch_user: String,
        #[arg(long)]
        control_group: Option<u32>,
        #[arg(long)]
        cache_limit: Option<u64>,
        /// The fetch policy, as JSON.
        #[arg(long, default_value = "{}")]
        policy: String,
        #[arg(long)]
        record_access: Option<PathBuf>,
        #[arg(long)]
        prefetch_list: Vec<PathBuf>,
        #[arg(long)]
        prefetch_on_first_open: bool,
    },
    /// The process that keeps a store's stubs failing closed (never read as zeros) through every
    /// mount while no `hsm serve` runs. `hsm serve` starts it; it exits when the store's
    /// filesystem is unmounted, or with --stop.
    Guard {
        /// The store (the directory given to `hsm serve`).
        store: PathBuf,
        /// Ask the running guard to exit (refused while hsm serve runs). Stubs reached through
        /// leftover mounts are then no longer guarded.
        #[arg(long)]
        stop: bool,
    },
    /// The unprivileged process that reads remote sources for `hsm serve` (started by it).
    #[command(hide = true)]
    ServeFetcher {
        source: String,
        #[arg(long)]
        fetch_user: String,
    },
    /// Show how much of each file is present: stub, partial, complete, modified.
    Status {
        /// Files or directories under MOUNTPOINT (while `hsm serve` runs) or under STORE/tree
        /// (STORE itself stands for its tree).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Print the totals only, not a line per file (for big trees).
        #[arg(long)]
        summary: bool,
    },
    /// Check the present chunks of stubs against the digests recorded by `populate --digests`.
    Verify {
        /// Files or directories under STORE/tree or under MOUNTPOINT (while `hsm serve` runs).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The store, when it cannot be found from the paths (they are found under STORE/tree
        /// and under the mount point of a running `hsm serve`).
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Show the whole thing working on a throw-away loop-mounted filesystem.
    Demo {
        /// Filesystem for the demo image.
        #[arg(long, default_value = "xfs")]
        fs: String,
    },
}

impl Command {
    /// Moves the value of every option given by its old name into the option's new name, and
    /// returns a warning for each (`deadline=` in a SOURCE URL is read as it is).
    fn take_old_names(&mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        let mut renamed = |old: &str, new: &str, when: &str| {
            warnings.push(format!(
                "hsm: warning: {old} is deprecated, use {new} ({when})"
            ))
        };
        let next = |old: &str| format!("the next release drops {old}");
        match self {
            Command::Populate {
                source,
                threads,
                jobs,
                ..
            } => {
                if let Some(n) = jobs.take() {
                    *threads = Some(n);
                    renamed("--jobs", "--threads", &next("--jobs"));
                }
                for (old, new) in hsm::backend::old_url_options(source) {
                    let when = "the store records the new name";
                    renamed(&format!("{old}= in a source URL"), &format!("{new}="), when);
                }
            }
            Command::Manifest {
                digests, digest, ..
            } if *digest => {
                (*digests, *digest) = (true, false);
                renamed("--digest", "--digests", &next("--digest"));
            }
            Command::Serve {
                threads,
                workers,
                fetch_deadline,
                fetch_timeout,
                ..
            } => {
                if let Some(n) = workers.take() {
                    *threads = n;
                    renamed("--workers", "--threads", &next("--workers"));
                }
                if let Some(s) = fetch_timeout.take() {
                    *fetch_deadline = s;
                    renamed(
                        "--fetch-timeout",
                        "--fetch-deadline",
                        &next("--fetch-timeout"),
                    );
                }
            }
            _ => {}
        }
        warnings
    }
}

fn parse_errno_name(s: &str) -> Result<String, String> {
    hsm::policy::parse_errno(s).map(|_| s.to_ascii_uppercase())
}

impl Command {
    /// `serve --config`: every option not given on the command line (`matches`: the serve
    /// subcommand's) takes the file's value. Returns whether the file allows a remote metrics
    /// address.
    fn apply_config(&mut self, matches: &ArgMatches, cfg: &ServeConfig) -> bool {
        let Command::Serve {
            threads,
            readahead,
            dir_prefetch,
            fetch_deadline,
            drain,
            fetch_user,
            control_group,
            nonempty,
            frontend,
            cache_limit,
            metrics,
            deny_comm,
            deny_exe,
            deny_uid,
            deny_errno,
            uid_fetch_rate,
            uid_fetch_burst,
            sync_every,
            record_access,
            prefetch_list,
            prefetch_on_first_open,
            ..
        } = self
        else {
            return false;
        };
        // Given on the command line, by its name or its old one.
        let given = |ids: &[&str]| {
            ids.iter()
                .any(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
        };
        fn take<T: Clone>(field: &mut T, given: bool, from: &Option<T>) {
            if let (false, Some(v)) = (given, from) {
                *field = v.clone();
            }
        }
        take(threads, given(&["threads", "workers"]), &cfg.threads);
        take(
            readahead,
            given(&["readahead"]),
            &cfg.readahead.map(|s| s.0),
        );
        take(dir_prefetch, given(&["dir_prefetch"]), &cfg.dir_prefetch);
        take(
            fetch_deadline,
            given(&["fetch_deadline", "fetch_timeout"]),
            &cfg.fetch_deadline,
        );
        take(drain, given(&["drain"]), &cfg.drain);
        take(fetch_user, given(&["fetch_user"]), &cfg.fetch_user);
        take(
            control_group,
            given(&["control_group"]),
            &Some(cfg.control_group.clone()),
        );
        take(nonempty, given(&["nonempty"]), &cfg.nonempty);
        take(frontend, given(&["frontend"]), &cfg.frontend);
        take(
            cache_limit,
            given(&["cache_limit"]),
            &Some(cfg.cache_limit.map(|s| s.0)),
        );
        take(deny_comm, given(&["deny_comm"]), &cfg.deny_comm);
        take(deny_exe, given(&["deny_exe"]), &cfg.deny_exe);
        take(deny_uid, given(&["deny_uid"]), &cfg.deny_uid);
        take(
            deny_errno,
            given(&["deny_errno"]),
            &Some(cfg.deny_errno.clone()),
        );
        take(
            uid_fetch_rate,
            given(&["uid_fetch_rate"]),
            &Some(cfg.uid_fetch_rate),
        );
        take(
            uid_fetch_burst,
            given(&["uid_fetch_burst"]),
            &Some(cfg.uid_fetch_burst),
        );
        take(
            sync_every,
            given(&["sync_every"]),
            // Checked when the file is loaded (see `load_serve_config`).
            &cfg.sync_every
                .as_deref()
                .map(|s| hsm::sync::parse_every_secs(s).ok()),
        );
        take(
            record_access,
            given(&["record_access"]),
            &Some(cfg.record_access.clone()),
        );
        take(prefetch_list, given(&["prefetch_list"]), &cfg.prefetch_list);
        take(
            prefetch_on_first_open,
            given(&["prefetch_on_first_open"]),
            &cfg.prefetch_on_first_open,
        );
        if !given(&["metrics"]) {
            if let Some(addr) = &cfg.metrics {
                // Checked when the file is loaded (see `load_serve_config`).
                *metrics = addr.parse().ok();
            }
        }
        cfg.metrics_allow_remote
    }
}

/// Parse the command line and, for `serve --config`, fold the file in. Returns the command,
/// the deprecation warnings, and whether a remote metrics address is allowed.
fn parse_command_line(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Result<(Command, Vec<String>, bool), anyhow::Error> {
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    let warnings = cli.command.take_old_names();
    let mut allow_remote = false;
    if let (
        Command::Serve {
            config: Some(path), ..
        },
        Some(("serve", sub)),
    ) = (&cli.command, matches.subcommand())
    {
        let cfg = load_serve_config(path)?;
        allow_remote = cli.command.apply_config(sub, &cfg);
    }
    Ok((cli.command, warnings, allow_remote))
}

fn load_serve_config(path: &std::path::Path) -> anyhow::Result<ServeConfig> {
    let cfg = ServeConfig::load(path)?;
    if let Some(every) = &cfg.sync_every {
        hsm::sync::parse_every(every)
            .map_err(|e| anyhow::anyhow!("{}: sync_every: {e}", path.display()))?;
    }
    if let Some(addr) = &cfg.metrics {
        addr.parse::<SocketAddr>().map_err(|e| {
            anyhow::anyhow!(
                "{}: metrics = {addr:?}: not an ADDR:PORT ({e})",
                path.display()
            )
        })?;
    }
    Ok(cfg)
}

/// Credentials from the config file reach the S3 client (in the fetcher process, which
/// inherits the environment) as the variables it reads; the file's win over the environment.
fn export_credentials(cfg: &ServeConfig) {
    for (var, v) in [
        ("AWS_ACCESS_KEY_ID", &cfg.aws_access_key_id),
        ("AWS_SECRET_ACCESS_KEY", &cfg.aws_secret_access_key),
        ("AWS_SESSION_TOKEN", &cfg.aws_session_token),
    ] {
        if let Some(v) = v {
            // Single-threaded still: nothing reads the environment concurrently.
            std::env::set_var(var, v);
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // No colour codes in a file or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (command, warnings, allow_remote) = match parse_command_line(std::env::args_os()) {
        Ok(x) => x,
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(clap_err) => clap_err.exit(),
            Err(e) => {
                eprintln!("hsm: {e:#}");
                return ExitCode::FAILURE;
            }
        },
    };
    for warning in warnings {
        eprintln!("{warning}");
    }
    if let Command::Serve {
        config: Some(path), ..
    } = &command
    {
        // Loaded (and checked) once already.
        if let Ok(cfg) = ServeConfig::load(path) {
            export_credentials(&cfg);
        }
    }
    let result = match command {
        Command::Populate {
            source,
            store,
            chunk_size,
            whole_below,
            lazy_sparse,
            threads,
            jobs: _,
            digests,
            manifest,
            endpoint,
            region,
            fetch_deadline,
        } => hsm::populate::store_view(&store).and_then(|view| {
            // Through the daemon's kind of private view when the store is guarded.
            let store_io = view
                .as_ref()
                .map_or(store.clone(), |v| v.root().to_path_buf());
            // One process changes a store at a time: not under a running `hsm serve`.
            let _lock = match hsm::store::Store::open(&store_io) {
                Ok(existing) => match existing.try_lock("hsm populate")? {
                    Ok(lock) => Some(lock),
                    Err(holder) => anyhow::bail!(
                        "the store {} is in use by {holder}: stop it before populating the \
                         store again",
                        store.display()
                    ),
                },
                // Not a store yet (or one populate refuses, with its own message).
                Err(_) => None,
            };
            hsm::populate::populate(
                &source,
                &store_io,
                &PopulateOptions {
                    chunk_size,
                    whole_below,
                    lazy_sparse,
                    digests,
                    jobs: threads.unwrap_or_else(|| {
                        std::thread::available_parallelism().map_or(2, |n| n.get())
                    }),
                    manifest,
                    endpoint,
                    region,
                    deadline: fetch_deadline,
                },
            )
            .map(|_| ())
        }),
        Command::Manifest { dir, digests, .. } => hsm::manifest::run(&dir, digests),
        Command::Serve {
            store,
            mountpoint,
            threads,
            readahead,
            dir_prefetch,
            fetch_deadline,
            drain,
            fetch_user,
            control_group,
            nonempty,
            frontend,
            cache_limit,
            metrics,
            deny_comm,
            deny_exe,
            deny_uid,
            deny_errno,
            uid_fetch_rate,
            uid_fetch_burst,
            sync_every,
            record_access,
            prefetch_list,
            prefetch_on_first_open,
            ..
        } => (|| {
            if let Some(addr) = metrics {
                hsm::exporter::check_addr(addr, allow_remote)?;
            }
            let control_group = control_group
                .map(|g| {
                    hsm::sys::users::group_id(&g)
                        .map_err(|e| anyhow::anyhow!("--control-group {g}: {e}"))
                })
                .transpose()?;
            let policy = PolicyConfig {
                deny_comm,
                deny_exe,
                deny_uid,
                deny_errno,
                uid_fetch_rate,
                uid_fetch_burst,
            };
            policy.validate().map_err(anyhow::Error::msg)?;
            // The worker runs elsewhere: absolute paths. A bad list fails the start.
            let record_access = record_access.map(std::path::absolute).transpose()?;
            let mut prefetch_lists = Vec::new();
            for list in prefetch_list {
                hsm::access_list::load(&list)?;
                prefetch_lists.push(std::path::absolute(&list)?);
            }
            let opts = ServeOptions {
                worker: WorkerOptions {
                    threads,
                    readahead,
                    dir_prefetch,
                    fetch_deadline: defaults::secs(fetch_deadline),
                    fetch_user,
                    control_group,
                    cache_limit,
                    policy,
                    record_access,
                    prefetch_lists,
                    prefetch_on_first_open,
                },
                drain: defaults::secs(drain),
                nonempty,
                metrics,
                sync_every: sync_every.map(|s| std::time::Duration::from_secs(s.into())),
            };
            match hsm::fuse::choose(frontend, &store) {
                hsm::fuse::Frontend::Fuse => {
                    hsm::fuse::serve(&store, &mountpoint, &opts.worker, opts.nonempty)
                }
                _ => hsm::supervisor::serve(&store, &mountpoint, opts),
            }
        })(),
        Command::Sync {
            store,
            dry_run,
            manifest,
            threads,
            quiet,
        } => {
            let opts = hsm::sync::SyncOptions {
                dry_run,
                manifest,
                threads: threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
                quiet,
            };
            return match hsm::sync::run(&store, &opts) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("hsm: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Hydrate(HydrateArgs {
            manage: a,
            list: Some(list),
        }) => {
            if a.paths.len() != 1 {
                eprintln!(
                    "hsm: hydrate --list takes one PATH: the root its list's paths are under"
                );
                return ExitCode::FAILURE;
            }
            return match hsm::access_list::hydrate_command(&list, &a.paths[0]) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("hsm: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Hydrate(HydrateArgs {
            manage: a,
            list: None,
        }) => return manage(Op::Hydrate, a),
        Command::Record { flush: _, path } => hsm::access_list::flush_command(&path),
        Command::Release(a) => return manage(Op::Release, a),
        Command::Pin(a) => return manage(Op::Pin, a),
        Command::Unpin(a) => return manage(Op::Unpin, a),
        Command::Stats { path, json, top } => hsm::stats::run(&path, json, top),
        Command::ServeWorker {
            store,
            mountpoint,
            threads,
            readahead,
            dir_prefetch,
            fetch_deadline,
            fetch_user,
            control_group,
            cache_limit,
            policy,
            record_access,
            prefetch_list,
            prefetch_on_first_open,
        } => serde_json::from_str::<PolicyConfig>(&policy)
            .map_err(anyhow::Error::from)
            .and_then(|policy| {
                hsm::worker::run(
                    &store,
                    &mountpoint,
                    WorkerOptions {
                        threads,
                        readahead,
                        dir_prefetch,
                        fetch_deadline: defaults::secs(fetch_deadline),
                        fetch_user,
                        control_group,
                        cache_limit,
                        policy,
                        record_access,
                        prefetch_lists: prefetch_list,
                        prefetch_on_first_open,
                    },
                )
            }),
        Command::ServeFetcher { source, fetch_user } => {
            hsm::backend::isolated::fetcher_main(&source, &fetch_user)
        }
        Command::Guard { store, stop: false } => hsm::guard::run(&store),
        Command::Guard { store, stop: true } => hsm::guard::stop(&store).map(|running| {
            if !running {
                eprintln!("hsm: no guard runs for {}", store.display());
            }
        }),
        Command::Status {
            paths,
            json,
            summary,
        } => hsm::status::run(&paths, json, summary),
        Command::Verify { paths, store } => hsm::verify::run(&paths, store.as_deref()),
        Command::Demo { fs } => hsm::demo::run(&fs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hsm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `hsm hydrate|release|pin|unpin`: exit 1 when a file was refused or failed (each named).
fn manage(op: Op, args: ManageArgs) -> ExitCode {
    match hsm::manage::run(op, &args.paths, args.threads) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("hsm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<(Command, Vec<String>), clap::Error> {
        let mut cli = Cli::try_parse_from(std::iter::once("hsm").chain(args.iter().copied()))?;
        let warnings = cli.command.take_old_names();
        Ok((cli.command, warnings))
    }

    /// Each renamed option, by its old name, parses to what its new name does, with a warning
    /// that names both; given both names, the command line is refused.
    #[test]
    fn old_option_names_parse_as_the_new_ones_with_a_warning() {
        let cases: &[(&[&str], &[&str], &str)] = &[
            (
                &["populate", "src", "st", "--jobs", "3"],
                &["populate", "src", "st", "--threads", "3"],
                "--jobs is deprecated, use --threads",
            ),
            (
                &["manifest", "dir", "--digest"],
                &["manifest", "dir", "--digests"],
                "--digest is deprecated, use --digests",
            ),
            (
                &["serve", "st", "mnt", "--workers", "4"],
                &["serve", "st", "mnt", "--threads", "4"],
                "--workers is deprecated, use --threads",
            ),
            (
                &["serve", "st", "mnt", "--fetch-timeout", "7.5"],
                &["serve", "st", "mnt", "--fetch-deadline", "7.5"],
                "--fetch-timeout is deprecated, use --fetch-deadline",
            ),
        ];
        for (old, new, warning) in cases {
            let (from_old, warnings) = parse(old).unwrap();
            let (from_new, none) = parse(new).unwrap();
            assert_eq!(from_old, from_new, "{old:?} vs {new:?}");
            assert!(none.is_empty(), "{new:?}: {none:?}");
            assert_eq!(warnings.len(), 1, "{old:?}: {warnings:?}");
            assert!(
                warnings[0].starts_with("hsm: warning: ") && warnings[0].contains(warning),
                "{old:?}: {warnings:?}"
            );
            let new_option = new.iter().position(|a| a.starts_with("--")).unwrap();
            let both: Vec<&str> = old.iter().chain(&new[new_option..]).copied().collect();
            assert!(parse(&both).is_err(), "{both:?} parsed");
        }
        // `deadline=` in a source URL: read as `fetch_deadline=` (see the backends' tests).
        for source in ["s3://b/p?region=r&deadline=5", "http://h/base/#deadline=5"] {
            let (_, warnings) = parse(&["populate", source, "st"]).unwrap();
            assert_eq!(warnings.len(), 1, "{source}: {warnings:?}");
            assert!(warnings[0]
                .contains("deadline= in a source URL is deprecated, use fetch_deadline="));
        }
        let (_, none) = parse(&["populate", "s3://b/p?fetch_deadline=5", "st"]).unwrap();
        assert!(none.is_empty(), "{none:?}");
    }

    /// `hsm serve` with no options runs with `ServeOptions::default()`.
    #[test]
    fn serve_defaults_are_the_serve_options_defaults() {
        let (cmd, _) = parse(&["serve", "st", "mnt"]).unwrap();
        let Command::Serve {
            threads,
            readahead,
            dir_prefetch,
            fetch_deadline,
            drain,
            fetch_user,
            ..
        } = cmd
        else {
            panic!("{cmd:?}")
        };
        let d = ServeOptions::default();
        assert_eq!(threads, d.worker.threads);
        assert_eq!(readahead, d.worker.readahead);
        assert_eq!(dir_prefetch, d.worker.dir_prefetch);
        assert_eq!(defaults::secs(fetch_deadline), d.worker.fetch_deadline);
        assert_eq!(defaults::secs(drain), d.drain);
        assert_eq!(fetch_user, d.worker.fetch_user);
        assert_eq!(d.event_deadline(), std::time::Duration::from_secs(45));
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn config_file(text: &str, mode: u32) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    fn parse(args: &[&str]) -> anyhow::Result<(Command, bool)> {
        let args = std::iter::once("hsm")
            .chain(args.iter().copied())
            .map(std::ffi::OsString::from);
        parse_command_line(args).map(|(c, _, remote)| (c, remote))
    }

    /// The file sets what the command line does not; the command line wins (by an option's
    /// name or its old one); defaults fill the rest.
    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let f = config_file(
            "threads = 3\nreadahead = 4096\ndrain = 9\nfetch_user = \"hsm-fetch\"\n\
             metrics = \"127.0.0.1:9187\"\ndeny_comm = [\"updatedb\"]\ndeny_uid = [5]\n\
             uid_fetch_rate = 20\n",
            0o644,
        );
        let path = f.path().to_str().unwrap();
        let (cmd, remote) = parse(&[
            "serve",
            "st",
            "mnt",
            "--config",
            path,
            "--threads",
            "8",
            "--deny-uid",
            "7,8",
        ])
        .unwrap();
        assert!(!remote);
        let Command::Serve {
            threads,
            readahead,
            drain,
            fetch_user,
            fetch_deadline,
            metrics,
            deny_comm,
            deny_uid,
            uid_fetch_rate,
            dir_prefetch,
            ..
        } = cmd
        else {
            panic!("{cmd:?}")
        };
        assert_eq!(threads, 8, "the flag wins");
        assert_eq!(deny_uid, vec![7, 8], "the flag's list replaces the file's");
        assert_eq!((readahead, drain), (4096, 9.0), "the file's");
        assert_eq!(fetch_user, "hsm-fetch");
        assert_eq!(metrics, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(deny_comm, vec!["updatedb".to_string()]);
        assert_eq!(uid_fetch_rate, Some(20.0));
        assert_eq!(fetch_deadline, defaults::FETCH_DEADLINE_SECS, "the default");
        assert_eq!(dir_prefetch, defaults::DIR_PREFETCH);
        // An old option name counts as given.
        let (cmd, _) = parse(&["serve", "st", "mnt", "--config", path, "--workers", "5"]).unwrap();
        assert!(matches!(cmd, Command::Serve { threads: 5, .. }), "{cmd:?}");
    }

    /// `sync_every` in the file, `--sync-every` on the command line (which wins); a period
    /// that is not one is refused, naming the key.
    #[test]
    fn sync_every_comes_from_the_file_or_the_flag() {
        let f = config_file("sync_every = \"10m\"\n", 0o644);
        let path = f.path().to_str().unwrap();
        let every = |args: &[&str]| match parse(args).unwrap().0 {
            Command::Serve { sync_every, .. } => sync_every,
            cmd => panic!("{cmd:?}"),
        };
        assert_eq!(every(&["serve", "st", "mnt", "--config", path]), Some(600));
        assert_eq!(
            every(&[
                "serve",
                "st",
                "mnt",
                "--config",
                path,
                "--sync-every",
                "90s"
            ]),
            Some(90)
        );
        assert_eq!(every(&["serve", "st", "mnt"]), None);
        let bad = config_file("sync_every = \"often\"\n", 0o644);
        let err = parse(&[
            "serve",
            "st",
            "mnt",
            "--config",
            bad.path().to_str().unwrap(),
        ])
        .unwrap_err();
        assert!(format!("{err:#}").contains("sync_every"), "{err:#}");
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let err = |text: &str, mode: u32| {
            let f = config_file(text, mode);
            let path = f.path().to_str().unwrap().to_string();
            format!(
                "{:#}",
                parse(&["serve", "st", "mnt", "--config", &path]).unwrap_err()
            )
        };
        let e = err("threads = 2\nthreds = 3\n", 0o644);
        assert!(e.contains("unknown field") && e.contains("threds"), "{e}");
        let e = err("metrics = \"localhost\"\n", 0o644);
        assert!(e.contains("not an ADDR:PORT"), "{e}");
        let e = err("threads = 2\n", 0o666);
        assert!(e.contains("writable by group or others"), "{e}");
        let e = err(
            "aws_access_key_id = \"AK\"\naws_secret_access_key = \"SK\"\n",
            0o644,
        );
        assert!(e.contains("credentials") && e.contains("600"), "{e}");
        let e = format!(
            "{:#}",
            parse(&["serve", "st", "mnt", "--config", "/nonexistent/hsm.toml"]).unwrap_err()
        );
        assert!(e.contains("/nonexistent/hsm.toml"), "{e}");
    }

    #[test]
    fn remote_metrics_need_the_file_s_permission() {
        let f = config_file("metrics_allow_remote = true\n", 0o600);
        let path = f.path().to_str().unwrap();
        let (_, remote) = parse(&["serve", "st", "mnt", "--config", path]).unwrap();
        assert!(remote);
        let (_, remote) = parse(&["serve", "st", "mnt", "--metrics", "0.0.0.0:9100"]).unwrap();
        assert!(!remote);
    }
}
