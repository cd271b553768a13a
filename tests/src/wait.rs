//! Waiting for a condition instead of sleeping for a fixed time.
//!
//! The end-to-end tests used to sleep ("give the swarm 20 s") and then assert. They now poll
//! the assertion itself until it holds or a deadline passes: a test waits only as long as the
//! system needs, and when the deadline passes the error names what it waited for and what it
//! saw last. A deadline equal to the old sleep keeps a condition that, once true, stays true
//! exactly as strict as before.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Calls `check` every `poll` until it returns `Ok`, and returns that value. An `Err` means
/// "not yet": its text is the last observed state. When `deadline` (counted from the call) has
/// passed, fails with `what`, the time waited, and the last `Err`.
///
/// `check` runs at least once, and once more at (or just after) the deadline.
pub async fn wait_until<T, F>(
    what: &str,
    deadline: Duration,
    poll: Duration,
    mut check: F,
) -> Result<T>
where
    F: AsyncFnMut() -> Result<T>,
{
    let start = Instant::now();
    let mut checks = 0u32;
    loop {
        checks += 1;
        let last = match check().await {
            Ok(v) => {
                // On stderr: `cargo xtask swarm` keeps stdout for its table and JSON.
                eprintln!(
                    "waited {:.1} s for {what} ({checks} checks)",
                    start.elapsed().as_secs_f64()
                );
                return Ok(v);
            }
            Err(e) => e,
        };
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            bail!(
                "timed out after {:.1} s ({checks} checks) waiting for {what}; last observed: {last:#}",
                elapsed.as_secs_f64()
            );
        }
        tokio::time::sleep(poll.min(deadline - elapsed)).await;
    }
}

/// What is left of `total` since `since` (zero once it has passed): the deadline of a wait
/// that shares one time budget with the waits before it.
pub fn remaining(since: Instant, total: Duration) -> Duration {
    total.saturating_sub(since.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    use anyhow::ensure;

    #[tokio::test]
    async fn returns_once_the_condition_holds() -> Result<()> {
        let mut n = 0;
        let v = wait_until(
            "n to reach 3",
            Duration::from_secs(5),
            Duration::from_millis(1),
            async || {
                n += 1;
                ensure!(n >= 3, "n is {n}");
                Ok(n * 10)
            },
        )
        .await?;
        assert_eq!(v, 30);
        Ok(())
    }

    #[tokio::test]
    async fn names_what_it_waited_for_and_the_last_value() {
        let mut n = 0;
        let err = wait_until(
            "the moon",
            Duration::from_millis(30),
            Duration::from_millis(5),
            async || -> Result<()> {
                n += 1;
                bail!("n is {n}")
            },
        )
        .await
        .expect_err("never true");
        let text = format!("{err:#}");
        assert!(text.contains("waiting for the moon"), "{text}");
        assert!(text.contains(&format!("last observed: n is {n}")), "{text}");
        assert!(
            n >= 2,
            "checked at least at the start and at the deadline: {n}"
        );
    }

    #[test]
    fn remaining_budget() {
        let t = Instant::now();
        assert!(remaining(t, Duration::from_secs(60)) > Duration::from_secs(59));
        assert_eq!(remaining(t, Duration::ZERO), Duration::ZERO);
    }
}
