//! What one GPU dispatch costs when it does almost nothing: a decode step of a small
//! model is a few hundred dependent dispatches, so their fixed cost bounds its speed.
//! Times chains of `add`s (each reading what the one before wrote, so every dispatch
//! waits behind a barrier for the last) against the same number of independent ones
//! (no barriers), per dispatch, with one read at the end of each round.
//!
//! `cargo run --release -p kiln-runtime --example dispatch_bench [dispatches] [rounds]`

use kiln_runtime::{Backend, GpuBackend};

fn main() {
    let numbers: Result<Vec<usize>, _> = std::env::args().skip(1).map(|a| a.parse::<usize>()).collect();
    let Ok(numbers) = numbers else {
        eprintln!("usage: dispatch_bench [dispatches] [rounds]");
        std::process::exit(2);
    };
    let dispatches = numbers.first().copied().unwrap_or(256).max(1);
    let rounds = numbers.get(1).copied().unwrap_or(20).max(1);
    let Some(adapter) = kiln_runtime::adapters().into_iter().next() else {
        eprintln!("dispatch_bench: no GPU adapter on this machine");
        std::process::exit(1);
    };
    let mut be = match GpuBackend::new(&adapter) {
        Ok(be) => be,
        Err(e) => {
            eprintln!("dispatch_bench: {e}");
            std::process::exit(1);
        }
    };
    println!("{}: {dispatches} dispatches a round, {rounds} rounds", be.name());
    for len in [896, 1 << 20] {
        let y = be.alloc(len);
        be.write(y, 0, &vec![1.0; len]);
        let xs: Vec<_> = (0..dispatches).map(|_| be.alloc(len)).collect();
        for x in &xs {
            be.write(*x, 0, &vec![0.0; len]);
        }
        let mut out = [0f32; 1];
        for (what, chained) in [("dependent", true), ("independent", false)] {
            // (The first round compiles the pipeline and is not timed.)
            let mut best = f64::MAX;
            for round in 0..=rounds {
                let start = std::time::Instant::now();
                for x in &xs {
                    let x = if chained { xs[0] } else { *x };
                    be.add(x, y, len);
                }
                be.read(xs[0], 0, &mut out);
                let per = start.elapsed().as_secs_f64() * 1e6 / dispatches as f64;
                if round > 0 {
                    best = best.min(per);
                }
            }
            println!("  {len:>8} floats, {what:>11}: {best:.2} µs a dispatch (best round)");
        }
        for x in xs {
            be.free(x);
        }
        be.free(y);
    }
}
