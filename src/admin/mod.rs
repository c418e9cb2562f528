//! The admin listener: the Python proxy's JSON API under `/api` and the
//! web UI (htmx pages) everywhere else.

pub mod api;
pub mod session;
pub mod ui;

use axum::{routing::get, Router};

use crate::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .nest("/api", api::router(state.clone()))
        .merge(ui::router(state.clone()))
        .route("/healthz", get(crate::healthz))
        .route("/readyz", get(crate::readyz))
        .with_state(state)
}
