//! Polling with a deadline: the only way tests wait for something.

use std::time::{Duration, Instant};

/// Calls `f` until it returns `Ok`, or fails after `timeout` with the last
/// error and `what` (so a failure says what never happened).
pub fn until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(err) if start.elapsed() >= timeout => {
                return Err(err.context(format!("timed out after {timeout:?} waiting for {what}")))
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    }
}
