//! Decoding and validation of inbound records (DESIGN.md, "Inbound records").
//!
//! Guarantee: [`decode`] either returns a value whose every field fits the database
//! columns it will be written to, or an [`InvalidMessage`] saying why — so the write
//! never meets a column too narrow for a valid message. It is pure
//! (no I/O) and never panics on any input.

use serde::Deserialize;
use serde_json::Value;

/// Most bytes an external id (and tenant, platform, agent) may have: the key columns are
/// `VARCHAR(64)`.
pub const MAX_ID_BYTES: usize = 64;
/// `customer.nickname` is `VARCHAR(255)`; longer nicknames are cut at a character
/// boundary (cosmetic data is never a reason to lose a message).
pub const MAX_NICKNAME_CHARS: usize = 255;
/// `customer.avatar` is `VARCHAR(2048)`; a longer avatar URL is dropped, not cut (a cut
/// URL is a wrong URL).
pub const MAX_AVATAR_CHARS: usize = 2048;
/// `message.message_type` is `VARCHAR(64)`.
pub const MAX_MESSAGE_TYPE_CHARS: usize = 64;
/// Default input limit: 512 KiB.
pub const DEFAULT_MAX_BYTES: usize = 512 * 1024;

const DEFAULT_TENANT: &str = "default";
const DEFAULT_PLATFORM: &str = "default";

/// Why a record was rejected. Bad input is never retried: it goes to the dead-letter
/// topic with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidMessage(pub String);

/// Error class named in the `kafka_dlt-exception-fqcn` header of dead letters.
pub const INVALID_MESSAGE_FQCN: &str = "im_ingest::InvalidMessage";

/// One decoded inbound record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Message(ChatMessage),
    Read(ReadReceipt),
}

impl Inbound {
    /// The customer this record belongs to: the unit of locking and serialisation.
    pub fn user(&self) -> UserKey {
        match self {
            Inbound::Message(m) => m.user(),
            Inbound::Read(r) => UserKey {
                tenant_id: r.tenant_id.clone(),
                platform: r.platform.clone(),
                user_id: r.from_user_id.clone(),
            },
        }
    }
}

/// (tenant, platform, customer) — the natural key of a customer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserKey {
    pub tenant_id: String,
    pub platform: String,
    pub user_id: String,
}

/// A chat message from a customer (`from_user_id`) to one of our agents (`to_user_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub tenant_id: String,
    pub platform: String,
    pub message_id: String,
    pub from_user_id: String,
    pub to_user_id: String,
    pub message_type: String,
    pub content: String,
    /// Epoch milliseconds.
    pub sent_at: i64,
    /// The customer's nickname/avatar as this message carries them, if it does.
    pub profile: Option<Profile>,
}

impl ChatMessage {
    pub fn user(&self) -> UserKey {
        UserKey {
            tenant_id: self.tenant_id.clone(),
            platform: self.platform.clone(),
            user_id: self.from_user_id.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub nickname: Option<String>,
    pub avatar: Option<String>,
}

/// The agent has read the conversation with the customer up to `read_up_to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReceipt {
    pub tenant_id: String,
    pub platform: String,
    pub from_user_id: String,
    pub to_user_id: String,
    /// Epoch milliseconds: messages with `sent_at <= read_up_to` are read.
    pub read_up_to: i64,
}

/// The wire shape, loosely typed where platforms are loose (numbers as strings, one
/// object or a list). Unknown fields are ignored.
#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: Option<String>,
    tenant_id: Option<String>,
    platform: Option<String>,
    message_source: Option<Value>,
    message_id: Option<String>,
    from_user_id: Option<String>,
    to_user_id: Option<String>,
    message_type: Option<String>,
    content: Option<String>,
    timestamp: Option<Value>,
    user_info: Option<Value>,
}

#[derive(Deserialize)]
struct RawUserInfo {
    user_id: Option<String>,
    nickname: Option<String>,
    header_image: Option<String>,
}

/// Decodes and validates one record value. `max_bytes` is the input limit.
pub fn decode(value: Option<&[u8]>, max_bytes: usize) -> Result<Inbound, InvalidMessage> {
    let bytes = match value {
        None => return Err(invalid("empty record: no value")),
        Some([]) => return Err(invalid("empty record: zero-length value")),
        Some(bytes) => bytes,
    };
    if bytes.len() > max_bytes {
        return Err(invalid(format!(
            "record of {} bytes exceeds the limit of {max_bytes} bytes",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| invalid(format!("value is not valid UTF-8: {e}")))?;
    let json: Value =
        serde_json::from_str(text).map_err(|e| invalid(format!("value is not JSON: {e}")))?;
    if !json.is_object() {
        return Err(invalid("value is JSON but not an object"));
    }
    let raw: Raw = serde_json::from_value(json)
        .map_err(|e| invalid(format!("value has the wrong shape: {e}")))?;

    let tenant_id = optional_id("tenant_id", raw.tenant_id, DEFAULT_TENANT)?;
    let platform = match (raw.platform, raw.message_source) {
        (Some(platform), _) => id("platform", Some(platform))?,
        (None, Some(source)) => id("message_source", Some(message_source_text(source)?))?,
        (None, None) => DEFAULT_PLATFORM.to_string(),
    };
    let from_user_id = id("from_user_id", raw.from_user_id)?;
    let to_user_id = id("to_user_id", raw.to_user_id)?;
    let timestamp = epoch_millis(raw.timestamp)?;

    match raw.kind.as_deref() {
        None | Some("message") => {}
        Some("read") => {
            return Ok(Inbound::Read(ReadReceipt {
                tenant_id,
                platform,
                from_user_id,
                to_user_id,
                read_up_to: timestamp,
            }))
        }
        Some(other) => {
            return Err(invalid(format!(
                "unknown type {other:?} (expected \"message\" or \"read\")"
            )))
        }
    }

    let message_id = id("message_id", raw.message_id)?;
    let message_type = raw.message_type.unwrap_or_default();
    if message_type.chars().count() > MAX_MESSAGE_TYPE_CHARS {
        return Err(invalid(format!(
            "message_type is longer than {MAX_MESSAGE_TYPE_CHARS} characters"
        )));
    }
    let profile = raw
        .user_info
        .map(|info| profile_of(info, &from_user_id))
        .transpose()?
        .flatten();
    Ok(Inbound::Message(ChatMessage {
        tenant_id,
        platform,
        message_id,
        from_user_id,
        to_user_id,
        message_type,
        content: raw.content.unwrap_or_default(),
        sent_at: timestamp,
        profile,
    }))
}

fn invalid(reason: impl Into<String>) -> InvalidMessage {
    InvalidMessage(reason.into())
}

/// An id: present, non-empty, at most [`MAX_ID_BYTES`] bytes, no surrounding whitespace
/// (binary collations ignore trailing spaces, so `a` and `a ` would collide), no control
/// characters.
fn id(field: &str, value: Option<String>) -> Result<String, InvalidMessage> {
    let value = value.ok_or_else(|| invalid(format!("{field} is missing")))?;
    if value.is_empty() {
        return Err(invalid(format!("{field} is empty")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(invalid(format!(
            "{field} is {} bytes long, more than {MAX_ID_BYTES}",
            value.len()
        )));
    }
    if value.trim() != value {
        return Err(invalid(format!(
            "{field} has leading or trailing whitespace"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!("{field} contains a control character")));
    }
    Ok(value)
}

fn optional_id(
    field: &str,
    value: Option<String>,
    default: &str,
) -> Result<String, InvalidMessage> {
    match value {
        None => Ok(default.to_string()),
        some => id(field, some),
    }
}

/// `message_source` names the platform: a number is written as its decimal string.
fn message_source_text(source: Value) -> Result<String, InvalidMessage> {
    match source {
        Value::String(s) => Ok(s),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        other => Err(invalid(format!(
            "message_source must be an integer or a string, not {other}"
        ))),
    }
}

fn epoch_millis(value: Option<Value>) -> Result<i64, InvalidMessage> {
    let parsed = match value {
        None => return Err(invalid("timestamp is missing")),
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.parse::<i64>().ok(),
        Some(_) => None,
    };
    match parsed {
        Some(ms) if ms >= 0 => Ok(ms),
        _ => Err(invalid(
            "timestamp must be epoch milliseconds (a non-negative integer or numeric string)",
        )),
    }
}

/// The customer's profile from `user_info` (an object or a list): the entry whose
/// `user_id` is the customer's, or a single entry without `user_id`. Entries about other
/// users (the agent) are never applied to the customer.
fn profile_of(info: Value, customer: &str) -> Result<Option<Profile>, InvalidMessage> {
    let entries: Vec<RawUserInfo> = match info {
        Value::Null => return Ok(None),
        Value::Array(items) => items
            .into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>(),
        object @ Value::Object(_) => serde_json::from_value(object).map(|one| vec![one]),
        other => {
            return Err(invalid(format!(
                "user_info must be an object or a list, not {other}"
            )))
        }
    }
    .map_err(|e| invalid(format!("user_info has the wrong shape: {e}")))?;

    let single_anonymous = entries.len() == 1 && entries[0].user_id.is_none();
    let entry = entries
        .into_iter()
        .find(|e| single_anonymous || e.user_id.as_deref() == Some(customer));
    Ok(entry.and_then(|e| {
        let nickname = e
            .nickname
            .map(|n| n.chars().take(MAX_NICKNAME_CHARS).collect());
        let avatar = e
            .header_image
            .filter(|a| a.chars().count() <= MAX_AVATAR_CHARS);
        (nickname.is_some() || avatar.is_some()).then_some(Profile { nickname, avatar })
    }))
}

#[cfg(test)]
mod tests;
