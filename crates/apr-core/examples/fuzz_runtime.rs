//! Fuzzes the runtime with the chaotic model of the property tests until a number of model
//! outputs (segments) have been checked: `cargo run --release -p apr-core --example fuzz_runtime
//! -- [OUTPUTS] [THREADS]` (default 10,000,000 on every core). Exits non-zero at the first broken
//! invariant, naming the batch that broke it.

#[path = "../tests/chaos/mod.rs"]
mod chaos;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use apr_core::runtime::Mode;
use chaos::{check, run_chaos_with, Tally};

/// Problems per batch: one runtime run.
const BATCH: usize = 2_000;

fn arg(n: usize, default: usize, what: &str) -> usize {
    match std::env::args().nth(n).map(|a| a.replace('_', "").parse()) {
        None => default,
        Some(Ok(v)) if v > 0 => v,
        _ => {
            eprintln!("error: {what} must be a positive whole number");
            std::process::exit(2);
        }
    }
}

/// Runs batch `b` and checks it; every batch is its own seeds, mode, slots and output length.
fn batch(b: usize) -> Result<Tally, String> {
    let mode = if b.is_multiple_of(2) {
        Mode::Apr
    } else {
        Mode::Serial
    };
    let slots = [1, 3, 16, 64][b % 4];
    let seeded = b.is_multiple_of(3);
    // Mostly short outputs (many markers per token), now and then long ones.
    let eos = [150, 60, 150, 15][(b / 4) % 4];
    let first = (b * BATCH) as u64;
    let (results, model) = run_chaos_with(mode, first, BATCH, slots, seeded, eos);
    let mut tally = Tally::default();
    for r in &results {
        check(&model, r, &mut tally)
            .map_err(|e| format!("batch {b} ({mode:?}, {slots} slots, eos {eos}‰): {e}"))?;
    }
    Ok(tally)
}

fn main() {
    let target = arg(1, 10_000_000, "OUTPUTS");
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = arg(2, cores, "THREADS");
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let outputs = AtomicUsize::new(0);
    let broken = AtomicBool::new(false);
    let total = Mutex::new(Tally::default());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while outputs.load(Ordering::Relaxed) < target && !broken.load(Ordering::Relaxed) {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    match batch(b) {
                        Ok(t) => {
                            let done = outputs.fetch_add(t.outputs, Ordering::Relaxed) + t.outputs;
                            let mut total = total.lock().expect("no worker panics");
                            total.add(&t);
                            if b % 100 == 99 {
                                eprintln!("{done} outputs, {:.0} s", start.elapsed().as_secs_f64());
                            }
                        }
                        Err(e) => {
                            eprintln!("error: {e}");
                            broken.store(true, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    if broken.load(Ordering::Relaxed) {
        std::process::exit(1);
    }
    let t = total.into_inner().expect("no worker panics");
    println!(
        "{} model outputs ({} problems, {} substitutions, {} outputs equal to the reference loop's, \
         {} problems failed as the protocol says) in {:.1} s on {threads} threads: \
         0 panics, 0 runtime failures",
        t.outputs,
        t.problems,
        t.substitutions,
        t.matched_reference,
        t.failures,
        start.elapsed().as_secs_f64()
    );
}
