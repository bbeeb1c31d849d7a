//! One integration-test binary: a module per area, sharing `helpers`.

mod decisions;
mod helpers;
