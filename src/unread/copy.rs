//! The fast copy of unread counts in Redis: per agent, the hash
//! `im:unread:{<tenant>:<platform>:<agent>}` with fields `<from_user_id>` → count,
//! `v:<from_user_id>` → version and `total` → the sum (DESIGN.md, "Redis keys"), and
//! beside it, under the same hash tag, `im:unread-at:{…}`: `<from_user_id>` → the
//! conversation's newest message time (for expiry on read).
//!
//! Guarantee: a conversation's fields only ever move to a newer version of the MySQL
//! truth, and `total` moves by the same difference in the same script, so it is always
//! the sum of the counts — whatever the order and number of times changes arrive, with
//! no dedupe window. A hash without `total` is incomplete (Redis lost it, or it was
//! never built): changes still land in its fields, and the writer that finds it so (or
//! the first read) rebuilds it from MySQL, merging by version, so a change applied
//! while the rebuild read MySQL is kept. A customer id that is a field name of the
//! hash's own (`total`, `v:…`) is stored under a field starting with U+0001, which no
//! valid id contains. Each script touches one agent's keys (one hash slot); a batch is
//! a pipeline of such scripts.

use std::collections::{BTreeMap, BTreeSet};

use redis::aio::ConnectionManager;

use crate::store::ConversationUnread;

/// Applies one conversation's state (ARGV: field, count, version, time) if its version
/// is newer than the stored one; moves `total` (when present) by the difference.
/// Returns 0 when the hash is incomplete (no `total`: it needs a rebuild), 1 otherwise.
const APPLY_SCRIPT: &str = r"
local complete = redis.call('HEXISTS', KEYS[1], 'total')
local stored = tonumber(redis.call('HGET', KEYS[1], 'v:' .. ARGV[1]) or '') or -1
if tonumber(ARGV[3]) <= stored then return complete end
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '') or 0
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'v:' .. ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
if complete == 1 then
  redis.call('HINCRBY', KEYS[1], 'total', tonumber(ARGV[2]) - old)
end
return complete
";

/// Merges an agent's conversations read from MySQL (ARGV[1]: `1` to overwrite equal
/// versions too, as reconcile does; then field, count, version, time per conversation):
/// each is taken unless the stored version is newer; then `total` is set to the sum of
/// the counts. Returns the total.
const REBUILD_SCRIPT: &str = r"
local force = ARGV[1] == '1'
for i = 2, #ARGV, 4 do
  local field = ARGV[i]
  local stored = tonumber(redis.call('HGET', KEYS[1], 'v:' .. field) or '') or -1
  local version = tonumber(ARGV[i + 2])
  if stored < version or (force and stored == version) then
    redis.call('HSET', KEYS[1], field, ARGV[i + 1], 'v:' .. field, ARGV[i + 2])
    redis.call('HSET', KEYS[2], field, ARGV[i + 3])
  end
end
local all = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #all, 2 do
  local field = all[i]
  if field ~= 'total' and string.sub(field, 1, 2) ~= 'v:' then
    total = total + (tonumber(all[i + 1]) or 0)
  end
end
redis.call('HSET', KEYS[1], 'total', total)
return total
";

/// Sets conversations exactly, each only if its stored version is still the one the
/// caller saw (ARGV per conversation: field, seen version — 0 for none or unreadable,
/// as [`parse`] reads it — then count, version, time, or three '' to remove it), moving
/// `total` by the difference: reconcile's repair of versions that MySQL does not have.
/// Returns how many were set. (Every script reads an unreadable number as absent.)
const REPAIR_SCRIPT: &str = r"
local repaired = 0
for i = 1, #ARGV, 5 do
  local field = ARGV[i]
  local stored = tonumber(redis.call('HGET', KEYS[1], 'v:' .. field) or '') or 0
  if stored == tonumber(ARGV[i + 1]) then
    local old = tonumber(redis.call('HGET', KEYS[1], field) or '') or 0
    local new = 0
    if ARGV[i + 2] == '' then
      redis.call('HDEL', KEYS[1], field, 'v:' .. field)
      redis.call('HDEL', KEYS[2], field)
    else
      new = tonumber(ARGV[i + 2])
      redis.call('HSET', KEYS[1], field, ARGV[i + 2], 'v:' .. field, ARGV[i + 3])
      redis.call('HSET', KEYS[2], field, ARGV[i + 4])
    end
    if redis.call('HEXISTS', KEYS[1], 'total') == 1 then
      redis.call('HINCRBY', KEYS[1], 'total', new - old)
    end
    repaired = repaired + 1
  end
end
return repaired
";

/// Marks a field that would otherwise be one of the hash's own names.
const ESCAPE: char = '\u{1}';

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
        format!("im:unread:{{{}}}", self.tag())
    }

    /// The conversations' newest message times, in the same slot.
    pub fn times_key(&self) -> String {
        format!("im:unread-at:{{{}}}", self.tag())
    }

    /// `<tenant>:<platform>:<agent>`, each part as it is unless it holds `:` or `%`
    /// (then `%` → `%25`, `:` → `%3A`), so two agents never share a key (`a` + `b:c`
    /// against `a:b` + `c`).
    fn tag(&self) -> String {
        [&self.tenant_id, &self.platform, &self.agent_id]
            .map(|part| key_part(part))
            .join(":")
    }
}

/// (tenant, platform, agent), as queries return them.
impl From<(String, String, String)> for Agent {
    fn from((tenant_id, platform, agent_id): (String, String, String)) -> Self {
        Self {
            tenant_id,
            platform,
            agent_id,
        }
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

fn key_part(part: &str) -> std::borrow::Cow<'_, str> {
    if part.contains([':', '%']) {
        part.replace('%', "%25").replace(':', "%3A").into()
    } else {
        part.into()
    }
}

/// The hash field of a customer's count (see the module guarantee).
pub fn field(customer: &str) -> String {
    if customer == "total" || customer.starts_with("v:") {
        format!("{ESCAPE}{customer}")
    } else {
        customer.to_string()
    }
}

/// The customer a count field belongs to.
fn customer_of(field: &str) -> &str {
    field.strip_prefix(ESCAPE).unwrap_or(field)
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

/// An agent's hash as stored: its conversations by customer, and `total` if the hash
/// is complete.
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
            let agent = Agent::from(change);
            pipe.cmd("EVAL")
                .arg(APPLY_SCRIPT)
                .arg(2)
                .arg(agent.key())
                .arg(agent.times_key())
                .arg(field(&change.customer))
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
        let (counts, times): (BTreeMap<String, String>, BTreeMap<String, String>) = redis::pipe()
            .cmd("HGETALL")
            .arg(agent.key())
            .cmd("HGETALL")
            .arg(agent.times_key())
            .query_async(&mut connection)
            .await?;
        Ok(parse(counts, &times))
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
            .arg(2)
            .arg(agent.key())
            .arg(agent.times_key())
            .arg(if force { "1" } else { "0" });
        for c in conversations {
            invocation
                .arg(field(&c.customer))
                .arg(c.unread)
                .arg(c.version)
                .arg(c.last_message_at.unwrap_or(0));
        }
        let mut connection = self.connection.clone();
        invocation.query_async(&mut connection).await
    }

    /// Sets each conversation of `repairs` to MySQL's state (`None`: removes it), if
    /// its stored version is still the one seen (see [`REPAIR_SCRIPT`]); returns how
    /// many were set.
    pub async fn repair(
        &self,
        agent: &Agent,
        repairs: &[(Conversation, Option<Conversation>)],
    ) -> redis::RedisResult<i64> {
        if repairs.is_empty() {
            return Ok(0);
        }
        let mut invocation = redis::cmd("EVAL");
        invocation
            .arg(REPAIR_SCRIPT)
            .arg(2)
            .arg(agent.key())
            .arg(agent.times_key());
        for (seen, truth) in repairs {
            invocation
                .arg(field(&seen.customer))
                .arg(seen.version.to_string());
            match truth {
                Some(t) => invocation
                    .arg(t.unread)
                    .arg(t.version)
                    .arg(t.last_message_at.unwrap_or(0)),
                None => invocation.arg("").arg("").arg(""),
            };
        }
        let mut connection = self.connection.clone();
        invocation.query_async(&mut connection).await
    }
}

/// The hashes' fields as conversations and total.
fn parse(counts: BTreeMap<String, String>, times: &BTreeMap<String, String>) -> StoredCopy {
    let number = |name: &str| counts.get(name).and_then(|v| v.parse::<i64>().ok());
    let mut copy = StoredCopy {
        total: number("total"),
        ..StoredCopy::default()
    };
    for (name, value) in &counts {
        if name == "total" || name.starts_with("v:") {
            continue;
        }
        let customer = customer_of(name).to_string();
        copy.conversations.insert(
            customer.clone(),
            Conversation {
                customer,
                unread: value.parse().unwrap_or(0),
                version: number(&format!("v:{name}")).unwrap_or(0) as u64,
                last_message_at: times
                    .get(name)
                    .and_then(|at| at.parse().ok())
                    .filter(|at| *at != 0),
            },
        );
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_keys_carry_its_scope_in_one_hash_tag() {
        let agent = Agent {
            tenant_id: "t".into(),
            platform: "2".into(),
            agent_id: "a-1".into(),
        };
        assert_eq!(agent.key(), "im:unread:{t:2:a-1}");
        assert_eq!(agent.times_key(), "im:unread-at:{t:2:a-1}");
    }

    #[test]
    fn agents_whose_parts_hold_a_colon_never_share_a_key() {
        let agent = |t: &str, p: &str, a: &str| Agent {
            tenant_id: t.into(),
            platform: p.into(),
            agent_id: a.into(),
        };
        let keys = [
            agent("a", "b:c", "d").key(),
            agent("a:b", "c", "d").key(),
            agent("a", "b", "c:d").key(),
            agent("a", "b%3Ac", "d").key(),
        ];
        assert_eq!(keys[0], "im:unread:{a:b%3Ac:d}");
        let distinct: BTreeSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:?}");
    }

    #[test]
    fn a_hash_without_total_is_read_as_incomplete() {
        let counts = BTreeMap::from([
            ("u1".to_string(), "3".to_string()),
            ("v:u1".to_string(), "7".to_string()),
        ]);
        let times = BTreeMap::from([("u1".to_string(), "1000".to_string())]);
        let copy = parse(counts, &times);
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

    #[test]
    fn customers_named_like_the_hashs_own_fields_get_fields_of_their_own() {
        assert_eq!(field("total"), "\u{1}total");
        assert_eq!(field("v:x"), "\u{1}v:x");
        assert_eq!(field("x"), "x");
        assert_eq!(field("totally"), "totally");
        let counts = BTreeMap::from([
            ("total".to_string(), "5".to_string()),
            (field("total"), "2".to_string()),
            (format!("v:{}", field("total")), "4".to_string()),
            (field("v:x"), "3".to_string()),
            (format!("v:{}", field("v:x")), "1".to_string()),
        ]);
        let copy = parse(counts, &BTreeMap::new());
        assert_eq!(copy.total, Some(5));
        assert_eq!(copy.conversations["total"].unread, 2);
        assert_eq!(copy.conversations["total"].version, 4);
        assert_eq!(copy.conversations["v:x"].unread, 3);
    }
}
