//! Byte-for-byte agreement with the reference solvers.
//!
//! `tests/golden/reference.jsonl.zst` holds outputs of the reference repository's `apr()` and
//! `sosp()` (Parallel-Reasoning/APR at 5577928, CPython 3.11), each run after `random.seed(seed)`
//! with the beam draws of `generate_apr.py` / `generate_sosp.py`. Our solvers, fed the same
//! Python-compatible random stream, must write exactly the same text. Set `APR_GOLDEN_EXTRA` to
//! a colon-separated list of more files of the same shape to check those too.

use apr_countdown::pyrand::PyRandom;
use apr_countdown::record::{
    solve_problem, AprSolverConfig, CharCounter, SolverConfig, SospSolverConfig,
};
use apr_countdown::search::TraceDict;
use apr_countdown::Problem;
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    seed: u64,
    nums: Vec<i64>,
    target: i64,
    beam: u32,
    sub_beam: u32,
    trace_dict: TraceDict,
    sosp_beam: u32,
    sosp: String,
}

fn check_file(path: &std::path::Path) -> usize {
    let cases: Vec<Golden> = apr_countdown::io::read_items(path).unwrap();
    assert!(!cases.is_empty(), "{} is empty", path.display());
    for case in &cases {
        let problem = Problem {
            nums: case.nums.clone(),
            target: case.target,
            solution: vec![],
            optimal_path: String::new(),
            start_size: case.nums.len(),
        };
        let apr = solve_problem(
            &problem,
            &SolverConfig::Apr(AprSolverConfig::default()),
            &mut PyRandom::new(case.seed),
            &CharCounter,
        );
        assert_eq!(
            (apr.beam_size, apr.sub_call_beam_size),
            (Some(case.beam), Some(case.sub_beam)),
            "seed {}",
            case.seed
        );
        let ours = apr.trace_dict.unwrap();
        if ours != case.trace_dict {
            let (a, b) = (ours.all_calls(), case.trace_dict.all_calls());
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                if x != y {
                    let at = x.bytes().zip(y.bytes()).take_while(|(p, q)| p == q).count();
                    panic!(
                        "seed {} call {i} differs at byte {at}:\nours: {:?}\nref:  {:?}",
                        case.seed,
                        &x[at.saturating_sub(80)..(at + 80).min(x.len())],
                        &y[at.saturating_sub(80)..(at + 80).min(y.len())]
                    );
                }
            }
            panic!("seed {}: {} calls vs {}", case.seed, a.len(), b.len());
        }
        let sosp = solve_problem(
            &problem,
            &SolverConfig::Sosp(SospSolverConfig::default()),
            &mut PyRandom::new(case.seed),
            &CharCounter,
        );
        assert_eq!(sosp.beam_size, Some(case.sosp_beam));
        assert!(
            sosp.search_path == case.sosp,
            "seed {}: SoS+ trace differs",
            case.seed
        );
    }
    cases.len()
}

#[test]
fn solvers_match_the_reference_byte_for_byte() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/reference.jsonl.zst");
    let n = check_file(&fixture);
    assert!(n >= 50);
    if let Ok(extra) = std::env::var("APR_GOLDEN_EXTRA") {
        for path in extra.split(':').filter(|p| !p.is_empty()) {
            let n = check_file(std::path::Path::new(path));
            println!("{path}: {n} problems match");
        }
    }
}
