//! Per-user lease lock in Redis (DESIGN.md, "Defence in depth", layer 1).
//!
//! Guarantee: a key is taken with `SET key <random token> NX PX <lease>`; it is deleted
//! or extended only by the holder of its token (compare-and-delete, compare-then-PEXPIRE,
//! each one atomic Lua script), so a holder whose lease expired can never remove or
//! prolong the next holder's lock. A [`LockGuard`] extends the lease every third of it
//! (or half of the hold, if sooner), but only until its hold ends (`lock.max_hold_ms` after it was taken): no lease
//! outlives its use by more than one lease, whatever the holder does. The lock is an
//! efficiency device, not the duplicate guarantee: a process paused past its lease
//! loses the lock without knowing — the unique indexes are what keep data single.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use crate::config::RedisSettings;
use crate::message::UserKey;

/// Lua: delete the key only if it still holds our token. Returns 1 if deleted.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Lua: reset the key's TTL only if it still holds our token. Returns 1 if extended.
const EXTEND_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// The Redis key of a user's lock. The braces are a Redis Cluster hash tag: every key a
/// script touches for this user lands in one slot.
pub fn lock_key(user: &UserKey) -> String {
    format!(
        "im:lock:{{{}:{}:{}}}",
        user.tenant_id, user.platform, user.user_id
    )
}

/// Outcome of one acquisition attempt.
#[derive(Debug)]
pub enum Acquire {
    Acquired(LockGuard),
    /// Someone else holds the key. `remaining` is its TTL, or `None` when the key has no
    /// TTL (a lock without one never shortens a retry delay). `holder` is a fingerprint
    /// of the holder's token ([`holder_fingerprint`]), `None` if the key vanished before
    /// it was read: comparing fingerprints across attempts tells a lock that changes
    /// hands (contention) from one that stays with one holder (stuck).
    HeldElsewhere {
        remaining: Option<Duration>,
        holder: Option<String>,
    },
}

/// Client for the lease locks of all users.
#[derive(Clone)]
pub struct LockClient {
    connection: ConnectionManager,
    lease: Duration,
    /// How long a guard's keeper extends the lease after the lock was taken.
    max_hold: Duration,
    release: Arc<Script>,
    extend: Arc<Script>,
}

impl std::fmt::Debug for LockClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockClient")
            .field("lease", &self.lease)
            .field("max_hold", &self.max_hold)
            .finish()
    }
}

impl LockClient {
    /// Creates the client; the connection is made lazily, on first use, so a Redis that is
    /// down at start-up does not stop the process. Every command is bounded by the
    /// configured connect and response timeouts. A held lock's lease is extended until
    /// `max_hold` after it was taken.
    pub fn new(
        settings: &RedisSettings,
        lease: Duration,
        max_hold: Duration,
    ) -> anyhow::Result<Self> {
        let client = crate::redis_client::open(settings)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)))
            .set_response_timeout(Some(Duration::from_millis(settings.response_timeout_ms)))
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .with_context(|| format!("creating the Redis connection to {}", settings.url))?;
        Ok(Self {
            connection,
            lease,
            max_hold,
            release: Arc::new(Script::new(RELEASE_SCRIPT)),
            extend: Arc::new(Script::new(EXTEND_SCRIPT)),
        })
    }

    /// The Redis connection (multiplexed, lazily made, with the configured timeouts),
    /// for other users of the same Redis (the unread copy).
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How long one holder keeps a lock before its work is left to a later attempt.
    pub fn max_hold(&self) -> Duration {
        self.max_hold
    }

    /// One round trip: `SET NX PX` and, for the case it fails, `PTTL` and `GET` of the
    /// holder.
    pub async fn acquire(&self, user: &UserKey) -> redis::RedisResult<Acquire> {
        let mut acquired = self.acquire_many(std::slice::from_ref(user)).await?;
        Ok(acquired.pop().expect("one user, one answer"))
    }

    /// Tries every user's lock in one pipelined round trip: per key `SET NX PX`, then
    /// `PTTL` and `GET` for the case it is held (per-key commands, never one script
    /// across users, so keys may live on different Redis Cluster slots). One answer per
    /// user, in order.
    pub async fn acquire_many(&self, users: &[UserKey]) -> redis::RedisResult<Vec<Acquire>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<(String, String)> =
            users.iter().map(|u| (lock_key(u), new_token())).collect();
        let mut pipe = redis::pipe();
        for (key, token) in &keys {
            pipe.cmd("SET")
                .arg(key)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(millis(self.lease))
                .cmd("PTTL")
                .arg(key)
                .cmd("GET")
                .arg(key);
        }
        let mut connection = self.connection.clone();
        let replies: Vec<redis::Value> = match pipe.query_async(&mut connection).await {
            Ok(replies) => replies,
            Err(error) => {
                // Redis may have applied the SETs before the reply was lost: give back
                // whatever of ours it holds (compare-and-delete), best effort.
                self.release_tokens(&keys).await;
                return Err(error);
            }
        };
        let mut replies = replies.into_iter();
        let mut answers = Vec::with_capacity(keys.len());
        for (key, token) in keys {
            let (Some(set), Some(pttl), Some(holder)) =
                (replies.next(), replies.next(), replies.next())
            else {
                return Err(redis::RedisError::from(redis::ParsingError::from(
                    "a lock pipeline answered fewer replies than it sent commands",
                )));
            };
            let set: Option<String> = redis::from_redis_value(set)?;
            let pttl: i64 = redis::from_redis_value(pttl)?;
            let holder: Option<String> = redis::from_redis_value(holder)?;
            answers.push(if set.is_some() {
                metrics::counter!("im_ingest_lock_acquisitions_total").increment(1);
                Acquire::Acquired(self.guard(key, token))
            } else {
                metrics::counter!("im_ingest_lock_conflicts_total").increment(1);
                let remaining = match pttl {
                    -1 => None,
                    // -2: the holder's key expired between SET and PTTL; it is free again.
                    ms => Some(Duration::from_millis(ms.max(0) as u64)),
                };
                Acquire::HeldElsewhere {
                    remaining,
                    holder: holder.as_deref().map(holder_fingerprint),
                }
            });
        }
        Ok(answers)
    }

    /// Deletes each key that still holds its token; errors are ignored (the keys then
    /// expire with their leases).
    async fn release_tokens(&self, keys: &[(String, String)]) {
        let mut pipe = redis::pipe();
        for (key, token) in keys {
            pipe.cmd("EVAL")
                .arg(RELEASE_SCRIPT)
                .arg(1)
                .arg(key)
                .arg(token);
        }
        let mut connection = self.connection.clone();
        let _: redis::RedisResult<Vec<i64>> = pipe.query_async(&mut connection).await;
    }

    /// Gives back many held locks in one pipelined round trip (a compare-and-delete per
    /// key); returns how many were still ours. A failure only leaves the keys to expire
    /// with their leases.
    pub async fn release_many(&self, guards: Vec<LockGuard>) -> redis::RedisResult<usize> {
        if guards.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for guard in &guards {
            guard.keeper.abort();
            pipe.cmd("EVAL")
                .arg(RELEASE_SCRIPT)
                .arg(1)
                .arg(&guard.key)
                .arg(&guard.token);
        }
        let mut connection = self.connection.clone();
        let deleted: Vec<i64> = pipe.query_async(&mut connection).await?;
        Ok(deleted.into_iter().filter(|d| *d == 1).count())
    }

    /// Starts the lease keeper for a key we hold.
    fn guard(&self, key: String, token: String) -> LockGuard {
        let lost = Arc::new(AtomicBool::new(false));
        let keeper = tokio::spawn(keep_lease(
            self.clone(),
            key.clone(),
            token.clone(),
            lost.clone(),
        ));
        LockGuard {
            client: self.clone(),
            key,
            token,
            lost,
            keeper,
        }
    }

    /// Deletes `key` if it still holds `token`; returns whether it did.
    pub async fn release_token(&self, key: &str, token: &str) -> redis::RedisResult<bool> {
        let mut connection = self.connection.clone();
        let deleted: i64 = self
            .release
            .key(key)
            .arg(token)
            .invoke_async(&mut connection)
            .await?;
        Ok(deleted == 1)
    }

    /// Resets `key`'s TTL to the lease if it still holds `token`; returns whether it did.
    pub async fn extend_token(&self, key: &str, token: &str) -> redis::RedisResult<bool> {
        let mut connection = self.connection.clone();
        let extended: i64 = self
            .extend
            .key(key)
            .arg(token)
            .arg(millis(self.lease))
            .invoke_async(&mut connection)
            .await?;
        Ok(extended == 1)
    }
}

/// A held lock. Its lease is extended in the background (see `keep_lease`)
/// until [`LockGuard::release`], drop, or the end of the hold; dropping without release
/// stops the extension and leaves the key to expire.
#[derive(Debug)]
pub struct LockGuard {
    client: LockClient,
    key: String,
    token: String,
    lost: Arc<AtomicBool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl LockGuard {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// True once an extension found the key gone or held by someone else: the lease ran
    /// out (a long pause), and another holder may be working on this user.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Stops extending and deletes the key if it is still ours. Returns whether it was.
    pub async fn release(self) -> redis::RedisResult<bool> {
        self.keeper.abort();
        self.client.release_token(&self.key, &self.token).await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Extends the lease every third of it, or every half of the hold if that is sooner
/// (so a hold as long as that learns whether its lease was lost), while the hold lasts,
/// then stops: the key expires one lease after the last extension unless it is
/// released first.
async fn keep_lease(client: LockClient, key: String, token: String, lost: Arc<AtomicBool>) {
    let period = (client.lease / 3).min(client.max_hold / 2);
    let hold_ends = Instant::now() + client.max_hold;
    loop {
        tokio::time::sleep(period).await;
        if Instant::now() >= hold_ends {
            return;
        }
        fail::fail_point!("in_lease_extension", |_| crate::failpoint::crash(
            "in_lease_extension"
        ));
        match client.extend_token(&key, &token).await {
            Ok(true) => {
                metrics::counter!("im_ingest_lock_extensions_total").increment(1);
            }
            Ok(false) => {
                lost.store(true, Ordering::Relaxed);
                tracing::warn!(%key, "lock lease lost before the work finished");
                return;
            }
            // A transient Redis error: try again next period; the unique indexes still
            // guard the data if the lease runs out meanwhile.
            Err(error) => tracing::warn!(%key, %error, "extending the lock lease failed"),
        }
    }
}

/// A short stable digest of a lock token: enough to tell holders apart in a record's
/// headers without publishing the token itself (which would let a reader release the
/// lock).
pub fn holder_fingerprint(token: &str) -> String {
    format!("{:016x}", crate::fnv::fnv1a(token.bytes()))
}

fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis().try_into().unwrap_or(u64::MAX)
}
