//! Runs independent jobs in order-preserving parallel maps, so results never depend on the
//! thread count. After a `fork` (data loaders, vLLM workers) the thread pools of the parent
//! are gone: [`disable_after_fork`] switches to serial execution instead of deadlocking.
//! Every job runs under [`simd::dispatch`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;

use crate::simd;

static SERIAL_ONLY: AtomicBool = AtomicBool::new(false);

/// Makes every later call run serially (call in a forked child).
pub fn disable_after_fork() {
    SERIAL_ONLY.store(true, Ordering::SeqCst);
}

fn pool(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS.get_or_init(Default::default).lock().ok()?;
    if let Some(p) = pools.get(&threads) {
        return Some(p.clone());
    }
    let built = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .ok()?,
    );
    pools.insert(threads, built.clone());
    Some(built)
}

/// `job(index, chunk)` for every `chunk_len` chunk of `data` (the last may be shorter), on
/// `threads` threads. Chunks are disjoint, so the result does not depend on the thread count.
pub fn for_each_chunk_mut<T, F>(threads: Option<usize>, data: &mut [T], chunk_len: usize, job: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    let chunk_len = chunk_len.max(1);
    let job = |i, c: &mut [T]| {
        simd::dispatch(
            #[inline(always)]
            || job(i, c),
        )
    };
    let in_order = |data: &mut [T]| {
        data.chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| job(i, c))
    };
    let in_parallel = |data: &mut [T]| {
        data.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| job(i, c))
    };
    if SERIAL_ONLY.load(Ordering::Relaxed) || threads == Some(1) || data.len() <= chunk_len {
        return in_order(data);
    }
    match threads {
        None => in_parallel(data),
        Some(t) => match pool(t) {
            Some(p) => p.install(|| in_parallel(data)),
            None => in_order(data),
        },
    }
}

/// `(0..count).map(job)` on `threads` threads (`None`: all cores), results in index order.
pub fn map_jobs<T, F>(threads: Option<usize>, count: usize, job: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> T + Sync + Send,
{
    let job = |i| {
        simd::dispatch(
            #[inline(always)]
            || job(i),
        )
    };
    let serial = SERIAL_ONLY.load(Ordering::Relaxed) || threads == Some(1) || count <= 1;
    if serial {
        return (0..count).map(job).collect();
    }
    match threads {
        None => (0..count).into_par_iter().map(job).collect(),
        Some(t) => match pool(t) {
            Some(p) => p.install(|| (0..count).into_par_iter().map(&job).collect()),
            None => (0..count).map(job).collect(),
        },
    }
}
