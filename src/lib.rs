//! Peregrine: real-time card-fraud and anomaly scoring.
//!
//! The data flow is the module layout: [`ingest`] reads transactions,
//! [`features`] keeps per-card and per-merchant windows, [`model`] scores
//! with reasons, and [`backtest`] drives files through all of it for
//! training, evaluation and replay. [`serve`] runs the same engine as a
//! service, with [`http`] and [`metrics`] at its edge.

pub mod alerts;
pub mod backtest;
pub mod config;
pub mod evaluate;
pub mod features;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod rng;
pub mod serve;
pub mod sim;
pub mod telemetry;
