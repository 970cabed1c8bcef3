//! Parsers for numeric flags. Each states its range and why, so that no value a user can type
//! reaches a panic, an abort or a meaningless run: it is refused at parse time in one line.

use std::ops::RangeInclusive;

fn whole(s: &str, range: RangeInclusive<u64>, why: &str) -> Result<usize, String> {
    let v: u64 = s
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if !range.contains(&v) {
        return Err(format!(
            "{v} is outside {}..={} ({why})",
            range.start(),
            range.end()
        ));
    }
    usize::try_from(v).map_err(|_| format!("{v} does not fit this machine's sizes"))
}

fn real(s: &str, range: RangeInclusive<f64>, why: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !v.is_finite() || !range.contains(&v) {
        return Err(format!(
            "{v} is outside {}..={} ({why})",
            range.start(),
            range.end()
        ));
    }
    Ok(v)
}

/// Engine slots: each holds one thread's KV cache.
pub fn slots(s: &str) -> Result<usize, String> {
    whole(s, 1..=4096, "each slot holds a thread's KV cache")
}

/// Samples per problem, GRPO group size, prompts per step.
pub fn samples(s: &str) -> Result<usize, String> {
    whole(s, 1..=4096, "samples of one problem")
}

/// A per-thread context in tokens.
pub fn context(s: &str) -> Result<usize, String> {
    whole(
        s,
        2..=apr_model::config::MAX_SEQ_LEN as u64,
        "a thread needs BOS and one token; the model's positions end at its max_seq_len",
    )
}

/// A number of optimizer steps, of warm-up steps or of something counted per step.
pub fn steps(s: &str) -> Result<usize, String> {
    whole(s, 1..=100_000_000, "steps")
}

/// A count that may be zero (warm-up steps, held-out problems, "every N steps" with 0 = never).
pub fn count(s: &str) -> Result<usize, String> {
    whole(s, 0..=100_000_000, "a count")
}

/// A number of problems to generate or read.
pub fn problems(s: &str) -> Result<usize, String> {
    whole(s, 1..=1_000_000_000, "problems")
}

/// Tokens in a batch or a budget.
pub fn tokens(s: &str) -> Result<usize, String> {
    whole(s, 1..=1_000_000_000_000, "tokens")
}

/// Worker threads.
pub fn threads(s: &str) -> Result<usize, String> {
    whole(s, 1..=1024, "worker threads")
}

/// A learning rate.
pub fn learning_rate(s: &str) -> Result<f64, String> {
    let v = real(s, 0.0..=1.0, "a learning rate")?;
    if v == 0.0 {
        return Err("a learning rate of 0 trains nothing".into());
    }
    Ok(v)
}

/// A non-negative coefficient (KL β, a minimum learning rate).
pub fn coefficient(s: &str) -> Result<f64, String> {
    real(s, 0.0..=1000.0, "a non-negative coefficient")
}

/// A sampling temperature (0 = greedy).
pub fn temperature(s: &str) -> Result<f32, String> {
    real(s, 0.0..=100.0, "0 is greedy; logits are divided by it").map(|v| v as f32)
}

/// Seconds of wall clock (positive, at most a year).
pub fn seconds(s: &str) -> Result<f64, String> {
    let v = real(s, 0.0..=31_536_000.0, "seconds, at most a year")?;
    if v == 0.0 {
        return Err("a timeout of 0 s stops everything at once".into());
    }
    Ok(v)
}

/// Gigabytes of memory (`--max-memory`).
pub fn gigabytes(s: &str) -> Result<f64, String> {
    let v = real(s, 0.0..=1e6, "gigabytes")?;
    if v == 0.0 {
        return Err("0 GB holds nothing".into());
    }
    Ok(v)
}

/// The default memory limit: 90% of this machine's RAM (`MemTotal`), or none if unknown.
pub fn default_memory_limit() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(0.9 * kb * 1024.0 / 1e9)
}

/// Refuses, before anything is allocated, a run whose KV caches could outgrow the memory limit
/// (`--max-memory` GB, default 90% of RAM): `slots` threads of `context` tokens of this model.
pub fn check_kv_memory(
    config: &apr_model::ModelConfig,
    slots: usize,
    context: usize,
    max_memory: Option<f64>,
) -> anyhow::Result<()> {
    let Some(limit) = max_memory.or_else(default_memory_limit) else {
        return Ok(());
    };
    let need = config.kv_cache_bytes(slots, context) as f64 / 1e9;
    if need > limit {
        anyhow::bail!(
            "{slots} slots of {context} tokens can hold {need:.1} GB of KV cache for this model,              above the memory limit of {limit:.1} GB (--max-memory; default 90% of RAM): use              fewer --slots or a shorter --context"
        );
    }
    Ok(())
}

/// `--solver`, `--view`, `--mode`: APR or SoS+, one [`Mode`](apr_core::Mode) for every command.
/// `serial` and `sosp` name the same mode; `serial_name` is the one this flag lists.
pub fn mode(
    serial_name: &'static str,
) -> impl clap::builder::TypedValueParser<Value = apr_core::Mode> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    let other = if serial_name == "serial" {
        "sosp"
    } else {
        "serial"
    };
    PossibleValuesParser::new([
        PossibleValue::new("apr").help("Adaptive Parallel Reasoning: parents spawn child threads"),
        PossibleValue::new(serial_name)
            .alias(other)
            .help("Stream of Search+ (SoS+): one serial thread per problem"),
    ])
    .try_map(|s| s.parse::<apr_core::Mode>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_a_user_can_type_are_refused_in_one_line() {
        for bad in ["-1", "nan", "inf", "1e300", "", "abc"] {
            assert!(seconds(bad).is_err(), "{bad}");
        }
        assert!(slots("18446744073709551615").is_err());
        assert!(slots("10000000000").is_err());
        assert!(slots("0").is_err());
        assert_eq!(slots("64"), Ok(64));
        assert!(context("0").is_err() && context("1").is_err());
        assert!(threads("100000").is_err());
        assert!(learning_rate("-1").is_err() && learning_rate("0").is_err());
        assert!(temperature("-1").is_err());
        assert!(coefficient("-1").is_err());
        assert_eq!(count("0"), Ok(0));
        assert_eq!(tokens("1_000"), Ok(1000));
        let msg = slots("0").unwrap_err();
        assert!(msg.contains("1..=4096") && !msg.contains('\n'), "{msg}");
    }
}
