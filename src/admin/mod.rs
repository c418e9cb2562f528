//! The admin listener: the Python proxy's JSON API (and, later, the UI).

pub mod api;

use axum::{routing::get, Router};

use crate::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .nest("/api", api::router(state.clone()))
        .route("/healthz", get(crate::healthz))
        .route("/readyz", get(crate::readyz))
        .with_state(state)
}
