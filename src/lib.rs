//! im-ingest: an idempotent Kafka consumer that stores chat messages, customers and
//! sessions in MySQL exactly once in effect.
//!
//! The library holds all logic; the `im-ingest` binary is a thin wrapper around
//! [`cli::run`]. See docs/DESIGN.md for the architecture and the public contract.

pub mod admin;
pub mod adopt;
pub mod bench;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod failpoint;
pub mod fnv;
pub mod health;
pub mod lock;
pub mod message;
pub mod metrics_catalog;
pub mod pipeline;
pub mod preflight;
pub mod redis_client;
pub mod replay;
pub mod retry;
pub mod secret;
pub mod store;
pub mod telemetry;
pub mod topic_reader;
pub mod unread;
pub mod verify;
pub mod worker;
