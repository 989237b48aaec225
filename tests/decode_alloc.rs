//! The decode loop allocates nothing: after a warm-up, one-token forward passes on the
//! CPU backend (the model's ops, the kernels' scratch, the thread pool's hand-offs)
//! make no heap allocation at all, on the default model.
//!
//! A counting global allocator sees every allocation of the process. The binary has no
//! test harness (`harness = false` in Cargo.toml), whose own threads would allocate
//! while it counts; the pool's worker threads are counted, which is the point.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use kiln::{registry, Engine, EngineOptions, SessionOptions};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() {
    let name = "smollm2-135m-instruct";
    let path = registry::cached_path(name);
    assert!(path.exists(), "{} is missing: run `kiln pull {name}`", path.display());
    let engine = Engine::load(
        path.to_str().unwrap(),
        EngineOptions {
            n_ctx: Some(256),
            ..Default::default()
        },
    )
    .unwrap();
    let mut session = engine.session(SessionOptions::default());
    let prompt = engine.encode("The quick brown fox").unwrap();
    session.feed(&prompt).unwrap();
    // Warm-up: scratch buffers and thread-local kernel scratch reach their sizes.
    for token in [11u32, 12, 13] {
        session.feed(&[token]).unwrap();
    }
    let steps = 32u32;
    COUNTING.store(true, Ordering::SeqCst);
    for token in 100..100 + steps {
        session.feed(&[token]).unwrap();
    }
    COUNTING.store(false, Ordering::SeqCst);
    let count = ALLOCATIONS.load(Ordering::SeqCst);
    assert_eq!(count, 0, "{count} heap allocations in {steps} decode steps");
    println!("decode_alloc: no heap allocation in {steps} one-token forward passes: ok");
}
