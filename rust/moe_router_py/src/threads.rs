//! The thread-count knob: `MOE_ROUTER_NUM_THREADS` at first use, or
//! `set_num_threads(n)` at run time; 0 or unset means rayon's global pool.

use std::sync::{Arc, OnceLock, RwLock};

use rayon::ThreadPool;

static POOL: OnceLock<RwLock<Option<Arc<ThreadPool>>>> = OnceLock::new();

fn cell() -> &'static RwLock<Option<Arc<ThreadPool>>> {
    POOL.get_or_init(|| {
        let from_env = std::env::var("MOE_ROUTER_NUM_THREADS").ok().and_then(|v| v.trim().parse::<usize>().ok());
        RwLock::new(from_env.filter(|&n| n > 0).and_then(|n| build(n).ok()))
    })
}

fn build(n: usize) -> Result<Arc<ThreadPool>, String> {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().map(Arc::new).map_err(|e| e.to_string())
}

/// Use `n` threads from now on (0: rayon's global pool).
pub fn set_num_threads(n: usize) -> Result<(), String> {
    let pool = if n == 0 { None } else { Some(build(n)?) };
    let mut guard = cell().write().map_err(|_| "thread-pool lock poisoned".to_string())?;
    *guard = pool;
    Ok(())
}

/// Threads the next call will use.
pub fn num_threads() -> usize {
    current().map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
}

fn current() -> Option<Arc<ThreadPool>> {
    cell().read().ok().and_then(|g| g.clone())
}

/// Run `f` in the configured pool.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match current() {
        Some(pool) => pool.install(f),
        None => f(),
    }
}
