//! verdict: access decisions for zero-trust network access gateways.
//! See ARCHITECTURE.md for the code map.

pub mod action;
pub mod api;
pub mod config;
pub mod context;
pub mod engine;
pub mod forward_auth;
pub mod logs;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod policy_files;
pub mod registry;
pub mod rule;
pub mod secret;
pub mod secrets;
pub mod startup;
pub mod store;
pub mod template;
pub mod tokens;
pub mod webhooks;
