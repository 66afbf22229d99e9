//! The thread-count knob: `MOE_ROUTER_NUM_THREADS` at first use, or
//! `set_num_threads(n)` at run time; 0 or unset means one thread per core.
//!
//! Routing runs in a pool of its own, entered once per call: every pass of a
//! call then splits work among workers that are already awake, instead of
//! injecting each pass into rayon's global pool from the Python thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use rayon::ThreadPool;

static POOL: OnceLock<RwLock<Option<Arc<ThreadPool>>>> = OnceLock::new();

/// Largest pool accepted (threads are created eagerly).
pub const MAX_THREADS: usize = 1024;

/// How often the calling thread asks whether a long call should stop (a Ctrl-C
/// then takes effect within this plus one chunk per worker).
pub const POLL: Duration = Duration::from_millis(20);

/// The environment variable read at first use.
pub const ENV_VAR: &str = "MOE_ROUTER_NUM_THREADS";

/// The thread count `MOE_ROUTER_NUM_THREADS` asks for: `Ok(None)` when unset,
/// `Err(text)` when it is not an integer in `[0, MAX_THREADS]`.
pub fn from_env() -> Result<Option<usize>, String> {
    match std::env::var(ENV_VAR) {
        Err(_) => Ok(None),
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(n) if n <= MAX_THREADS => Ok(Some(n)),
            _ => Err(text),
        },
    }
}

fn cell() -> &'static RwLock<Option<Arc<ThreadPool>>> {
    POOL.get_or_init(|| RwLock::new(build(from_env().ok().flatten().unwrap_or(0)).ok()))
}

/// A pool of `n` threads (0: one per core, as rayon's default).
fn build(n: usize) -> Result<Arc<ThreadPool>, String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("moe-router-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Use `n` threads from now on (0: one per core).
pub fn set_num_threads(n: usize) -> Result<(), String> {
    if n > MAX_THREADS {
        return Err(format!("invalid num_threads: got {n}; must be at most {MAX_THREADS}"));
    }
    let pool = build(n)?;
    let mut guard = cell().write().map_err(|_| "thread-pool lock poisoned".to_string())?;
    *guard = Some(pool);
    Ok(())
}

/// Threads the next call will use.
pub fn num_threads() -> usize {
    current().map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
}

fn current() -> Option<Arc<ThreadPool>> {
    cell().read().ok().and_then(|g| g.clone())
}

/// Run `f` (routing a `tokens` x `experts` input) in the pool. A batch of one
/// chunk runs on the calling thread: the core does not split it, and handing it
/// to a pool costs a cross-thread round trip worth more than the work.
pub fn install<R: Send>(tokens: usize, experts: usize, f: impl FnOnce() -> R + Send) -> R {
    match splits(tokens, experts).then(current).flatten() {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// Whether the core splits a `tokens` x `experts` input in more than one chunk.
fn splits(tokens: usize, experts: usize) -> bool {
    moe_router_core::chunk_tokens(tokens, experts) < tokens
}

/// Run `f` (a pass over `items` rows or assignments) in the pool; small passes
/// stay on the calling thread for the same reason as in [`install`].
pub fn install_rows<R: Send>(items: usize, f: impl FnOnce() -> R + Send) -> R {
    match (items >= SPLIT_ITEMS).then(current).flatten() {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// Below this many rows a dispatch pass is cheaper than a pool round trip.
const SPLIT_ITEMS: usize = 4096;

/// Run `f` as [`install`] does, but keep the calling thread free while the pool
/// works: every [`POLL`] it calls `interrupted`, and when that returns true it
/// sets `cancel`, the flag `f`'s chunk loop reads (`RouteCall::cancel`), so `f`
/// returns early. A batch of one chunk runs on the calling thread, unwatched: it
/// is one chunk's work.
pub fn install_interruptible<R: Send>(
    tokens: usize,
    experts: usize,
    cancel: &AtomicBool,
    f: impl FnOnce() -> R + Send,
    mut interrupted: impl FnMut() -> bool,
) -> R {
    let Some(pool) = splits(tokens, experts).then(current).flatten() else { return f() };
    let (done, result) = mpsc::channel();
    pool.in_place_scope(|scope| {
        scope.spawn(move |_| {
            // The receiver outlives the scope, so the send cannot fail.
            let _ = done.send(f());
        });
        loop {
            match result.recv_timeout(POLL) {
                Ok(r) => return r,
                Err(RecvTimeoutError::Timeout) => {
                    if !cancel.load(Ordering::Relaxed) && interrupted() {
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
                // Only when `f` panicked: the scope re-raises that panic once this closure ends.
                Err(RecvTimeoutError::Disconnected) => std::panic::resume_unwind(Box::new("routing worker panicked")),
            }
        }
    })
}
