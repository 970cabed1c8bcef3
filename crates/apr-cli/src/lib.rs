//! apr-cli
