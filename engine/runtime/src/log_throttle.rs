//! One log line per interval for an event that can repeat thousands of times a second.
//!
//! A connection flood against a listener at its limit would otherwise write a line per refused
//! connection — enough to fill a disk and bury everything else. The metric counts every one;
//! the log says it is happening and how many were not logged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a listener at its connection limit logs that it is refusing connections.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

pub struct LogThrottle {
    interval: Duration,
    /// When the last line was let through, and how many occurrences were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` when this occurrence should be logged, `n` being how many since the last line
    /// were not; `None` when it falls inside the interval (it is counted for the next line).
    pub fn hit(&self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    fn hit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, held) = &mut *state;
        match last {
            Some(t) if now.duration_since(*t) < self.interval => {
                *held += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(held))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_carrying_the_count_held_back() {
        let t = LogThrottle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        assert_eq!(t.hit_at(at(0)), Some(0));
        for ms in 1..1000 {
            assert_eq!(t.hit_at(at(ms)), None);
        }
        assert_eq!(t.hit_at(at(9_999)), None);
        assert_eq!(t.hit_at(at(10_000)), Some(1000));
        assert_eq!(t.hit_at(at(10_001)), None);
        assert_eq!(t.hit_at(at(60_000)), Some(1));
        assert_eq!(t.hit_at(at(75_000)), Some(0));
    }
}
