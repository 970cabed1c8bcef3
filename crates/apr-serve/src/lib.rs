//! OpenAI-compatible completions, both ways: `apr serve` (the API as vLLM and SGLang implement
//! it, over any [`apr_core::BatchedDecoder`]), and a decoder that lets the APR runtime drive such
//! a server instead of an engine of its own.
//!
//! * [`api`]: the request and response bodies, validated into [`scheduler::Job`]s.
//! * [`scheduler`]: one engine thread that runs every request's sequences together in batched
//!   steps (continuous batching), keeps finished sequences' KV state in free slots as a prefix
//!   cache (a request that extends one prefills only its new tokens), and applies stop strings.
//! * [`server`]: the HTTP routes (axum on tokio), server-sent events, limits and metrics.
//! * [`client`]: [`client::RemoteDecoder`], the runtime's decoder over one or more servers.
#![warn(missing_docs)]

pub mod api;
pub mod client;
pub mod scheduler;
pub mod server;
