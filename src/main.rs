use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use hsm::populate::PopulateOptions;
use hsm::supervisor::ServeOptions;
use hsm::worker::WorkerOptions;

#[derive(Parser)]
#[command(
    name = "hsm",
    version,
    about = "Hierarchical storage manager on fanotify pre-content events"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a stub tree in STORE that mirrors SOURCE, recording where each file's content lives.
    Populate {
        /// A local directory (path or file:// URL), s3://BUCKET/PREFIX, or http(s)://HOST/BASE/.
        source: String,
        /// The store directory (on ext4, xfs or btrfs); created if missing.
        store: PathBuf,
        /// Chunk size for range fetches, in bytes (a multiple of 4096).
        #[arg(long, default_value_t = hsm::store::DEFAULT_CHUNK)]
        chunk_size: u32,
        /// Files smaller than this are fetched whole when first opened.
        #[arg(long, default_value_t = hsm::store::DEFAULT_WHOLE_BELOW)]
        whole_below: u64,
        /// ext4 only: fetch files range by range instead of whole on open. Copy tools that trust
        /// SEEK_DATA (cp, tar --sparse, rsync --sparse) then copy unfetched ranges as zeros.
        #[arg(long)]
        lazy_sparse: bool,
        /// Worker threads (default: number of CPUs).
        #[arg(long)]
        jobs: Option<usize>,
        /// Record a BLAKE3 digest per chunk, checked on every fetch (reads every source file once).
        #[arg(long)]
        digests: bool,
        /// Remote sources: a manifest, as a path or an http(s) URL. HTTP default:
        /// SOURCE/.hsm-manifest.jsonl; S3: optional, adds modes, owners and times to listed keys.
        #[arg(long)]
        manifest: Option<String>,
        /// s3:// sources: the S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS).
        #[arg(long)]
        endpoint: Option<String>,
        /// s3:// sources: the region (default: AWS_REGION, else us-east-1).
        #[arg(long)]
        region: Option<String>,
        /// Remote sources: seconds one read may take, retries included, before EIO (default 20).
        #[arg(long)]
        fetch_deadline: Option<f64>,
    },
    /// Print a manifest of the tree at DIR (JSON lines) for serving DIR over HTTP(S).
    Manifest {
        /// The directory whose tree the manifest describes (the one an HTTP(S) server serves).
        dir: PathBuf,
        /// Also record each file's BLAKE3 digest (reads every file).
        #[arg(long)]
        digest: bool,
    },
    /// Expose STORE's tree at MOUNTPOINT and fetch content on access, until SIGINT or SIGTERM.
    Serve {
        /// The store `hsm populate` built (the directory holding `tree` and `.hsm`).
        store: PathBuf,
        /// Where the tree appears while this runs (an empty directory).
        mountpoint: PathBuf,
        /// Fetching threads.
        #[arg(long, default_value_t = 16)]
        workers: usize,
        /// Bytes fetched ahead of a sequential reader.
        #[arg(long, default_value_t = 8 << 20)]
        readahead: u64,
        /// Files fetched ahead of a walk through a directory (tar, grep -r, a build): once 3
        /// different stubs of a directory are opened within 2 s, up to this many of its other
        /// small files (64 MiB at most) are fetched in the background. 0: only what is read.
        #[arg(long, default_value_t = 256)]
        dir_prefetch: usize,
        /// Seconds a backend read may take before the access fails with EAGAIN (a local-disk
        /// source: 15 s more, when the supervisor denies what the worker has not answered).
        #[arg(long, default_value_t = 30.0)]
        fetch_timeout: f64,
        /// Seconds to keep serving already-open files after a stop is asked for.
        #[arg(long, default_value_t = 2.0)]
        drain: f64,
        /// The unprivileged user (name or uid) that remote backends run as, in their own process.
        #[arg(long, default_value = "nobody")]
        fetch_user: String,
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
        fetch_timeout: f64,
        #[arg(long)]
        drain: f64,
        #[arg(long)]
        fetch_user: String,
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
        user: String,
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

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(if s.is_finite() {
        s.clamp(0.0, 86_400.0)
    } else {
        0.0
    })
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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Populate {
            source,
            store,
            chunk_size,
            whole_below,
            lazy_sparse,
            jobs,
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
            hsm::populate::populate(
                &source,
                &store_io,
                &PopulateOptions {
                    chunk_size,
                    whole_below,
                    lazy_sparse,
                    digests,
                    jobs: jobs.unwrap_or_else(|| {
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
        Command::Manifest { dir, digest } => hsm::manifest::run(&dir, digest),
        Command::Serve {
            store,
            mountpoint,
            workers,
            readahead,
            dir_prefetch,
            fetch_timeout,
            drain,
            fetch_user,
        } => {
            let mut opts = ServeOptions::default();
            opts.worker.dir_prefetch = dir_prefetch;
            opts.worker.fetch_user = fetch_user;
            opts.worker.threads = workers;
            opts.worker.readahead = readahead;
            opts.worker.fetch_timeout = secs(fetch_timeout);
            opts.worker.drain = secs(drain);
            opts.event_deadline = opts.worker.fetch_timeout + Duration::from_secs(15);
            hsm::supervisor::serve(&store, &mountpoint, opts)
        }
        Command::ServeWorker {
            store,
            mountpoint,
            threads,
            readahead,
            dir_prefetch,
            fetch_timeout,
            drain,
            fetch_user,
        } => hsm::worker::run(
            &store,
            &mountpoint,
            WorkerOptions {
                threads,
                readahead,
                dir_prefetch,
                fetch_timeout: secs(fetch_timeout),
                flush_interval: Duration::from_millis(500),
                drain: secs(drain),
                fetch_user,
            },
        ),
        Command::ServeFetcher { source, user } => {
            hsm::backend::isolated::fetcher_main(&source, &user)
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
