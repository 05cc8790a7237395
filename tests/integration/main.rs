//! Integration tests against real services: Apache Kafka, MariaDB and Redis as started by
//! `scripts/stack.sh up` (or any servers given by the `IM_TEST_*` variables in
//! `helpers`). Every test uses its own database, topics and consumer group, so the
//! suite runs in parallel.

mod admin;
mod adopt;
mod cli_config;
// Needs the binary built with the fail points: `cargo test --features failpoints`.
#[cfg(feature = "failpoints")]
mod crash_points;
mod db_proxy;
mod dead_letters;
mod deploy;
mod faults;
mod group;
mod helpers;
#[cfg(feature = "failpoints")]
mod in_flight;
mod isolation;
mod kafka_offsets;
mod kafka_util;
mod lock;
#[cfg(feature = "failpoints")]
mod lock_hold;
#[cfg(feature = "failpoints")]
mod partition_state;
mod pipeline;
mod replay;
mod retries;
mod retry_headers;
mod schema;
mod secure;
mod secure_acl;
#[cfg(feature = "failpoints")]
mod shutdown;
mod stack_script;
mod store_write;
mod unread;
mod unread_store;
mod verify;
mod worker;
