//! Delay and dead-letter routing (DESIGN.md, "Flow", "Topics and headers").
//!
//! Guarantee: a record leaves the main flow only through a delay or dead-letter topic,
//! carrying its original key and value and Spring Kafka's headers, so it can always be
//! traced back to (and replayed from) its main-topic coordinates.

pub mod headers;
pub mod policy;
pub mod publish;
pub mod trust;
