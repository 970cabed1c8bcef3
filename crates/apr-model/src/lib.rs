//! apr-model
