//! apr-model (under construction).
pub use burn;
