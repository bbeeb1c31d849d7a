//! The HTTP surface: routes, roles, error mapping. Handlers parse at the edge and hand
//! typed values to the engine and registry.

pub mod admin;
pub mod decisions;
pub mod error;
pub mod extract;
pub mod logs;
pub mod openapi;
pub mod system;
pub mod webhooks;

use std::sync::Arc;

use actix_web::web;

use crate::config::Settings;
use crate::engine::Engine;
use crate::logs::activity::ActivityWriter;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::Store;
use crate::tokens::TokenSet;

/// What handlers share.
pub struct AppState {
    pub settings: Settings,
    pub tokens: TokenSet,
    pub engine: Arc<Engine>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn Store>,
    pub activity: ActivityWriter,
    /// The webhooks in force, and what builds their events.
    pub webhooks: Arc<crate::webhooks::Webhooks>,
    /// Sends webhook calls (the test endpoint; the delivery loop runs on its own).
    pub deliverer: Arc<crate::webhooks::deliver::Deliverer>,
}

/// Registers every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/decisions", web::post().to(decisions::decide))
        .route("/v1/forward-auth", web::route().to(decisions::forward_auth))
        .route("/v1/parameters", web::get().to(system::parameters))
        .route("/healthz", web::get().to(system::healthz))
        .route("/readyz", web::get().to(system::readyz))
        .route("/metrics", web::get().to(system::metrics))
        .route("/openapi.json", web::get().to(openapi::openapi_json));
    admin::routes(cfg);
    webhooks::routes(cfg);
    logs::routes(cfg);
}
