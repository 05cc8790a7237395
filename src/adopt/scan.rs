//! What `adopt` finds before it changes anything: whether the tables are ours in shape,
//! and how many rows share a natural key.
//!
//! Guarantee: read-only. Rows are grouped as the unique keys will compare them
//! (`utf8mb4_bin`), whatever the columns' collation is today.

use std::collections::BTreeSet;

use anyhow::Context;
use serde::Serialize;
use sqlx::MySqlPool;

use crate::store::{Catalog, KeyProblem, NaturalKey, BINARY_COLLATION, NATURAL_KEYS};

/// Columns the worker reads and writes, per table: tables missing one are not shaped
/// like ours, and `adopt` leaves them alone.
const REQUIRED_COLUMNS: [(&str, &[&str]); 3] = [
    (
        "customer",
        &[
            "id",
            "tenant_id",
            "platform",
            "external_user_id",
            "nickname",
            "avatar",
            "nickname_at",
            "nickname_message_id",
            "avatar_at",
            "avatar_message_id",
        ],
    ),
    (
        "session",
        &[
            "id",
            "tenant_id",
            "platform",
            "customer_id",
            "agent_id",
            "last_message_at",
            "read_up_to",
            "expired_up_to",
            "unread_count",
            "unread_version",
        ],
    ),
    (
        "message",
        &[
            "id",
            "tenant_id",
            "platform",
            "external_message_id",
            "session_id",
            "customer_id",
            "message_type",
            "content",
            "sent_at",
            "source_topic",
            "source_partition",
            "source_offset",
        ],
    ),
];

/// Fails, listing what is missing, unless every table and column the worker uses exists.
pub async fn require_our_shape(pool: &MySqlPool) -> anyhow::Result<()> {
    let ours = Catalog::read(pool).await?.tables;
    anyhow::ensure!(
        !ours.is_empty(),
        "the database has none of im-ingest's tables: nothing to adopt (`im-ingest migrate` \
         creates them)"
    );
    let present: BTreeSet<(String, String)> = sqlx::query_as(
        "SELECT CAST(TABLE_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR) \
         FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()",
    )
    .fetch_all(pool)
    .await
    .context("reading the columns of the database")?
    .into_iter()
    .collect();
    let missing: Vec<String> = REQUIRED_COLUMNS
        .iter()
        .flat_map(|(table, columns)| columns.iter().map(move |column| (*table, *column)))
        .filter(|(table, column)| !present.contains(&(table.to_string(), column.to_string())))
        .map(|(table, column)| format!("`{table}`.`{column}`"))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "the database is not shaped like im-ingest's tables (missing: {}): adopt works on \
         tables named and shaped like the worker's, only without their unique keys",
        missing.join(", ")
    );
    Ok(())
}

/// Rows sharing a natural key in one table.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Duplicates {
    /// Natural keys held by more than one row.
    pub keys: u64,
    /// Rows beyond the first of each such key (what merging removes).
    pub extra_rows: u64,
    /// Rows with a NULL in a key column (a nullable column in the team's schema): no
    /// unique key covers them and the worker never finds them, so adopt leaves them.
    pub rows_without_key: u64,
}

/// The state `adopt` starts from.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Survey {
    pub customer: Duplicates,
    /// Counted as the sessions are now: merging customers can make more sessions share
    /// a key (two sessions of two copies of one customer).
    pub session: Duplicates,
    pub message: Duplicates,
    /// Key columns to convert to `utf8mb4_bin`.
    pub columns_to_convert: Vec<String>,
    /// Tables whose unique key is missing.
    pub keys_to_add: Vec<String>,
    /// What adopt leaves to the team: unique indexes narrower than a natural key (adopt
    /// does not drop a team's index; `--apply` refuses until they are gone).
    pub to_fix_by_hand: Vec<String>,
    /// An earlier `--apply` did not finish (it goes on from where it stopped).
    pub unfinished: bool,
}

impl Survey {
    pub async fn read(pool: &MySqlPool) -> anyhow::Result<Self> {
        let mut survey = Self::default();
        let catalog = Catalog::read(pool).await?;
        for problem in catalog.problems() {
            match problem {
                KeyProblem::MissingKey { table } => survey.keys_to_add.push(table.to_string()),
                KeyProblem::NotBinary { table, column, .. } => {
                    survey.columns_to_convert.push(format!("{table}.{column}"))
                }
                KeyProblem::AdoptInProgress => survey.unfinished = true,
                other @ KeyProblem::NarrowerUniqueIndex { .. } => {
                    survey.to_fix_by_hand.push(other.to_string())
                }
                other @ (KeyProblem::MisnamedKey { .. } | KeyProblem::MissingIndex { .. }) => {
                    survey.keys_to_add.push(other.to_string())
                }
            }
        }
        let [customer, session, message] = &NATURAL_KEYS;
        survey.customer = duplicates(pool, &catalog, customer).await?;
        survey.session = duplicates(pool, &catalog, session).await?;
        survey.message = duplicates(pool, &catalog, message).await?;
        Ok(survey)
    }

    /// Whether there is nothing left to do.
    pub fn is_adopted(&self) -> bool {
        self.keys_to_add.is_empty()
            && self.to_fix_by_hand.is_empty()
            && self.columns_to_convert.is_empty()
            && !self.unfinished
            && self.customer.extra_rows + self.session.extra_rows + self.message.extra_rows == 0
    }
}

/// The key's columns as the unique key will compare them: a column that is not
/// `utf8mb4_bin` yet converted in the query (which no index serves), one that is left
/// as it is (so an index on the key, even a non-unique one, orders the `GROUP BY`).
fn binary_columns(key: &NaturalKey, catalog: &Catalog) -> String {
    key.columns
        .iter()
        .map(|column| {
            let collation = catalog
                .collations
                .get(&(key.table.to_string(), column.to_string()));
            let convert = key.binary_columns.contains(column)
                && collation.is_none_or(|collation| collation != BINARY_COLLATION);
            match convert {
                true => format!("CONVERT({column} USING utf8mb4) COLLATE {BINARY_COLLATION}"),
                false => column.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `c1 IS NOT NULL AND c2 IS NOT NULL …` over the key's columns (or `IS NULL … OR`).
pub fn key_is_null(key: &NaturalKey, null: bool) -> String {
    let (test, join) = match null {
        true => ("IS NULL", " OR "),
        false => ("IS NOT NULL", " AND "),
    };
    key.columns
        .iter()
        .map(|column| format!("{column} {test}"))
        .collect::<Vec<_>>()
        .join(join)
}

async fn duplicates(
    pool: &MySqlPool,
    catalog: &Catalog,
    key: &NaturalKey,
) -> anyhow::Result<Duplicates> {
    let (keys, extra_rows): (i64, i64) = sqlx::query_as(&format!(
        "SELECT COUNT(*), CAST(COALESCE(SUM(n - 1), 0) AS SIGNED) FROM \
         (SELECT COUNT(*) AS n FROM {table} WHERE {complete} GROUP BY {columns} HAVING n > 1) AS d",
        table = key.table,
        complete = key_is_null(key, false),
        columns = binary_columns(key, catalog),
    ))
    .fetch_one(pool)
    .await
    .with_context(|| format!("counting the duplicates of `{}`", key.table))?;
    let rows_without_key: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM {} WHERE {}",
        key.table,
        key_is_null(key, true)
    ))
    .fetch_one(pool)
    .await
    .with_context(|| format!("counting the rows of `{}` without a key", key.table))?;
    Ok(Duplicates {
        keys: keys as u64,
        extra_rows: extra_rows as u64,
        rows_without_key: rows_without_key as u64,
    })
}
