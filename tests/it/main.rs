//! One integration-test binary (one link step); modules per area.
mod admin;
mod cluster;
mod common;
mod faults;
mod hostile;
mod metrics;
mod mock;
mod mock_selftest;
mod proxy;
mod quota;
mod quota_suite;
mod ui;
