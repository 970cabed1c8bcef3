//! Summary statistics of a trace set (spec §3.4's table).

use serde::Serialize;

use crate::record::TraceRecord;

/// Mean, median and maximum of a quantity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub median: f64,
    /// Maximum.
    pub max: f64,
}

impl Summary {
    /// Summarises values (all zero when empty).
    pub fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Summary::default();
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Summary {
            mean: values.iter().sum::<f64>() / n as f64,
            median,
            max: values[n - 1],
        }
    }
}

/// Statistics of a set of trace records.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TraceStats {
    /// Records.
    pub records: usize,
    /// Fraction solved.
    pub success_rate: f64,
    /// Fraction of records with 0, 1, 2 and 3 or more spawn rounds (APR).
    pub spawn_rounds: [f64; 4],
    /// Child threads per problem.
    pub children_per_problem: Summary,
    /// Longest single call (the unit of the records: characters or tokens).
    pub longest_thread: Summary,
    /// Total length with repeated parent prefixes counted once.
    pub total_length: Summary,
}

impl TraceStats {
    /// Computes the statistics.
    pub fn of(records: &[TraceRecord]) -> Self {
        let n = records.len().max(1) as f64;
        let mut rounds = [0.0; 4];
        for r in records {
            rounds[r.spawn_rounds().min(3)] += 1.0 / n;
        }
        TraceStats {
            records: records.len(),
            success_rate: records.iter().filter(|r| r.solved()).count() as f64 / n,
            spawn_rounds: rounds,
            children_per_problem: Summary::of(
                records.iter().map(|r| r.children() as f64).collect(),
            ),
            longest_thread: Summary::of(
                records.iter().map(|r| r.longest_seq_token_count).collect(),
            ),
            total_length: Summary::of(records.iter().map(|r| r.token_count).collect()),
        }
    }
}
