use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use hsm::daemon::ServeOptions;
use hsm::populate::PopulateOptions;

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
        /// A local directory, as a path or a file:// URL.
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
    },
    /// Expose STORE's tree at MOUNTPOINT and fetch content on access, until SIGINT or SIGTERM.
    Serve {
        store: PathBuf,
        mountpoint: PathBuf,
        /// Fetching threads.
        #[arg(long, default_value_t = 16)]
        workers: usize,
        /// Bytes fetched ahead of a sequential reader.
        #[arg(long, default_value_t = 8 << 20)]
        readahead: u64,
        /// Seconds to keep serving already-open files after a stop is asked for.
        #[arg(long, default_value_t = 2.0)]
        drain: f64,
    },
    /// Show how much of each file is present: stub, partial, complete, modified.
    Status {
        paths: Vec<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show the whole thing working on a throw-away loop-mounted filesystem.
    Demo {
        /// Filesystem for the demo image.
        #[arg(long, default_value = "xfs")]
        fs: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
        } => hsm::populate::populate(
            &source,
            &store,
            &PopulateOptions {
                chunk_size,
                whole_below,
                lazy_sparse,
                jobs: jobs
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            },
        )
        .map(|_| ()),
        Command::Serve {
            store,
            mountpoint,
            workers,
            readahead,
            drain,
        } => hsm::daemon::serve(
            &store,
            &mountpoint,
            ServeOptions {
                workers,
                readahead,
                drain: Duration::from_secs_f64(drain.max(0.0)),
                ..ServeOptions::default()
            },
        ),
        Command::Status { paths, json } => hsm::status::run(&paths, json),
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
