//! apr-rl
