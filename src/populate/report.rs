//! What populate shows: the stub method its store gets, a progress line while it runs and a
//! summary at the end. Apart from the work because it is only presentation.

use indicatif::ProgressStyle;

use super::PopulateReport;
use crate::store::StoreConfig;
use crate::sys::fs::FsKind;

pub(super) fn method_line(c: &StoreConfig) -> String {
    match c.fs {
        FsKind::Xfs | FsKind::Btrfs => format!(
            "store on {}: files of {} bytes or more become reflinked zero-block stubs, fetched range by \
             range; smaller files are sparse stubs fetched whole when opened",
            c.fs.name(),
            c.whole_below
        ),
        _ if c.lazy_sparse => format!(
            "store on {}: sparse stubs fetched range by range (--lazy-sparse): copy tools that trust \
             SEEK_DATA will copy unfetched ranges as zeros",
            c.fs.name()
        ),
        _ => format!(
            "store on {} (no reflink): sparse stubs, each fetched whole when opened (exec fetches range by range)",
            c.fs.name()
        ),
    }
}

pub(super) fn print_report(r: &PopulateReport) {
    eprintln!(
        "populated {} files ({} bytes: {} cloned stubs, {} sparse stubs, {} empty), {} directories, \
         {} symlinks, {} hard links{}",
        r.files,
        r.bytes,
        r.cloned_stubs,
        r.sparse_stubs,
        r.empty_files,
        r.dirs,
        r.symlinks,
        r.hard_links,
        if r.kept_existing > 0 { format!(", {} existing stubs kept", r.kept_existing) } else { String::new() }
    );
    if r.staging_removed > 0 {
        eprintln!(
            "removed {} unfinished stubs left under staging names by an interrupted populate",
            r.staging_removed
        );
    }
    if !r.skipped_special.is_empty() {
        eprintln!(
            "skipped {} special files (sockets, FIFOs, devices):",
            r.skipped_special.len()
        );
        for p in r.skipped_special.iter().take(20) {
            eprintln!("  {p}");
        }
    }
    if !r.skipped_keys.is_empty() {
        eprintln!(
            "skipped {} source keys that cannot be paths under the store:",
            r.skipped_keys.len()
        );
        for p in r.skipped_keys.iter().take(50) {
            eprintln!("  {p}");
        }
    }
    for e in r.errors.iter().take(50) {
        eprintln!("error: {e}");
    }
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The progress line: entries done and their rate (`49,968 entries/s`); with the total known,
/// a bar, the total and an ETA.
pub(super) fn progress_style(with_total: bool) -> ProgressStyle {
    // The bar takes what the line leaves, so that the line never wraps.
    let template = if with_total {
        "{spinner} {human_pos}/{human_len} entries, {rate}, ETA {eta} [{wide_bar}]"
    } else {
        "{spinner} {human_pos} entries, {rate}"
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .progress_chars("=> ")
        .with_key(
            "rate",
            |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{} entries/s", thousands(s.per_sec().round() as u64));
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_have_thousands_separators_and_no_decimals() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(49_968), "49,968");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
