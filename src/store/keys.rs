//! The natural unique keys the exactly-once guarantee rests on, and whether a database
//! has them.
//!
//! Guarantee: [`require_natural_keys`] fails, naming `im-ingest adopt`, when one of our
//! tables exists without the unique index of its natural key, or with a key column that
//! does not compare as `utf8mb4_bin` (so `Abc` and `abc` would be one id). A database
//! with none of the tables yet (before the first migration) passes. Without this check,
//! the migration's `CREATE TABLE IF NOT EXISTS` would leave a team's existing tables as
//! they are and the worker would write without its guarantee.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use sqlx::MySqlPool;

/// A table's natural key: the unique index the worker's writes rely on.
#[derive(Debug)]
pub struct NaturalKey {
    pub table: &'static str,
    /// The index name the migrations give it.
    pub index: &'static str,
    /// Its columns, in order.
    pub columns: &'static [&'static str],
    /// Those that hold external ids, which must compare byte for byte.
    pub binary_columns: &'static [&'static str],
}

/// The natural keys of `customer`, `session` and `message` (DESIGN.md, "Tables").
pub const NATURAL_KEYS: [NaturalKey; 3] = [
    NaturalKey {
        table: "customer",
        index: "uk_customer_natural",
        columns: &["tenant_id", "platform", "external_user_id"],
        binary_columns: &["tenant_id", "platform", "external_user_id"],
    },
    NaturalKey {
        table: "session",
        index: "uk_session_natural",
        columns: &["tenant_id", "platform", "customer_id", "agent_id"],
        binary_columns: &["tenant_id", "platform", "agent_id"],
    },
    NaturalKey {
        table: "message",
        index: "uk_message_natural",
        columns: &["tenant_id", "platform", "external_message_id"],
        binary_columns: &["tenant_id", "platform", "external_message_id"],
    },
];

/// The worker's other indexes it names in queries (`FORCE INDEX`) or needs to find a
/// customer's or session's rows: (table, name, columns).
pub const NAMED_INDEXES: [(&str, &str, &[&str]); 4] = [
    (
        "session",
        "ix_session_agent",
        &["tenant_id", "platform", "agent_id"],
    ),
    ("session", "ix_session_customer", &["customer_id"]),
    (
        "message",
        "ix_message_session_sent",
        &["session_id", "sent_at"],
    ),
    ("message", "ix_message_customer", &["customer_id"]),
];

/// The collation every id column must have.
pub const BINARY_COLLATION: &str = "utf8mb4_bin";

/// What keeps a table from carrying the guarantee.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProblem {
    /// No unique index on exactly the natural key's columns.
    MissingKey { table: &'static str },
    /// The natural unique key exists under another name (the worker names it in queries).
    MisnamedKey { table: &'static str, name: String },
    /// An index the worker names in queries, or needs for lookups, is missing.
    MissingIndex {
        table: &'static str,
        index: &'static str,
        columns: &'static [&'static str],
    },
    /// A unique index (the primary key included) that holds neither the whole natural
    /// key nor `id` (other columns, fewer, or a prefix of one): an insert would collide
    /// with another row (the upsert would take it for the one it upserts, a message would
    /// be taken for a duplicate). Adopt does not drop a team's index; the team does.
    NarrowerUniqueIndex {
        table: &'static str,
        name: String,
        columns: Vec<String>,
    },
    /// `im-ingest adopt --apply` has started and not finished.
    AdoptInProgress,
    /// A key column that compares case- or accent-insensitively.
    NotBinary {
        table: &'static str,
        column: &'static str,
        collation: String,
    },
}

impl std::fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyProblem::MissingKey { table } => {
                let key = NATURAL_KEYS.iter().find(|key| key.table == *table);
                let columns = key.map(|key| key.columns.join(", ")).unwrap_or_default();
                write!(f, "`{table}` has no unique key on ({columns})")
            }
            KeyProblem::NotBinary {
                table,
                column,
                collation,
            } => write!(
                f,
                "`{table}`.`{column}` is {collation}, not {BINARY_COLLATION}"
            ),
            KeyProblem::MisnamedKey { table, name } => {
                let index = NATURAL_KEYS
                    .iter()
                    .find(|key| key.table == *table)
                    .map_or("", |key| key.index);
                write!(
                    f,
                    "`{table}`'s natural unique key is named `{name}`, not `{index}`"
                )
            }
            KeyProblem::MissingIndex {
                table,
                index,
                columns,
            } => write!(
                f,
                "`{table}` has no index `{index}` ({})",
                columns.join(", ")
            ),
            KeyProblem::NarrowerUniqueIndex {
                table,
                name,
                columns,
            } => write!(
                f,
                "`{table}` has the unique index `{name}` on ({}), which holds neither the \
                 whole natural key ({}) nor `id`: rows of different {table}s would be taken \
                 for one; drop it (ALTER TABLE {table} DROP INDEX `{name}`)",
                columns.join(", "),
                NATURAL_KEYS
                    .iter()
                    .find(|key| key.table == *table)
                    .map(|key| key.columns.join(", "))
                    .unwrap_or_default()
            ),
            KeyProblem::AdoptInProgress => {
                write!(f, "an `im-ingest adopt --apply` has not finished")
            }
        }
    }
}

/// What the database says about our tables.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Our tables that exist.
    pub tables: BTreeSet<String>,
    /// Unique indexes: (table, index) → columns in order (a prefix as `column(length)`).
    pub unique_indexes: BTreeMap<(String, String), Vec<String>>,
    /// Every index by (table, name).
    pub index_names: BTreeSet<(String, String)>,
    /// (table, column) → collation (string columns only).
    pub collations: BTreeMap<(String, String), String>,
    /// Whether `adopt --apply` has started and not finished (its marker table exists).
    pub adopt_in_progress: bool,
}

/// The table `adopt --apply` creates first and drops last: while it exists, the data is
/// not ready for the worker (counts not recounted yet), whatever keys already exist.
pub const ADOPT_MARKER: &str = "adopt_in_progress";

impl Catalog {
    /// Reads the catalog of the pool's database.
    pub async fn read(pool: &MySqlPool) -> anyhow::Result<Self> {
        let names: Vec<&str> = NATURAL_KEYS.iter().map(|key| key.table).collect();
        let in_list = names
            .iter()
            .map(|name| format!("'{name}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let tables: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN ({in_list}, '{ADOPT_MARKER}')"
        ))
        .fetch_all(pool)
        .await
        .context("reading the tables of the database")?;
        let index_rows: Vec<(String, String, String, i64, Option<i64>)> = sqlx::query_as(&format!(
            "SELECT CAST(TABLE_NAME AS CHAR), CAST(INDEX_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR), \
             CAST(NON_UNIQUE AS SIGNED), CAST(SUB_PART AS SIGNED) FROM information_schema.STATISTICS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN ({in_list}) \
             ORDER BY TABLE_NAME, INDEX_NAME, SEQ_IN_INDEX"
        ))
        .fetch_all(pool)
        .await
        .context("reading the unique indexes of the database")?;
        let collation_rows: Vec<(String, String, String)> = sqlx::query_as(&format!(
            "SELECT CAST(TABLE_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR), \
             CAST(COLLATION_NAME AS CHAR) FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN ({in_list}) \
             AND COLLATION_NAME IS NOT NULL"
        ))
        .fetch_all(pool)
        .await
        .context("reading the column collations of the database")?;
        let mut unique_indexes: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        let mut index_names = BTreeSet::new();
        for (table, index, column, non_unique, prefix) in index_rows {
            index_names.insert((table.clone(), index.clone()));
            // A prefix is written as MySQL shows it, so it never equals a whole column.
            let column = match prefix {
                Some(length) => format!("{column}({length})"),
                None => column,
            };
            if non_unique == 0 {
                unique_indexes
                    .entry((table, index))
                    .or_default()
                    .push(column);
            }
        }
        let adopt_in_progress = tables.iter().any(|table| table == ADOPT_MARKER);
        Ok(Self {
            adopt_in_progress,
            tables: tables
                .into_iter()
                .filter(|table| table != ADOPT_MARKER)
                .collect(),
            unique_indexes,
            index_names,
            collations: collation_rows
                .into_iter()
                .map(|(table, column, collation)| ((table, column), collation))
                .collect(),
        })
    }

    /// Every problem of every table that exists, in table order.
    pub fn problems(&self) -> Vec<KeyProblem> {
        let mut problems = Vec::new();
        if self.adopt_in_progress {
            problems.push(KeyProblem::AdoptInProgress);
        }
        for key in &NATURAL_KEYS {
            if !self.tables.contains(key.table) {
                continue;
            }
            let unique_on_key: Vec<&str> = self
                .unique_indexes
                .iter()
                .filter(|((table, _), columns)| {
                    table == key.table
                        && columns
                            .iter()
                            .map(String::as_str)
                            .eq(key.columns.iter().copied())
                })
                .map(|((_, name), _)| name.as_str())
                .collect();
            for ((table, name), columns) in &self.unique_indexes {
                let holds = |column: &str| columns.iter().any(|c| c == column);
                // Holding the key or the auto-increment id, it can only collide with the
                // row the worker means (ids are never reused for another row).
                let harmless = key.columns.iter().all(|column| holds(column)) || holds("id");
                if table == key.table && !harmless {
                    problems.push(KeyProblem::NarrowerUniqueIndex {
                        table: key.table,
                        name: name.clone(),
                        columns: columns.clone(),
                    });
                }
            }
            if unique_on_key.is_empty() {
                problems.push(KeyProblem::MissingKey { table: key.table });
            } else if !unique_on_key.contains(&key.index) {
                problems.push(KeyProblem::MisnamedKey {
                    table: key.table,
                    name: unique_on_key[0].to_string(),
                });
            }
            for (table, index, columns) in NAMED_INDEXES {
                let present = self
                    .index_names
                    .contains(&(table.to_string(), index.to_string()));
                if table == key.table && !present {
                    problems.push(KeyProblem::MissingIndex {
                        table,
                        index,
                        columns,
                    });
                }
            }
            for column in key.binary_columns {
                let collation = self
                    .collations
                    .get(&(key.table.to_string(), column.to_string()));
                if let Some(collation) = collation.filter(|c| c.as_str() != BINARY_COLLATION) {
                    problems.push(KeyProblem::NotBinary {
                        table: key.table,
                        column,
                        collation: collation.clone(),
                    });
                }
            }
        }
        problems
    }
}

/// Fails, naming `im-ingest adopt`, unless every existing table of ours has its natural
/// key as a unique index over binary-collated id columns (and no narrower unique index:
/// that one the team drops, adopt does not).
pub async fn require_natural_keys(pool: &MySqlPool) -> anyhow::Result<()> {
    let (narrower, problems): (Vec<KeyProblem>, Vec<KeyProblem>) = Catalog::read(pool)
        .await?
        .problems()
        .into_iter()
        .partition(|problem| matches!(problem, KeyProblem::NarrowerUniqueIndex { .. }));
    let narrower: Vec<String> = narrower.iter().map(ToString::to_string).collect();
    anyhow::ensure!(
        narrower.is_empty() || !problems.is_empty(),
        "{}; then start again",
        narrower.join("; ")
    );
    if problems.is_empty() {
        return Ok(());
    }
    let mut listed: Vec<String> = problems.iter().map(ToString::to_string).collect();
    if !narrower.is_empty() {
        listed.push(format!("and first, by hand: {}", narrower.join("; ")));
    }
    anyhow::bail!(
        "the tables lack the unique keys that keep rows single ({}): they may hold \
         duplicates; run `im-ingest adopt --dry-run` to see them and `im-ingest adopt \
         --apply` to merge them and add the keys",
        listed.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog_of_our_schema() -> Catalog {
        let mut catalog = Catalog::default();
        for key in &NATURAL_KEYS {
            catalog.tables.insert(key.table.to_string());
            catalog.unique_indexes.insert(
                (key.table.to_string(), "PRIMARY".to_string()),
                vec!["id".to_string()],
            );
            catalog.unique_indexes.insert(
                (key.table.to_string(), key.index.to_string()),
                key.columns.iter().map(|c| c.to_string()).collect(),
            );
            catalog
                .index_names
                .insert((key.table.to_string(), key.index.to_string()));
            for column in key.binary_columns {
                catalog.collations.insert(
                    (key.table.to_string(), column.to_string()),
                    BINARY_COLLATION.to_string(),
                );
            }
        }
        for (table, index, _) in NAMED_INDEXES {
            catalog
                .index_names
                .insert((table.to_string(), index.to_string()));
        }
        catalog
    }

    #[test]
    fn our_schema_and_an_empty_database_have_no_problem() {
        assert_eq!(catalog_of_our_schema().problems(), vec![]);
        assert_eq!(Catalog::default().problems(), vec![]);
    }

    #[test]
    fn a_missing_key_a_key_on_other_columns_and_a_case_insensitive_id_are_each_named() {
        let mut catalog = catalog_of_our_schema();
        catalog
            .unique_indexes
            .remove(&("customer".to_string(), "uk_customer_natural".to_string()));
        catalog.unique_indexes.insert(
            ("message".to_string(), "uk_message_natural".to_string()),
            vec!["tenant_id".to_string(), "external_message_id".to_string()],
        );
        catalog.collations.insert(
            ("session".to_string(), "agent_id".to_string()),
            "utf8mb4_unicode_ci".to_string(),
        );
        let problems = catalog.problems();
        assert_eq!(
            problems,
            vec![
                KeyProblem::MissingKey { table: "customer" },
                KeyProblem::NotBinary {
                    table: "session",
                    column: "agent_id",
                    collation: "utf8mb4_unicode_ci".to_string()
                },
                KeyProblem::NarrowerUniqueIndex {
                    table: "message",
                    name: "uk_message_natural".to_string(),
                    columns: vec!["tenant_id".to_string(), "external_message_id".to_string()],
                },
                KeyProblem::MissingKey { table: "message" },
            ]
        );
        assert_eq!(
            problems[0].to_string(),
            "`customer` has no unique key on (tenant_id, platform, external_user_id)"
        );
    }

    #[test]
    fn a_unique_index_on_part_of_a_key_a_prefix_or_a_team_primary_key_is_refused_one_with_the_key_or_id_is_not(
    ) {
        let mut catalog = catalog_of_our_schema();
        let columns = |names: &[&str]| names.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        catalog.unique_indexes.insert(
            ("customer".to_string(), "ux_user".to_string()),
            columns(&["external_user_id"]),
        );
        catalog.unique_indexes.insert(
            ("message".to_string(), "ux_prefix".to_string()),
            columns(&["tenant_id", "platform", "external_message_id(16)"]),
        );
        catalog.unique_indexes.insert(
            ("message".to_string(), "PRIMARY".to_string()),
            columns(&["external_message_id"]),
        );
        catalog.unique_indexes.insert(
            ("session".to_string(), "ux_wider".to_string()),
            columns(&[
                "tenant_id",
                "platform",
                "customer_id",
                "agent_id",
                "read_up_to",
            ]),
        );
        catalog.unique_indexes.insert(
            ("customer".to_string(), "ux_id_nickname".to_string()),
            columns(&["id", "nickname"]),
        );
        let problems = catalog.problems();
        assert_eq!(
            problems,
            vec![
                KeyProblem::NarrowerUniqueIndex {
                    table: "customer",
                    name: "ux_user".to_string(),
                    columns: columns(&["external_user_id"]),
                },
                KeyProblem::NarrowerUniqueIndex {
                    table: "message",
                    name: "PRIMARY".to_string(),
                    columns: columns(&["external_message_id"]),
                },
                KeyProblem::NarrowerUniqueIndex {
                    table: "message",
                    name: "ux_prefix".to_string(),
                    columns: columns(&["tenant_id", "platform", "external_message_id(16)"]),
                },
            ]
        );
        assert!(
            problems[0]
                .to_string()
                .contains("drop it (ALTER TABLE customer DROP INDEX `ux_user`)"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn a_key_under_another_name_and_a_missing_named_index_are_problems_the_worker_would_hit() {
        let mut catalog = catalog_of_our_schema();
        let columns = catalog
            .unique_indexes
            .remove(&("session".to_string(), "uk_session_natural".to_string()))
            .unwrap();
        catalog
            .unique_indexes
            .insert(("session".to_string(), "their_name".to_string()), columns);
        catalog
            .index_names
            .remove(&("message".to_string(), "ix_message_session_sent".to_string()));
        assert_eq!(
            catalog.problems(),
            vec![
                KeyProblem::MisnamedKey {
                    table: "session",
                    name: "their_name".to_string()
                },
                KeyProblem::MissingIndex {
                    table: "message",
                    index: "ix_message_session_sent",
                    columns: &["session_id", "sent_at"]
                },
            ]
        );
    }
}
