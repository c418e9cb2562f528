//! One integration-test binary (one link step); modules per area.
mod mock;
mod mock_selftest;
