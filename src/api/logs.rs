//! Placeholder; filled in by the logs work.

use actix_web::web;

/// Registers this module's routes.
pub fn routes(_cfg: &mut web::ServiceConfig) {}
