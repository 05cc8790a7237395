//! Deterministic fault points for the fault tests.
//!
//! Guarantee: without the cargo feature `failpoints` every `fail::fail_point!` in the code
//! compiles to nothing. With it, the `FAILPOINTS` environment variable (read once at
//! start-up, e.g. `FAILPOINTS=after_db_commit=return`, or `seek_fails=1*return` for once)
//! makes the process abort at the named crash point, as a crash or `kill -9` would at the
//! worst moment, or makes the named operation fail or wait:
//!
//! | point | where |
//! |---|---|
//! | `after_db_commit` | the record's transaction committed, its offset not yet stored |
//! | `after_delay_publish` | the delay record acknowledged, the source offset not yet stored |
//! | `in_lease_extension` | the lease keeper is about to extend a held lock |
//! | `slow_db_write` | under the lock, before the write: `slow_db_write=return(300)` waits 300 ms (asynchronously) |
//! | `seek_fails` | a seek back (after a hold or backpressure) fails |
//! | `commit_rebalance_in_progress` | a synchronous commit is refused with REBALANCE_IN_PROGRESS |

/// Aborts the process at a fail point (no unwinding, no cleanup: a crash).
#[cfg(feature = "failpoints")]
pub fn crash(point: &str) -> ! {
    tracing::error!(point, "fail point reached: aborting the process");
    std::process::abort()
}

/// Waits asynchronously at a fail point configured as `name=return(<ms>)` — unlike the
/// fail crate's own `sleep`, it blocks no runtime thread, so other tasks (the lease
/// keeper) go on meanwhile. A no-op without the feature.
pub async fn delay(name: &str) {
    #[cfg(feature = "failpoints")]
    if let Some(Some(ms)) = fail::eval(name, |arg| arg.and_then(|a| a.parse::<u64>().ok())) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
