//! MySQL storage: connections (URL, password, TLS), database creation, schema migrations, and the
//! idempotent message write.
//!
//! Guarantee: the schema is the one in `migrations/` (embedded at compile time); applying
//! it is idempotent, and the database is created if missing. Writes never duplicate a
//! customer, session or message (see `write`, and `batch` for many messages in one
//! transaction); a batch's write is bounded in time (see `bounded`).

mod batch;
mod bounded;
mod connect;
mod keys;
mod migrate;
mod profile;
mod unread;
mod write;

pub(crate) use batch::{derive_expiry, write_unchecked};
pub use batch::{BatchItem, BatchWritten, ConversationUnread, UnreadRules};
pub use bounded::{write_batch, BatchConnection, BatchWriteError};
pub use connect::{connect, connect_for_writes, connect_server};
pub use keys::{
    require_natural_keys, Catalog, KeyProblem, NaturalKey, ADOPT_MARKER, BINARY_COLLATION,
    NAMED_INDEXES, NATURAL_KEYS,
};
pub use migrate::{create_database_if_missing, migrate, MIGRATOR};
pub use write::{
    is_refusal, is_retryable, mysql_error_number, write_message, Provenance, WriteOutcome,
};
