//! The shipped APR model and its card, shared by the tests that run it.
#![allow(dead_code)] // each test file uses a subset

use std::path::PathBuf;

use apr_countdown::problem::{train_val_split, ProblemSpec};
use apr_countdown::Problem;

/// `models/apr-sft`.
pub fn shipped_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/apr-sft")
}

/// The shipped model's card.
pub fn card() -> serde_json::Value {
    let text = std::fs::read_to_string(shipped_dir().join("card.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The held-out problems its card names (the data it was not trained on).
pub fn held_out(card: &serde_json::Value) -> Vec<Problem> {
    let data = &card["data"];
    let count = |key: &str| {
        data[key]
            .as_u64()
            .unwrap_or_else(|| panic!("card: data.{key}"))
    };
    let spec = ProblemSpec {
        numbers: count("numbers") as usize,
        max_target: count("max_target") as i64,
    };
    let (_, val) = train_val_split(
        &spec,
        count("train_problems") as usize,
        count("val_problems") as usize,
        count("seed"),
    );
    val
}
