//! The analysts' routes, over the alert store: the alerts, newest first,
//! and a decision on one, which also becomes a label.

use super::{AppState, check_bearer, error, from_object};
use crate::alerts::store::{AlertQuery, Outcome};
use crate::ingest::time::parse_timestamp;
use crate::serve::decisions::{AlertDesk, DecisionError};
use crate::telemetry::log;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

/// Alerts a list returns at most.
pub const MAX_LIMIT: i64 = 1000;
const MAX_TEXT: usize = 256;
const MAX_NOTE: usize = 4000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    card_id: Option<String>,
    decision: Option<String>,
    since: Option<String>,
    limit: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionRequest {
    outcome: Outcome,
    analyst: String,
    #[serde(default)]
    note: Option<String>,
}

fn authorize(shared: &AppState, headers: &HeaderMap, what: &str) -> Result<(), Box<Response>> {
    let s = &shared.settings;
    check_bearer(
        headers,
        what,
        &[s.analyst_token.as_deref(), s.admin_token.as_deref()],
        ("an analyst or admin", "analyst_token or admin_token"),
    )
}

fn desk(shared: &AppState) -> Result<Arc<AlertDesk>, Box<Response>> {
    shared.desk().cloned().ok_or_else(|| {
        let why = if shared.settings.postgres.is_some() {
            "the alert store is not open yet (see the log); try again"
        } else {
            "no alert store is configured: set postgres (serve --postgres URL)"
        };
        Box::new(error(StatusCode::SERVICE_UNAVAILABLE, why, None))
    })
}

/// 503 for a store that failed: the detail (server messages, hosts) goes
/// to the log, not to the client.
fn unavailable(e: impl std::fmt::Display) -> Response {
    log("WARN", format_args!("alert store: {e}"));
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the alert store is unavailable; the service log says why",
        None,
    )
}

fn bad(field: &str, message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, message, Some(field))
}

/// `GET /v1/alerts?card_id=&decision=&since=&limit=`.
pub async fn list(
    State(shared): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    if let Err(r) = authorize(&shared, &headers, "alert reads") {
        return *r;
    }
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text(), None),
    };
    let mut filter = AlertQuery {
        limit: q.limit.unwrap_or(100),
        ..AlertQuery::default()
    };
    if !(1..=MAX_LIMIT).contains(&filter.limit) {
        return bad("limit", format!("limit must be 1 to {MAX_LIMIT}"));
    }
    if let Some(c) = q.card_id.filter(|c| !c.is_empty()) {
        if c.len() > MAX_TEXT || c.contains('\0') {
            return bad("card_id", format!("card_id: 1 to {MAX_TEXT} bytes, no NUL"));
        }
        filter.card_id = Some(c);
    }
    match q.decision.as_deref() {
        None => {}
        Some(d @ ("review" | "block" | "allow")) => filter.decision = Some(d.to_string()),
        Some(d @ ("fraud" | "legit" | "undecided")) => filter.outcome = Some(d.to_string()),
        Some(d) => {
            return bad(
                "decision",
                format!(
                    "decision {d:?}: expected the model's (review, block) or the analyst's \
                     (fraud, legit, undecided)"
                ),
            );
        }
    }
    if let Some(s) = q.since {
        match parse_timestamp(s.as_bytes()) {
            Some(t) => filter.since = Some(t.utc),
            None => return bad("since", "since: expected an RFC 3339 timestamp"),
        }
    }
    let desk = match desk(&shared) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    match desk.alerts(&filter).await {
        Ok(alerts) => axum::Json(json!({ "alerts": alerts })).into_response(),
        Err(e) => unavailable(e),
    }
}

/// `POST /v1/alerts/{alert_id}/decision`.
pub async fn decide(
    State(shared): State<AppState>,
    headers: HeaderMap,
    Path(alert_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = authorize(&shared, &headers, "decisions") {
        return *r;
    }
    let body = match body {
        Ok(b) => b,
        Err(e) => return error(e.status(), e.body_text(), None),
    };
    let req: DecisionRequest = match from_object(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid decision: {e}; expected {{\"outcome\": \"fraud\"|\"legit\", \"analyst\": \"...\", \"note\": \"...\"}}"
                ),
                None,
            );
        }
    };
    // PostgreSQL's text holds no NUL: refused here, named, not a 503 later.
    let fits = |t: &str, max: usize| !t.is_empty() && t.len() <= max && !t.contains('\0');
    if !fits(&alert_id, MAX_TEXT) {
        return bad(
            "alert_id",
            format!("alert_id: 1 to {MAX_TEXT} bytes, no NUL"),
        );
    }
    let analyst = req.analyst.as_str();
    if !fits(analyst, MAX_TEXT) {
        return bad("analyst", format!("analyst: 1 to {MAX_TEXT} bytes, no NUL"));
    }
    if let Some(note) = req.note.as_deref().filter(|n| !n.is_empty())
        && !fits(note, MAX_NOTE)
    {
        return bad("note", format!("note: at most {MAX_NOTE} bytes, no NUL"));
    }
    let desk = match desk(&shared) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let decided = desk
        .decide(
            &alert_id,
            req.outcome,
            analyst,
            req.note.as_deref(),
            &shared.metrics,
        )
        .await;
    match decided {
        Ok(label) => axum::Json(json!({
            "alert_id": alert_id,
            "outcome": req.outcome,
            "analyst": analyst,
            "label": label.as_str(),
        }))
        .into_response(),
        Err(DecisionError::NotFound(id)) => error(
            StatusCode::NOT_FOUND,
            format!("no alert {id} in the alert store"),
            Some("alert_id"),
        ),
        Err(e @ DecisionError::Label { .. }) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None)
        }
        Err(DecisionError::Store(e)) => unavailable(e),
    }
}
