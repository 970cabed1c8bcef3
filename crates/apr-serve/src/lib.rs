//! `apr serve`: the OpenAI completions API (as vLLM and SGLang implement it) over any
//! [`apr_core::BatchedDecoder`].
//!
//! * [`api`]: the request and response bodies, validated into [`scheduler::Job`]s.
//! * [`scheduler`]: one engine thread that runs every request's sequences together in batched
//!   steps (continuous batching), keeps finished sequences' KV state in free slots as a prefix
//!   cache (a request that extends one prefills only its new tokens), and applies stop strings.
//! * [`server`]: the HTTP routes (axum on tokio), server-sent events, limits and metrics.
#![warn(missing_docs)]

pub mod api;
pub mod scheduler;
pub mod server;
