//! Fault injection for the tests, compiled in only with the `test-hooks` feature (the
//! test suite's build); a release build has empty, inlined stand-ins.

/// Test hook (feature `test-hooks` only): `VMDKIT_TEST_ABORT_AFTER_WRITES` aborts the
/// process after that many data/metadata writes (crash tests);
/// `VMDKIT_TEST_WRITE_DELAY_MS` slows every write (signal tests).
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub(crate) fn fault_point() {}

/// See the other `fault_point`.
#[cfg(feature = "test-hooks")]
pub(crate) fn fault_point() {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LEFT: AtomicI64 = AtomicI64::new(i64::MIN);
    static DELAY: AtomicI64 = AtomicI64::new(-1);
    let mut left = LEFT.load(Ordering::Relaxed);
    if left == i64::MIN {
        left = std::env::var("VMDKIT_TEST_ABORT_AFTER_WRITES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1);
        LEFT.store(left, Ordering::Relaxed);
        DELAY.store(
            std::env::var("VMDKIT_TEST_WRITE_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            Ordering::Relaxed,
        );
    }
    let delay = DELAY.load(Ordering::Relaxed);
    if delay > 0 {
        std::thread::sleep(std::time::Duration::from_millis(delay as u64));
    }
    if left >= 0 && LEFT.fetch_sub(1, Ordering::Relaxed) == 0 {
        std::process::abort();
    }
}

/// Test hook (feature `test-hooks` only): a command that changes a disk sleeps
/// `VMDKIT_TEST_HOLD_LOCK_MS` milliseconds once it holds all its locks, before it changes
/// anything (race tests).
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub(crate) fn test_hold_hook() {}

/// See the other `test_hold_hook`.
#[cfg(feature = "test-hooks")]
pub(crate) fn test_hold_hook() {
    if let Some(ms) = std::env::var("VMDKIT_TEST_HOLD_LOCK_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
