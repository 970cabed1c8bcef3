//! The Countdown environment of APR (spec §1–3): problems, the strict verifier and reward, the
//! SoS+ and APR symbolic solvers that write training traces byte-identical to the reference's,
//! trace records and their statistics, SFT views, and dataset validation.
//!
//! It depends only on `apr-core`, so it can generate data for any trainer:
//!
//! ```
//! use apr_countdown::{problem::ProblemSpec, record::*};
//! let problems = ProblemSpec::default().generate(3, 42, 1, &Default::default());
//! let traces = generate_traces(&problems, &SolverConfig::Apr(AprSolverConfig::default()), 42, &CharCounter);
//! assert_eq!(traces.len(), 3);
//! ```
#![warn(missing_docs)]

pub mod arith;
pub mod io;
pub mod problem;
pub mod pyrand;
pub mod record;
pub mod search;
pub mod sft;
pub mod stats;
pub mod task;
pub mod validate;
pub mod verify;

pub use problem::{Problem, ProblemSpec};
pub use record::{SolverConfig, TraceRecord};
pub use task::CountdownTask;
