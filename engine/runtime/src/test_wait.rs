//! Waiting in tests for something to happen: poll for the condition itself until it holds or a
//! deadline passes, instead of sleeping a fixed time (too short on a loaded CI machine, too long
//! everywhere else).
//!
//! ```
//! # use tributary_runtime::test_wait::wait;
//! let mut calls = 0;
//! let n = wait("the third call").until(|| {
//!     calls += 1;
//!     (calls == 3).then_some(calls)
//! });
//! assert_eq!(n, 3);
//! ```

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// How long [`wait`] polls unless told otherwise: generous, for a shared machine under load.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How often [`wait`] polls.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// A wait for `what` (named in the panic when it times out).
pub fn wait(what: impl Display) -> Wait {
    Wait {
        what: what.to_string(),
        timeout: DEFAULT_TIMEOUT,
    }
}

/// A condition to poll for; see [`wait`].
#[must_use = "a wait does nothing until `until` or `until_async` runs it"]
pub struct Wait {
    what: String,
    timeout: Duration,
}

impl Wait {
    /// Gives up after `timeout` instead of [`DEFAULT_TIMEOUT`] (for a condition that only
    /// means something within a bound).
    pub fn within(mut self, timeout: Duration) -> Wait {
        self.timeout = timeout;
        self
    }

    /// Calls `probe` every [`INTERVAL`] until it returns `Some`, and returns that; panics,
    /// naming what was awaited, when the timeout passes first. Blocks the thread.
    pub fn until<T>(self, mut probe: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(v) = probe() {
                return v;
            }
            self.check(deadline);
            std::thread::sleep(INTERVAL);
        }
    }

    /// [`Wait::until`] for an async probe, sleeping on the tokio timer between calls.
    pub async fn until_async<T, F>(self, mut probe: impl FnMut() -> F) -> T
    where
        F: Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            self.check(deadline);
            tokio::time::sleep(INTERVAL).await;
        }
    }

    fn check(&self, deadline: Instant) {
        assert!(
            Instant::now() < deadline,
            "timed out after {:?} waiting for {}",
            self.timeout,
            self.what
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "waiting for the impossible")]
    fn a_condition_that_never_holds_panics_naming_it() {
        wait("the impossible")
            .within(Duration::from_millis(250))
            .until(|| None::<()>);
    }

    #[tokio::test]
    async fn an_async_probe_is_polled_until_it_holds() {
        let mut calls = 0;
        let got = wait("the second call")
            .until_async(|| {
                calls += 1;
                let n = calls;
                async move { (n == 2).then_some(n) }
            })
            .await;
        assert_eq!(got, 2);
    }
}
