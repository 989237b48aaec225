//! A persistent thread pool for the CPU backend: threads started once, woken by an
//! epoch counter they spin on, so handing out a parallel op costs about a microsecond
//! instead of a fork/join through a work-stealing scheduler.
//!
//! `run` executes one job on every thread (the caller is thread 0) and returns when all
//! have finished. Between jobs the workers spin for a while (a forward pass issues
//! hundreds of ops in a row), then sleep on a condition variable until the next one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A job: called as `job(thread_index, n_threads)` on every thread.
type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// How long an idle worker spins before it sleeps: long enough to bridge the serial
/// gaps between ops of a forward pass, short enough not to burn a core between requests.
const SPIN: Duration = Duration::from_millis(2);

struct Shared {
    /// Bumped once per job; workers run the job when they see it change.
    epoch: AtomicU64,
    /// The address of the current job (a `Job` on `run`'s stack); valid while
    /// `pending > 0` (see `run`).
    job: AtomicUsize,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    /// Set when a worker's job panicked; `run` re-raises it on the caller.
    panicked: AtomicBool,
    stop: AtomicBool,
    /// Workers asleep (or about to be), so `run` knows whether to notify.
    sleepers: AtomicUsize,
    /// `for_chunks`' share of each thread: the chunks `front..back` left of it.
    segments: Vec<Segment>,
    lock: Mutex<()>,
    wake: Condvar,
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all: the caller of `run` and `n_threads - 1`
    /// workers.
    pub fn new(n_threads: usize) -> ThreadPool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            segments: (0..n_threads.max(1)).map(|_| Segment::default()).collect(),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let n = n_threads.max(1);
        let workers = (1..n)
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("kiln-cpu-{index}"))
                    .spawn(move || worker(&shared, index, n))
                    .expect("the CPU backend starts its worker threads")
            })
            .collect();
        ThreadPool { shared, workers }
    }

    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `job(i, n)` for every thread index `i < n` at once and waits for all.
    pub fn run(&self, job: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.n_threads();
        if n == 1 {
            job(0, 1);
            return;
        }
        let s = &*self.shared;
        // Publish the address of the job reference. This function does not return
        // before every worker has finished with it (`pending` reaches 0 below), so it
        // outlives every use.
        let slot: Job<'_> = job;
        s.job.store(&slot as *const Job<'_> as usize, Ordering::Relaxed);
        s.pending.store(n - 1, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0, n)));
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            backoff(&mut spins);
        }
        if let Err(payload) = mine {
            std::panic::resume_unwind(payload);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a CPU backend worker thread panicked");
        }
    }

    /// Splits `0..n_items` into chunks of `chunk` and runs `f` on each, every thread
    /// first taking the chunks of its own contiguous share in order, then helping the
    /// others from the far end of theirs. Each thread thus walks one run of items (a
    /// matmul's rows: one stream the prefetchers follow), and a thread that falls behind
    /// (a noisy core) is relieved of its last chunks.
    pub fn for_chunks(&self, n_items: usize, chunk: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        let chunk = chunk.max(1);
        let n_chunks = n_items.div_ceil(chunk);
        let n = self.n_threads();
        if n_chunks <= 1 || n == 1 {
            if n_items > 0 {
                f(0..n_items);
            }
            return;
        }
        assert!(n_chunks <= u32::MAX as usize, "for_chunks: too many chunks");
        let segments = &self.shared.segments;
        for (i, segment) in segments.iter().enumerate() {
            segment.set(i * n_chunks / n, (i + 1) * n_chunks / n);
        }
        let range = |c: usize| c * chunk..n_items.min((c + 1) * chunk);
        // `run` publishes the segments to the workers with its job (a SeqCst bump of the
        // epoch after these stores).
        self.run(&|i, n| {
            while let Some(c) = segments[i].take(End::Front) {
                f(range(c));
            }
            for j in (1..n).map(|k| (i + k) % n) {
                while let Some(c) = segments[j].take(End::Back) {
                    f(range(c));
                }
            }
        });
    }
}

/// The chunks `front..back` of one thread's share not yet taken, packed in one word so
/// that its owner (from the front) and helpers (from the back) take them with one
/// compare-and-swap; on its own cache line, apart from the other threads' shares.
#[derive(Default)]
#[repr(align(64))]
struct Segment(AtomicU64);

enum End {
    Front,
    Back,
}

impl Segment {
    fn set(&self, front: usize, back: usize) {
        self.0.store(front as u64 | (back as u64) << 32, Ordering::Relaxed);
    }

    fn take(&self, end: End) -> Option<usize> {
        let mut now = self.0.load(Ordering::Relaxed);
        loop {
            let (front, back) = (now & 0xffff_ffff, now >> 32);
            if front >= back {
                return None;
            }
            let (taken, next) = match end {
                End::Front => (front, now + 1),
                End::Back => (back - 1, now - (1 << 32)),
            };
            match self
                .0
                .compare_exchange_weak(now, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(taken as usize),
                Err(seen) => now = seen,
            }
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(s: &Shared, index: usize, n: usize) {
    let mut seen = 0u64;
    loop {
        seen = wait_for_epoch(s, seen);
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        let slot = s.job.load(Ordering::Relaxed) as *const Job<'_>;
        // SAFETY: `run` stored the address of a live `Job` before bumping the epoch we
        // just saw (SeqCst store, SeqCst load), and keeps it alive until `pending`
        // reaches 0, which happens only after this call returns.
        let job: Job<'_> = unsafe { *slot };
        if catch_unwind(AssertUnwindSafe(|| job(index, n))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

/// One step of a wait loop: a pause instruction, and every so often a yield, so that
/// on an oversubscribed machine (more runnable threads than cores) the thread being
/// waited for gets the core instead of a spinner burning its time slice.
#[inline]
fn backoff(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if spins.is_multiple_of(64) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// Waits until the epoch differs from `seen` and returns the new one: spins first, then
/// sleeps.
fn wait_for_epoch(s: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let now = s.epoch.load(Ordering::SeqCst);
        if now != seen {
            return now;
        }
        backoff(&mut spins);
        if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
            break;
        }
    }
    s.sleepers.fetch_add(1, Ordering::SeqCst);
    let mut guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
    let mut now = s.epoch.load(Ordering::SeqCst);
    while now == seen {
        guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        now = s.epoch.load(Ordering::SeqCst);
    }
    drop(guard);
    s.sleepers.fetch_sub(1, Ordering::SeqCst);
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_each_job_once() {
        let pool = ThreadPool::new(3);
        for round in 0..200 {
            let hits = [AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0)];
            pool.run(&|i, n| {
                assert_eq!(n, 3);
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "round {round}");
            if round % 50 == 0 {
                // Let the workers fall asleep, then wake them.
                std::thread::sleep(SPIN * 2);
            }
        }
    }

    #[test]
    fn chunks_cover_every_item_once() {
        let pool = ThreadPool::new(2);
        let seen: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        pool.for_chunks(1000, 7, &|range| {
            for i in range {
                seen[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn a_slow_thread_is_helped_and_every_chunk_runs_once() {
        // Three threads and chunk counts that do not divide evenly; the caller (thread
        // 0) stalls on its first chunk, so the others must take the rest of its share.
        let pool = ThreadPool::new(3);
        let caller = std::thread::current().id();
        for n_items in [1usize, 2, 5, 64, 1001] {
            let seen: Vec<AtomicUsize> = (0..n_items).map(|_| AtomicUsize::new(0)).collect();
            let helped = AtomicUsize::new(0);
            // Items of the caller's share: its chunks 0..n_chunks / 3.
            let share0 = n_items.div_ceil(3) / 3 * 3;
            pool.for_chunks(n_items, 3, &|range| {
                let on_caller = std::thread::current().id() == caller;
                if on_caller && range.start == 0 {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if !on_caller && range.start < share0 {
                    helped.fetch_add(1, Ordering::Relaxed);
                }
                for i in range {
                    seen[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1), "{n_items} items");
            if n_items == 1001 {
                assert!(helped.load(Ordering::Relaxed) > 0, "nobody helped the stalled thread");
            }
        }
    }

    #[test]
    fn a_worker_panic_reaches_the_caller() {
        let pool = ThreadPool::new(2);
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i, _| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(result.is_err());
        // The pool still works afterwards.
        let count = AtomicUsize::new(0);
        pool.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }
}
