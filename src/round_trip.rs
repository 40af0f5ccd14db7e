//! The source's round trip as the fetches see it: the shortest fetch time seen lately. Fetches
//! that queued behind others (in the pools, at the server) only look longer, so the shortest is
//! the one that says how far away the source is. Kernel-independent, tested alone; used by the
//! directory prefetch (files in flight) and the engine's readahead (how far ahead).

use std::time::{Duration, Instant};

/// The shortest fetch time is taken over this long (two halves, the older one forgotten as a
/// new one starts): a source that became farther is followed within it.
pub const MEMORY: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, Default)]
pub struct RoundTrip {
    /// Shortest fetch time of the current and of the previous half of [`MEMORY`].
    shortest: [Option<Duration>; 2],
    half_since: Option<Instant>,
}

impl RoundTrip {
    /// The shortest fetch seen in the last [`MEMORY`] (at least its second half); `None` before
    /// any.
    pub fn get(&self) -> Option<Duration> {
        self.shortest.iter().flatten().min().copied()
    }

    /// A fetch took `took`, ending at `now`.
    pub fn observe(&mut self, took: Duration, now: Instant) {
        match self.half_since {
            Some(t) if now.saturating_duration_since(t) < MEMORY / 2 => {}
            _ => {
                self.shortest = [None, self.shortest[0]];
                self.half_since = Some(now);
            }
        }
        self.shortest[0] = Some(self.shortest[0].map_or(took, |s| s.min(took)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shortest_recent_fetch_counts_and_an_old_one_is_forgotten() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut rt = RoundTrip::default();
        assert_eq!(rt.get(), None);
        rt.observe(ms(30), t0);
        rt.observe(ms(20), t0 + ms(1));
        rt.observe(ms(90), t0 + ms(2));
        assert_eq!(rt.get(), Some(ms(20)));
        // Half the memory on: the last half's shortest is still remembered...
        rt.observe(ms(50), t0 + MEMORY / 2);
        assert_eq!(rt.get(), Some(ms(20)));
        // ...until a second half has passed: then the source is as far as it now looks.
        rt.observe(ms(50), t0 + MEMORY + ms(1));
        assert_eq!(rt.get(), Some(ms(50)));
    }
}
