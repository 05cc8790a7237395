//! The bench's two axes: who is measured (contenders and limits) and on what
//! (scenarios).
//!
//! Guarantee: each contender is defined once — its command line, its settings and its
//! tables — so every scenario starts it the same way.

use serde::Serialize;

use super::workload::{Keys, Spread};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ContenderKind {
    /// The database write limit: batched multi-row writes of the same rows, no lock.
    Ideal,
    /// `im-ingest run` as shipped (Redis lock, unique indexes).
    Shipped,
    /// `im-ingest run` with `lock.mode = none` (unique indexes only).
    LockNone,
    /// Check-then-insert per record on tables without unique keys.
    Naive,
    /// The Kafka read limit: reads every record, does nothing.
    Noop,
}

/// Which tables a contender writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tables {
    /// `migrations/`: the worker's schema with unique keys.
    Worker,
    /// The naive writer's copy without unique keys.
    WithoutUniqueKeys,
    /// Writes nothing.
    None,
}

impl ContenderKind {
    pub fn label(self) -> &'static str {
        match self {
            ContenderKind::Ideal => "ideal (DB write limit)",
            ContenderKind::Shipped => "im-ingest",
            ContenderKind::LockNone => "im-ingest lock.mode=none",
            ContenderKind::Naive => "naive check-then-insert",
            ContenderKind::Noop => "no-op (Kafka read limit)",
        }
    }

    /// `im-ingest run`: consumes the delay topics too and serves metrics.
    pub fn is_worker(self) -> bool {
        matches!(self, ContenderKind::Shipped | ContenderKind::LockNone)
    }

    pub fn tables(self) -> Tables {
        match self {
            ContenderKind::Ideal | ContenderKind::Shipped | ContenderKind::LockNone => {
                Tables::Worker
            }
            ContenderKind::Naive => Tables::WithoutUniqueKeys,
            ContenderKind::Noop => Tables::None,
        }
    }

    /// The `im-ingest` arguments that start it.
    pub fn args(self, batch_rows: usize) -> Vec<String> {
        let reference = |kind: &str| {
            vec![
                "bench-contender".to_string(),
                kind.to_string(),
                "--batch-rows".to_string(),
                batch_rows.to_string(),
            ]
        };
        match self {
            ContenderKind::Shipped | ContenderKind::LockNone => vec!["run".to_string()],
            ContenderKind::Ideal => reference("ideal"),
            ContenderKind::Naive => reference("naive"),
            ContenderKind::Noop => reference("noop"),
        }
    }

    /// Settings of its own (`IM_INGEST__…` suffixes).
    pub fn settings(self) -> Vec<(&'static str, &'static str)> {
        match self {
            ContenderKind::LockNone => vec![("LOCK__MODE", "none")],
            ContenderKind::Shipped => vec![("LOCK__MODE", "redis")],
            _ => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Drain a backlog of N messages of U users, each sent twice with random keys.
    Backlog,
    /// Paced load at half the contender's backlog rate: warm-up, then a latency window.
    Steady,
    /// 10 producers push one new customer's messages at once, each twice.
    Burst,
    /// A backlog in which one user has 30% of the records.
    HotUser,
    /// 3 processes of the contender in one group on an unkeyed backlog.
    Group,
    /// The backlog with `innodb_flush_log_at_trx_commit = 1`, as MySQL ships.
    Durable,
}

impl Scenario {
    pub fn label(self) -> &'static str {
        match self {
            Scenario::Backlog => "backlog",
            Scenario::Steady => "steady",
            Scenario::Burst => "burst",
            Scenario::HotUser => "hot-user",
            Scenario::Group => "group",
            Scenario::Durable => "durable",
        }
    }

    /// Processes of the contender that consume together.
    pub fn processes(self) -> usize {
        match self {
            Scenario::Group => 3,
            _ => 1,
        }
    }

    /// How the scenario's messages are spread over `users`.
    pub fn spread(self, users: usize) -> Spread {
        match self {
            Scenario::HotUser => Spread::HotUser { users },
            Scenario::Burst => Spread::OneUser,
            _ => Spread::Even { users },
        }
    }

    /// Whether the scenario says anything about `contender`: the steady scenario
    /// measures latency to a stored row, which the no-op consumer never writes (and its
    /// backlog rate, which would set the offered load, is the broker's, not a consumer's).
    pub fn measures(self, contender: ContenderKind) -> bool {
        !(self == Scenario::Steady && contender == ContenderKind::Noop)
    }

    /// How the scenario's records are keyed: the group's producer sends no key.
    pub fn keys(self) -> Keys {
        match self {
            Scenario::Group => Keys::None,
            _ => Keys::Random,
        }
    }

    /// Whether the records are all sent before the contender starts.
    pub fn is_backlog(self) -> bool {
        matches!(
            self,
            Scenario::Backlog | Scenario::HotUser | Scenario::Group | Scenario::Durable
        )
    }
}
