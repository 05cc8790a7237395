//! MySQL storage: connection pool, database creation and schema migrations.
//!
//! Guarantee: the schema is the one in `migrations/` (embedded at compile time); applying
//! it is idempotent, and the database is created if missing.

mod migrate;

pub use migrate::{connect, create_database_if_missing, migrate, MIGRATOR};
