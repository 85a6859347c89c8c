//! xsrec: cross-session next-item recommendation.
//!
//! Data flows one way: events (`data`) → model input (`model`) → training (`train`) and
//! offline evaluation (`eval`).
pub mod api;
pub mod bench;
pub mod cli;
pub mod data;
pub mod durable;
pub mod eval;
pub mod grpc;
pub mod health;
pub mod history;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod recommend;
pub mod serve;
pub mod threads;
pub mod train;
