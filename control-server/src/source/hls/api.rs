//! The operator's API for pulls (behind the operator token, like every `/api/operator/` path):
//!
//! | route | what |
//! |---|---|
//! | `POST /api/operator/pull` `{"channel", "url", "rendition"?}` | start pulling (201), 409 if the channel has a source |
//! | `DELETE /api/operator/pull/{channel}` | stop it (the channel and its window stay) |
//! | `GET /api/operator/pulls` | every pull's status and counters |

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{PullStartError, RenditionChoice};
use crate::AppState;

#[derive(Debug, Deserialize)]
struct PullRequest {
    channel: String,
    url: String,
    #[serde(default)]
    rendition: Option<String>,
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn start_pull(State(state): State<AppState>, Json(req): Json<PullRequest>) -> Response {
    let rendition = match req.rendition.as_deref().map(str::parse::<RenditionChoice>) {
        None => RenditionChoice::default(),
        Some(Ok(r)) => r,
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match super::start(&state, &req.channel, &req.url, rendition) {
        Ok(status) => (StatusCode::CREATED, Json(json!({ "pull": status.view() }))).into_response(),
        Err(e @ PullStartError::SourceAttached(_)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ PullStartError::Client(_)) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn stop_pull(State(state): State<AppState>, Path(channel): Path<String>) -> Response {
    match state.pulls.stop(&channel).await {
        Some(status) => Json(json!({ "pull": status.view() })).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("channel {channel:?} has no pull"),
        ),
    }
}

async fn list_pulls(State(state): State<AppState>) -> Response {
    let pulls: Vec<_> = state.pulls.all().iter().map(|p| p.view()).collect();
    Json(json!({ "pulls": pulls })).into_response()
}

/// The routes above (merged into the operator routes).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/operator/pull", post(start_pull))
        .route("/api/operator/pull/{channel}", delete(stop_pull))
        .route("/api/operator/pulls", get(list_pulls))
}
