//! The baseline of `scripts/bench-service` section 3: the least an HTTP
//! scoring endpoint can do with axum on this machine. It parses the same
//! JSON, computes the features of a card with no history and scores them
//! with the built-in model, on a runtime built as `peregrine serve` builds its own; no
//! state, metrics, admission control or limits. `/v1/score` is measured
//! against it in the same run.
//!
//! ```sh
//! cargo run --release --example bare_score -- 127.0.0.1:8090
//! ```

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use peregrine::features::Engine;
use peregrine::features::merchant::MerchantView;
use peregrine::ingest::Transaction;
use serde_json::{Value, json};
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into());
    let scorer = Arc::new(peregrine::model::builtin::scorer()?);
    let engine = Arc::new(Engine::new(scorer.model.feature_config));
    let app = Router::new().route(
        "/v1/score",
        post(move |body: Bytes| async move {
            let tx = serde_json::from_slice::<Value>(&body)
                .map_err(|e| e.to_string())
                .and_then(|v| Transaction::from_json(&v).map_err(|e| e.to_string()));
            let tx = match tx {
                Ok(tx) => tx,
                Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
            };
            let features = engine.peek_card(&tx, MerchantView::default(), None);
            let s = scorer.score(&features, true);
            let body: Response = axum::Json(json!({
                "transaction_id": tx.transaction_id,
                "score": s.score,
                "decision": s.decision,
                "reasons": s.reasons,
                "features": features.to_json(),
            }))
            .into_response();
            body
        }),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("bare_score listening on {}", listener.local_addr()?);
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })
}
