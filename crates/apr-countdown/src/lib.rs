//! apr-countdown
