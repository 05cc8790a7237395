//! The fast copy of unread counts in Redis: one hash per agent,
//! `im:unread:{<tenant>:<platform>:<agent>}`, fields `<from_user_id>` → count,
//! `v:<from_user_id>` → version, `t:<from_user_id>` → newest message time (for
//! expiry), `total` → the sum (DESIGN.md, "Redis keys").
//!
//! Guarantee: a conversation's fields only ever move to a newer version of the MySQL
//! truth, and `total` moves by the same difference in the same script, so it is always
//! the sum of the counts — whatever the order and number of times changes arrive, with
//! no dedupe window. A hash without `total` is incomplete (Redis lost it, or it was
//! never built): changes still land in its fields, and the writer that finds it so (or
//! the first read) rebuilds it from MySQL, merging by version, so a change applied
//! while the rebuild read MySQL is kept.
//! One script touches one agent's key; a batch is a pipeline of such scripts.

use std::collections::{BTreeMap, BTreeSet};

use redis::aio::ConnectionManager;

use crate::store::ConversationUnread;

/// Applies one conversation's state if its version is newer than the stored one; moves
/// `total` (when present) by the difference. Returns 0 when the hash is incomplete (no
/// `total`: it needs a rebuild), 1 otherwise.
const APPLY_SCRIPT: &str = r"
local complete = redis.call('HEXISTS', KEYS[1], 'total')
local stored = tonumber(redis.call('HGET', KEYS[1], 'v:' .. ARGV[1]) or '-1')
if tonumber(ARGV[3]) <= stored then return complete end
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'v:' .. ARGV[1], ARGV[3], 't:' .. ARGV[1], ARGV[4])
if complete == 1 then
  redis.call('HINCRBY', KEYS[1], 'total', tonumber(ARGV[2]) - old)
end
return complete
";

/// Merges an agent's conversations read from MySQL (ARGV[1]: 1 to overwrite equal
/// versions too, as reconcile does; then from, count, version, time per conversation):
/// each is taken unless the stored version is newer; then `total` is set to the sum of
/// the counts. Returns the total.
const REBUILD_SCRIPT: &str = r"
local force = ARGV[1] == '1'
for i = 2, #ARGV, 4 do
  local from = ARGV[i]
  local stored = tonumber(redis.call('HGET', KEYS[1], 'v:' .. from) or '-1')
  local version = tonumber(ARGV[i + 2])
  if stored < version or (force and stored == version) then
    redis.call('HSET', KEYS[1], from, ARGV[i + 1], 'v:' .. from, ARGV[i + 2], 't:' .. from, ARGV[i + 3])
  end
end
local all = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #all, 2 do
  local field = all[i]
  if field ~= 'total' and string.sub(field, 1, 2) ~= 'v:' and string.sub(field, 1, 2) ~= 't:' then
    total = total + tonumber(all[i + 1])
  end
end
redis.call('HSET', KEYS[1], 'total', total)
return total
";

/// An agent: whose unread counts one hash holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Agent {
    pub tenant_id: String,
    pub platform: String,
    pub agent_id: String,
}

impl Agent {
    /// The agent's hash; the braces make it one Redis Cluster hash slot.
    pub fn key(&self) -> String {
        format!(
            "im:unread:{{{}:{}:{}}}",
            self.tenant_id, self.platform, self.agent_id
        )
    }
}

impl From<&ConversationUnread> for Agent {
    fn from(c: &ConversationUnread) -> Self {
        Self {
            tenant_id: c.tenant_id.clone(),
            platform: c.platform.clone(),
            agent_id: c.agent_id.clone(),
        }
    }
}

/// One conversation's state: in Redis, or read from MySQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The customer (`from_user_id`).
    pub customer: String,
    pub unread: u32,
    pub version: u64,
    pub last_message_at: Option<i64>,
}

/// An agent's hash as stored: its conversations, and `total` if the hash is complete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredCopy {
    pub conversations: BTreeMap<String, Conversation>,
    pub total: Option<i64>,
}

/// The Redis side of the counters.
#[derive(Clone)]
pub struct UnreadCopy {
    connection: ConnectionManager,
}

impl UnreadCopy {
    pub fn new(connection: ConnectionManager) -> Self {
        Self { connection }
    }

    /// Applies committed changes, one script per conversation, in one round trip;
    /// returns the agents whose hash is incomplete (to be rebuilt from MySQL).
    pub async fn apply(
        &self,
        changes: &[ConversationUnread],
    ) -> redis::RedisResult<BTreeSet<Agent>> {
        if changes.is_empty() {
            return Ok(BTreeSet::new());
        }
        let mut pipe = redis::pipe();
        for change in changes {
            pipe.cmd("EVAL")
                .arg(APPLY_SCRIPT)
                .arg(1)
                .arg(Agent::from(change).key())
                .arg(&change.customer)
                .arg(change.unread)
                .arg(change.version)
                .arg(change.last_message_at.unwrap_or(0));
        }
        let mut connection = self.connection.clone();
        let complete: Vec<i64> = pipe.query_async(&mut connection).await?;
        Ok(changes
            .iter()
            .zip(complete)
            .filter(|(_, complete)| *complete == 0)
            .map(|(change, _)| Agent::from(change))
            .collect())
    }

    /// The agent's hash as it is now.
    pub async fn read(&self, agent: &Agent) -> redis::RedisResult<StoredCopy> {
        let mut connection = self.connection.clone();
        let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(agent.key())
            .query_async(&mut connection)
            .await?;
        Ok(parse(fields))
    }

    /// Merges `conversations` (read from MySQL) into the agent's hash and sets its
    /// total (see [`REBUILD_SCRIPT`]); with `force`, equal versions are overwritten too
    /// (a hand-corrupted count). Returns the total.
    pub async fn rebuild(
        &self,
        agent: &Agent,
        conversations: &[Conversation],
        force: bool,
    ) -> redis::RedisResult<i64> {
        let mut invocation = redis::cmd("EVAL");
        invocation
            .arg(REBUILD_SCRIPT)
            .arg(1)
            .arg(agent.key())
            .arg(if force { "1" } else { "0" });
        for c in conversations {
            invocation
                .arg(&c.customer)
                .arg(c.unread)
                .arg(c.version)
                .arg(c.last_message_at.unwrap_or(0));
        }
        let mut connection = self.connection.clone();
        invocation.query_async(&mut connection).await
    }
}

/// The hash's fields as conversations and total.
fn parse(fields: BTreeMap<String, String>) -> StoredCopy {
    let number = |name: &str| fields.get(name).and_then(|v| v.parse::<i64>().ok());
    let mut copy = StoredCopy {
        total: number("total"),
        ..StoredCopy::default()
    };
    for (field, value) in &fields {
        if field == "total" || field.starts_with("v:") || field.starts_with("t:") {
            continue;
        }
        copy.conversations.insert(
            field.clone(),
            Conversation {
                customer: field.clone(),
                unread: value.parse().unwrap_or(0),
                version: number(&format!("v:{field}")).unwrap_or(0) as u64,
                last_message_at: number(&format!("t:{field}")).filter(|at| *at != 0),
            },
        );
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_key_carries_its_scope_in_one_hash_tag() {
        let agent = Agent {
            tenant_id: "t".into(),
            platform: "2".into(),
            agent_id: "a-1".into(),
        };
        assert_eq!(agent.key(), "im:unread:{t:2:a-1}");
    }

    #[test]
    fn a_hash_without_total_is_read_as_incomplete() {
        let fields = BTreeMap::from([
            ("u1".to_string(), "3".to_string()),
            ("v:u1".to_string(), "7".to_string()),
            ("t:u1".to_string(), "1000".to_string()),
        ]);
        let copy = parse(fields);
        assert_eq!(copy.total, None);
        assert_eq!(
            copy.conversations["u1"],
            Conversation {
                customer: "u1".into(),
                unread: 3,
                version: 7,
                last_message_at: Some(1000),
            }
        );
    }
}
