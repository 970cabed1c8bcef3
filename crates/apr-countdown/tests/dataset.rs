//! End-to-end properties of generated datasets: reference solver statistics, validation that
//! passes on our output and catches single-character edits, SFT views, thread-count independence.

mod common;

use std::collections::HashSet;

use apr_core::Mode;
use apr_countdown::problem::{streams, ProblemSpec};
use apr_countdown::record::{
    generate_traces, AprSolverConfig, CharCounter, SolverConfig, SospSolverConfig,
};
use apr_countdown::sft::{sequences, SftOptions};
use apr_countdown::stats::TraceStats;
use apr_countdown::validate::{validate, Validator};
use common::apr_records;

#[test]
fn solver_statistics_match_the_reference() {
    // Reference (spec §3.4, 2,000 problems): APR 70.2% with 6.3 children, SoS+ 50.2%.
    let problems = ProblemSpec::default().generate(2000, 11, streams::TRAIN, &HashSet::new());
    let apr = generate_traces(
        &problems,
        &SolverConfig::Apr(AprSolverConfig::default()),
        11,
        &CharCounter,
    );
    let sosp = generate_traces(
        &problems,
        &SolverConfig::Sosp(SospSolverConfig::default()),
        11,
        &CharCounter,
    );
    let a = TraceStats::of(&apr, &CharCounter);
    let s = TraceStats::of(&sosp, &CharCounter);
    assert!(
        (0.66..=0.76).contains(&a.success_rate),
        "APR success {}",
        a.success_rate
    );
    assert!(
        (5.6..=7.2).contains(&a.children_per_problem.mean),
        "children {}",
        a.children_per_problem.mean
    );
    assert!(
        (0.46..=0.56).contains(&s.success_rate),
        "SoS+ success {}",
        s.success_rate
    );
    assert!(
        a.spawn_rounds[1] > 0.75,
        "most APR problems spawn once: {:?}",
        a.spawn_rounds
    );
    // An SoS+ trace is one call; an APR call is shorter than the record's longest call.
    assert!((s.mean_call_length - s.total_length.mean).abs() < 1e-9 * s.total_length.mean);
    assert!(
        a.mean_call_length > 0.0 && a.mean_call_length < a.longest_thread.mean,
        "mean APR call {} vs longest {}",
        a.mean_call_length,
        a.longest_thread.mean
    );
}

#[test]
fn validation_passes_on_our_output_and_catches_one_character_edits() {
    let records = apr_records(300, 5);
    let summary = validate(&records);
    assert_eq!(summary.inconsistent, 0, "{:?}", summary.mismatches);
    assert_eq!(summary.solved, summary.verified);
    assert!(summary.solved > 150);

    // Alter one character of a child's prompt.
    let mut bad = records.clone();
    let r = bad.iter().position(|r| r.children() > 0).unwrap();
    let child = &mut bad[r].trace_dict.as_mut().unwrap().sub_calls[0][0].main_calls[0];
    let at = child.find("Current State: ").unwrap() + "Current State: ".len();
    child.replace_range(
        at..at + 1,
        if &child[at..at + 1] == "9" { "8" } else { "9" },
    );
    let summary = validate(&bad);
    assert_eq!(summary.inconsistent, 1);
    assert!(
        summary.mismatches[0].contains(&format!("record {r}: main call 0 child 0")),
        "{}",
        summary.mismatches[0]
    );

    // Alter one character of a join block.
    let mut bad = records.clone();
    let dict = bad[r].trace_dict.as_mut().unwrap();
    let call = &mut dict.main_calls[1];
    let at = call.find("<Sub Searches>\n<").unwrap() + "<Sub Searches>\n<".len() + 1;
    call.replace_range(at..at + 1, "X");
    let last = dict.main_calls.len() - 1 == 1;
    if last {
        bad[r].search_path = bad[r].trace_dict.as_ref().unwrap().main_calls[1].clone();
    }
    let summary = validate(&bad);
    assert_eq!(summary.inconsistent, 1);
    assert!(
        summary.mismatches[0].contains("main call 1 differs"),
        "{}",
        summary.mismatches[0]
    );
}

#[test]
fn chunked_validation_equals_one_pass() {
    let mut records = apr_records(120, 6);
    // Two bad records, in different chunks: mismatches keep file order and file indices.
    for r in [17, 95] {
        records[r].search_path.insert(0, 'X');
    }
    let whole = validate(&records);
    assert_eq!(whole.inconsistent, 2, "{:?}", whole.mismatches);
    let mut chunked = Validator::default();
    for chunk in records.chunks(50) {
        chunked.add(chunk);
    }
    let chunked = chunked.finish();
    assert_eq!(chunked, whole);
    assert!(
        chunked.mismatches[0].starts_with("record 17:"),
        "{:?}",
        chunked.mismatches
    );
    assert!(
        chunked.mismatches[1].starts_with("record 95:"),
        "{:?}",
        chunked.mismatches
    );
}

#[test]
fn output_does_not_depend_on_the_thread_count() {
    let problems = ProblemSpec::default().generate(200, 3, streams::TRAIN, &HashSet::new());
    let solver = SolverConfig::Apr(AprSolverConfig::default());
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let a = one.install(|| generate_traces(&problems, &solver, 9, &CharCounter));
    let b = two.install(|| generate_traces(&problems, &solver, 9, &CharCounter));
    assert_eq!(a, b);
    let p1 =
        one.install(|| ProblemSpec::default().generate(300, 4, streams::TRAIN, &HashSet::new()));
    let p2 =
        two.install(|| ProblemSpec::default().generate(300, 4, streams::TRAIN, &HashSet::new()));
    assert_eq!(p1, p2);
}

#[test]
fn sft_views_split_apr_calls_and_prefix_budgets() {
    let records = apr_records(50, 8);
    let r = records.iter().find(|r| r.children() >= 2).unwrap();
    let seqs = sequences(r, Mode::Apr, SftOptions::default(), &CharCounter);
    assert_eq!(seqs.len(), r.calls().len());
    assert_eq!(
        seqs.len(),
        r.trace_dict.as_ref().unwrap().main_calls.len() + r.children()
    );
    assert!(seqs[0]
        .text
        .starts_with("Moving to Node #0\nCurrent State: "));
    assert_eq!(
        &seqs[0].text[..seqs[0].prompt_len],
        apr_countdown::task::root_prompt(&r.problem(), apr_core::Mode::Apr)
    );
    let with_budget = sequences(
        r,
        Mode::Apr,
        SftOptions {
            sub_call_budget: true,
            token_budget: false,
        },
        &CharCounter,
    );
    let n = r.sub_call_count.ceil() as u32;
    assert!(with_budget[0]
        .text
        .starts_with(&format!("Sub Call Budget: {n} Moving to Node #0")));
    // Children carry no prefix; post-join parent calls do, and their join block is marked.
    let parents = r.trace_dict.as_ref().unwrap().main_calls.len();
    let post_join = &with_budget[1];
    assert!(post_join.text.starts_with("Sub Call Budget: "));
    let join = post_join
        .join
        .clone()
        .expect("a post-join call has a join block");
    assert!(post_join.text[join.clone()].starts_with("<Sub Searches>\n"));
    assert!(post_join.text[join.clone()].ends_with("<End Sub Searches>\n"));
    assert!(with_budget[parents].text.starts_with("Moving to Node #0,"));
    assert!(with_budget[parents].child && !post_join.child && !with_budget[0].child);
}

#[test]
#[allow(clippy::single_range_in_vec_init)]
fn loss_placements_mask_what_the_runtime_writes() {
    use apr_countdown::sft::LossPlacement::{All, Generated, Once};
    let records = apr_records(50, 8);
    let r = records.iter().find(|r| r.children() >= 2).unwrap();
    let seqs = sequences(r, Mode::Apr, SftOptions::default(), &CharCounter);
    let parents = r.trace_dict.as_ref().unwrap().main_calls.len();
    let (root, post_join, child) = (&seqs[0], &seqs[1], &seqs[parents]);
    let join = post_join.join.clone().unwrap();
    // The reference trains every token; `mask_prompt` takes the given prompt out.
    for s in [root, post_join, child] {
        assert!(s.untrained(All, false).is_empty());
    }
    assert_eq!(root.untrained(All, true), [0..root.prompt_len]);
    // Generated: a child's prompt and a join block; the root's prompt stays trained.
    assert!(root.untrained(Generated, false).is_empty());
    assert_eq!(post_join.untrained(Generated, false), vec![join.clone()]);
    assert_eq!(
        post_join.untrained(Generated, true),
        [0..post_join.prompt_len, join.clone()]
    );
    assert_eq!(child.untrained(Generated, false), [0..child.prompt_len]);
    // Once: a post-join call learns only what follows its join block.
    assert_eq!(post_join.untrained(Once, false), [0..join.end]);
    assert_eq!(child.untrained(Once, false), [0..child.prompt_len]);
    assert!(root.untrained(Once, false).is_empty());
    // The post-join call's text before the join is the first call's text before its spawn.
    let spawn = root.text.find("<Calling Sub Searches>").unwrap();
    assert_eq!(post_join.text[..join.start], root.text[..spawn]);
    assert_eq!("once".parse(), Ok(Once));
    assert!("none".parse::<apr_countdown::sft::LossPlacement>().is_err());
    let sosp = sequences(
        r,
        Mode::Serial,
        SftOptions {
            sub_call_budget: false,
            token_budget: true,
        },
        &CharCounter,
    );
    assert_eq!(sosp.len(), 1);
    assert!(sosp[0].text.starts_with("Token Budget: "));
}
