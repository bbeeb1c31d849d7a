//! The audit log's hash chain and the activity log's group-commit writer.
//!
//! Storage of both logs lives in [`crate::store`]; this module holds what is the same
//! whichever store is used.

pub mod activity;
pub mod audit;
