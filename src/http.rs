//! The HTTP API (axum): scoring, the live model and its reload, health,
//! readiness, metrics and the OpenAPI document. Errors are JSON naming what
//! was wrong.

use crate::ingest::Transaction;
use crate::ingest::decode::{Limits, now_utc};
use crate::model::ModelError;
use crate::model::rules::RuleError;
use crate::model::scorer::{Decision, Reasons, Scorer};
use crate::serve::ServiceState;
use crate::serve::state::HttpScore;
use crate::telemetry::log;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

mod alerts;

pub const OPENAPI: &str = include_str!("openapi.json");
/// Transactions per batch request.
pub const MAX_BATCH: usize = 10_000;

type AppState = Arc<ServiceState>;

pub fn router(shared: AppState) -> Router {
    let limit = shared.settings.max_body_bytes;
    Router::new()
        .route("/v1/score", post(score))
        .route("/v1/score/batch", post(score_batch))
        .route("/v1/model", get(model))
        .route("/v1/model/reload", post(reload))
        .route("/v1/alerts", get(alerts::list))
        .route("/v1/alerts/{alert_id}/decision", post(alerts::decide))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi(&shared.settings)))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(shared.clone(), track))
        .with_state(shared)
}

pub async fn serve(
    shared: AppState,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let app = router(shared);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await;
    if let Err(e) = result {
        log("ERROR", format_args!("HTTP server: {e}"));
    }
}

/// The HTTP API on a runtime of its own. The Kafka partitions' tasks keep
/// the service's runtime busy while they score a backlog; on the same
/// workers, a request (a probe, or a refusal under overload) would wait in
/// their run queue for slices of scoring. On threads of its own it waits
/// only for the operating system's scheduler. Its threads are
/// `http_threads`; see [`Settings::http_threads`](crate::config::Settings).
pub struct HttpServer {
    /// Taken when the server is dropped: see the `Drop` impl.
    runtime: Option<tokio::runtime::Runtime>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Serves on `listener` until `stop` turns true.
    pub fn start(
        shared: AppState,
        listener: tokio::net::TcpListener,
        stop: watch::Receiver<bool>,
    ) -> std::io::Result<HttpServer> {
        // A listener belongs to the runtime that registered it.
        let listener = listener.into_std()?;
        let threads = shared.settings.http_threads();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("http")
            .enable_all()
            .build()?;
        let listener = {
            let _inside = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let task = runtime.spawn(serve(shared, listener, stop));
        Ok(HttpServer {
            runtime: Some(runtime),
            task,
        })
    }

    /// Waits until the server has stopped; dropping it then ends its runtime.
    pub async fn stopped(mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for HttpServer {
    /// Also when a drain past its deadline drops the server unfinished:
    /// dropping a runtime would wait for its tasks, and tokio refuses that
    /// (a panic) on another runtime's thread.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>, field: Option<&str>) -> Response {
    let mut body = json!({ "error": message.into() });
    if let Some(f) = field {
        body["field"] = f.into();
    }
    (status, axum::Json(body)).into_response()
}

fn body_error(e: BytesRejection) -> Response {
    let status = e.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "request body is over the size limit".to_string()
    } else {
        e.body_text()
    };
    error(status, message, None)
}

/// Counts every request by its route and status code, and times it.
async fn track(State(shared): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(req).await;
    let m = &shared.metrics;
    m.http_requests
        .with_label_values(&[&route, response.status().as_str()])
        .inc();
    m.http_seconds
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    response
}

#[derive(Deserialize)]
struct ScoreQuery {
    #[serde(default)]
    update: bool,
}

fn parse_json(body: &[u8]) -> Result<Value, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("request body is not valid JSON: {e}"),
            None,
        ))
    })
}

/// A transaction from a request: the schema, then the amount limit, each
/// refusal naming its field. A time past the clock's allowed skew is not
/// refused, as scoring reads state and changes nothing; it only keeps an
/// update out of the state (the second value says why), as on Kafka.
fn to_transaction(
    v: &Value,
    limits: &Limits,
) -> Result<(Transaction, Option<String>), (String, &'static str)> {
    check_json_types(v)?;
    let tx = Transaction::from_json(v).map_err(|e| (e.to_string(), e.field))?;
    let clock = limits.check_time("timestamp", tx.time.utc, now_utc()).err();
    limits
        .check_amount(&tx)
        .map_err(|(_, detail)| (detail, "amount"))?;
    Ok((tx, clock.map(|(_, detail)| detail)))
}

/// The JSON type of a field the schema in openapi.json names.
#[derive(Clone, Copy)]
enum JsonType {
    /// A string or an integer: ids.
    Id,
    String,
    Number,
    Boolean,
}

/// The known fields' JSON types, as openapi.json gives them. The decoder
/// shared with Kafka also takes a number in a string and the like, as
/// producers vary; an API client is held to the published schema instead.
/// `null` stands for an absent field.
const FIELD_TYPES: [(&str, JsonType); 12] = [
    ("transaction_id", JsonType::Id),
    ("card_id", JsonType::Id),
    ("merchant_id", JsonType::Id),
    ("timestamp", JsonType::String),
    ("amount", JsonType::Number),
    ("currency", JsonType::String),
    ("country", JsonType::String),
    ("mcc", JsonType::String),
    ("channel", JsonType::String),
    ("lat", JsonType::Number),
    ("lon", JsonType::Number),
    ("is_fraud", JsonType::Boolean),
];

fn check_json_types(v: &Value) -> Result<(), (String, &'static str)> {
    let Some(object) = v.as_object() else {
        return Err(("expected a JSON object".to_string(), "transaction"));
    };
    for (field, expected) in FIELD_TYPES {
        let ok = match (object.get(field), expected) {
            (None | Some(Value::Null), _) => true,
            (Some(Value::String(_)), JsonType::Id | JsonType::String) => true,
            (Some(Value::Number(n)), JsonType::Id) => n.is_i64() || n.is_u64(),
            (Some(Value::Number(_)), JsonType::Number) => true,
            (Some(Value::Bool(_)), JsonType::Boolean) => true,
            _ => false,
        };
        if !ok {
            let what = match expected {
                JsonType::Id => "a string or an integer",
                JsonType::String => "a string",
                JsonType::Number => "a number",
                JsonType::Boolean => "true or false",
            };
            return Err((format!("field `{field}`: expected {what}"), field));
        }
    }
    Ok(())
}

/// A scoring's response, serialised straight from its parts: building a
/// `serde_json::Value` first took a third of a request's time.
#[derive(Serialize)]
struct ScoreBody {
    transaction_id: String,
    score: f64,
    anomaly: Option<f64>,
    decision: Decision,
    reasons: Reasons,
    model_version: String,
    /// The model's columns, by name.
    features: serde_json::Map<String, Value>,
    updated: bool,
    update_refused: Option<String>,
}

fn score_body(tx: Transaction, s: HttpScore) -> ScoreBody {
    ScoreBody {
        transaction_id: tx.transaction_id,
        score: s.score.score,
        anomaly: s.score.anomaly,
        decision: s.score.decision,
        reasons: s.score.reasons,
        model_version: s.scorer.model.model_version.clone(),
        features: s.scorer.named_features(&s.features),
        updated: s.updated,
        update_refused: s.update_refused,
    }
}

/// The `update` flag and the JSON body of a scoring request. Updating
/// state needs the admin token: anyone who can reach the API could
/// otherwise write any card's history.
fn scoring_request(
    shared: &ServiceState,
    headers: &HeaderMap,
    query: Result<Query<ScoreQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(bool, Value), Box<Response>> {
    let Query(q) = query.map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            e.body_text(),
            Some("update"),
        ))
    })?;
    if q.update {
        authorize(shared, headers, "updates over HTTP")?;
    }
    let body = body.map_err(|e| Box::new(body_error(e)))?;
    Ok((q.update, parse_json(&body)?))
}

async fn score(
    State(shared): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ScoreQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (update, v) = match scoring_request(&shared, &headers, query, body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let (tx, clock) = match to_transaction(&v, &Limits::of(&shared.settings)) {
        Ok(t) => t,
        Err((msg, field)) => return error(StatusCode::UNPROCESSABLE_ENTITY, msg, Some(field)),
    };
    let body = admitted(&shared, Run::Here, move |s| {
        let r = scored(s, &tx, update, clock);
        score_body(tx, r)
    })
    .await;
    match body {
        Ok(b) => axum::Json(b).into_response(),
        Err(r) => r,
    }
}

/// Scores `tx`, updating state only if asked and the clock allows.
fn scored(s: &ServiceState, tx: &Transaction, update: bool, clock: Option<String>) -> HttpScore {
    let mut r = s.score(tx, update && clock.is_none());
    if update && clock.is_some() {
        r.update_refused = clock;
    }
    r
}

/// How a request's scoring runs once admitted.
enum Run {
    /// On the async worker that took the request: one transaction's
    /// scoring takes microseconds, less than handing it to another thread.
    Here,
    /// On the blocking pool: a batch may take a worker for milliseconds.
    Blocking,
}

/// Admits a scoring request, then runs it. Admission is bounded twice:
/// past `http_max_concurrency` requests in progress a request is refused
/// at once, and one that waits for a scoring slot longer than
/// `http_timeout_ms` is refused then; both get 503 with `Retry-After`, so
/// an overload is shed instead of queued without end. The slots (half the
/// cores) keep HTTP scoring from taking every core from the Kafka
/// partitions' tasks and the probes.
async fn admitted<T: Send + 'static>(
    shared: &AppState,
    run: Run,
    work: impl FnOnce(&ServiceState) -> T + Send + 'static,
) -> Result<T, Response> {
    let Ok(_admitted) = shared.http_admission().try_acquire() else {
        return Err(shed(shared, "concurrency"));
    };
    let slot = match shared.http_scoring_slots().try_acquire() {
        Ok(slot) => slot,
        Err(_) => {
            let wait = std::time::Duration::from_millis(shared.settings.http_timeout_ms);
            match tokio::time::timeout(wait, shared.http_scoring_slots().acquire()).await {
                Ok(Ok(slot)) => slot,
                Ok(Err(_)) => {
                    return Err(error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the service is stopping",
                        None,
                    ));
                }
                Err(_) => return Err(shed(shared, "timeout")),
            }
        }
    };
    match run {
        Run::Here => {
            let out = work(shared);
            drop(slot);
            Ok(out)
        }
        Run::Blocking => {
            let state = shared.clone();
            let out = tokio::task::spawn_blocking(move || work(&state)).await;
            drop(slot);
            out.map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None))
        }
    }
}

fn shed(shared: &ServiceState, reason: &str) -> Response {
    shared.metrics.http_shed.with_label_values(&[reason]).inc();
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("overloaded ({reason}); retry later"),
        None,
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, "1".parse().expect("static header"));
    r
}

/// A JSON array of transactions, or `{"transactions": [...]}`; scored in order.
async fn score_batch(
    State(shared): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ScoreQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (update, v) = match scoring_request(&shared, &headers, query, body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let items = match &v {
        Value::Array(a) => a,
        Value::Object(o) => match o.get("transactions") {
            Some(Value::Array(a)) => a,
            _ => {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "expected an array of transactions",
                    Some("transactions"),
                );
            }
        },
        _ => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "expected an array of transactions",
                Some("transactions"),
            );
        }
    };
    if items.len() > MAX_BATCH {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} transactions is over the limit of {MAX_BATCH}",
                items.len()
            ),
            Some("transactions"),
        );
    }
    // All are checked before any is applied, so a bad item changes no state.
    let mut txs = Vec::with_capacity(items.len());
    let limits = Limits::of(&shared.settings);
    for (i, item) in items.iter().enumerate() {
        match to_transaction(item, &limits) {
            Ok(t) => txs.push(t),
            Err((msg, field)) => {
                let r = json!({
                    "error": format!("transaction {i}: {msg}"),
                    "field": field,
                    "index": i,
                });
                return (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(r)).into_response();
            }
        }
    }
    let results = admitted(&shared, Run::Blocking, move |s| {
        txs.into_iter()
            .map(|(tx, clock)| {
                let r = scored(s, &tx, update, clock);
                score_body(tx, r)
            })
            .collect::<Vec<ScoreBody>>()
    })
    .await;
    match results {
        Ok(results) => axum::Json(Results { results }).into_response(),
        Err(r) => r,
    }
}

#[derive(Serialize)]
struct Results {
    results: Vec<ScoreBody>,
}

fn model_body(scorer: &Scorer) -> Value {
    let m = &scorer.model;
    json!({
        "model_version": m.model_version,
        "algo": m.algo.as_str(),
        "features": m.features,
        "feature_config": m.feature_config,
        "training": m.training,
        "metrics": m.metrics,
        "created_at": m.created_at,
        "thresholds": scorer.thresholds,
        "rules": scorer.rules.rules.iter().map(|r| json!({
            "name": r.name,
            "severity": r.severity,
        })).collect::<Vec<_>>(),
    })
}

async fn model(State(shared): State<AppState>) -> Response {
    axum::Json(model_body(&shared.scorer())).into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReloadRequest {
    model: Option<PathBuf>,
    rules: Option<PathBuf>,
}

/// Whether `given` is the secret, in time that depends on neither where
/// the first difference is nor the secret's length: every byte given is
/// compared, against the secret repeated, and the lengths last.
fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    if secret.is_empty() {
        return false;
    }
    let mut diff = given.len() ^ secret.len();
    for (i, g) in given.iter().enumerate() {
        diff |= usize::from(g ^ secret[i % secret.len()]);
    }
    std::hint::black_box(diff) == 0
}

/// A request body that must be a JSON object, read into `T`. Through a
/// map: serde would also take a struct from an array.
fn from_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    let object = serde_json::from_slice::<serde_json::Map<String, Value>>(body)?;
    serde_json::from_value(Value::Object(object))
}

/// The admin bearer token's check: 401 without valid credentials (with
/// `WWW-Authenticate`), 403 when no token is configured at all.
fn authorize(shared: &ServiceState, headers: &HeaderMap, what: &str) -> Result<(), Box<Response>> {
    let admin = shared.settings.admin_token.as_deref();
    check_bearer(headers, what, &[admin], ("an admin", "admin_token"))
}

/// [`authorize`] for any of `tokens` (those configured); `who` names them
/// in the refusal.
fn check_bearer(
    headers: &HeaderMap,
    what: &str,
    tokens: &[Option<&str>],
    (who, keys): (&str, &str),
) -> Result<(), Box<Response>> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let configured: Vec<&str> = tokens.iter().flatten().copied().collect();
    if configured.is_empty() {
        if given.is_none() {
            return Err(Box::new(unauthorized(who)));
        }
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            format!("{what} are disabled: no {keys} is configured"),
            None,
        )));
    }
    // Every token is compared, so the time taken tells nothing of which.
    let matched = given.is_some_and(|g| {
        configured
            .iter()
            .fold(false, |ok, t| same_secret(g.as_bytes(), t.as_bytes()) | ok)
    });
    if matched {
        Ok(())
    } else {
        Err(Box::new(unauthorized(who)))
    }
}

fn unauthorized(who: &str) -> Response {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        format!("a valid bearer token ({who} token) is required"),
        Some("Authorization"),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        "Bearer".parse().expect("static header"),
    );
    r
}

/// A path given to a reload, inside `models_dir` once resolved: relative
/// paths are taken from there, and no `..` or link may lead outside it.
/// A file that is not there, or not inside, is not found (404), so the
/// answer tells nothing of the rest of the disk.
fn in_models_dir(dir: &Path, given: &Path, field: &str) -> Result<PathBuf, Box<Response>> {
    if given
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("`{field}` must not contain `..`"),
            Some(field),
        )));
    }
    let root = dir.canonicalize().map_err(|e| {
        Box::new(error(
            StatusCode::FORBIDDEN,
            format!(
                "models_dir {} cannot be read ({}); reloads of files are off",
                dir.display(),
                e.kind()
            ),
            Some(field),
        ))
    })?;
    let not_found = || {
        Box::new(error(
            StatusCode::NOT_FOUND,
            format!("no file {} in models_dir", given.display()),
            Some(field),
        ))
    };
    let path = root.join(given).canonicalize().map_err(|_| not_found())?;
    if !path.starts_with(&root) || !path.is_file() {
        return Err(not_found());
    }
    Ok(path)
}

/// What a client is told of a failed reload: which file and where, never
/// the file's text (the log has the whole cause for the operator).
fn reload_failure(e: &anyhow::Error) -> String {
    for cause in e.chain() {
        if let Some(r) = cause.downcast_ref::<RuleError>() {
            return format!(
                "the rules file is not valid at line {}, column {}",
                r.line, r.column
            );
        }
        if let Some(m) = cause.downcast_ref::<ModelError>() {
            return match m {
                ModelError::Io { path, source } => {
                    format!("cannot read model {path}: {}", source.kind())
                }
                ModelError::Invalid { path, .. } => {
                    format!("model {path} is not a valid model file")
                }
                ModelError::FeatureMismatch { path, .. } => {
                    format!("model {path} was trained on features that differ from this engine's")
                }
            };
        }
    }
    // Our own messages (thresholds, feature configuration): no file text.
    e.to_string()
}

async fn reload(
    State(shared): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = authorize(&shared, &headers, "reloads") {
        return *r;
    }
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    let req: ReloadRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReloadRequest::default()
    } else {
        match from_object(&body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid reload request: {e}"),
                    None,
                );
            }
        }
    };
    let dir = &shared.settings.models_dir;
    let resolve =
        |given: Option<PathBuf>, field| given.map(|p| in_models_dir(dir, &p, field)).transpose();
    let (model, rules) = match (resolve(req.model, "model"), resolve(req.rules, "rules")) {
        (Ok(m), Ok(r)) => (m, r),
        (Err(e), _) | (_, Err(e)) => return *e,
    };
    let result = {
        let shared = shared.clone();
        tokio::task::spawn_blocking(move || shared.reload(model.as_deref(), rules.as_deref())).await
    };
    match result {
        Ok(Ok(scorer)) => {
            axum::Json(json!({ "reloaded": true, "model": model_body(&scorer) })).into_response()
        }
        Ok(Err(e)) => {
            log("WARN", format_args!("model reload rejected: {e:#}"));
            error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{}; the previous model stays live", reload_failure(&e)),
                None,
            )
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None),
    }
}

async fn healthz() -> Response {
    axum::Json(json!({ "status": "alive" })).into_response()
}

async fn readyz(State(shared): State<AppState>) -> Response {
    let r = shared.readiness();
    let body = json!({
        "ready": r.ready,
        "waiting_for": r.waiting_for,
        "kafka": shared.settings.kafka_enabled,
        "partitions": shared.metrics.partitions.get(),
        "model_version": shared.scorer().model.model_version,
    });
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(shared): State<AppState>) -> Response {
    shared.refresh_gauges();
    shared.readiness();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(),
    )
        .into_response()
}

/// The API's description, with this server's limits in the schema, so
/// that a client (or a contract test) knows what it accepts; rendered once.
fn openapi(
    settings: &crate::config::Settings,
) -> impl Fn() -> std::future::Ready<Response> + Clone + use<> {
    let mut doc: Value = serde_json::from_str(OPENAPI).expect("the embedded OpenAPI is JSON");
    doc["components"]["schemas"]["Transaction"]["properties"]["amount"]["maximum"] =
        json!(settings.max_amount);
    let body = axum::body::Bytes::from(doc.to_string());
    move || {
        let headers = [(header::CONTENT_TYPE, "application/json")];
        std::future::ready((headers, body.clone()).into_response())
    }
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such route; see /openapi.json",
        None,
    )
}
