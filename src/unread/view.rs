//! What an agent sees: the conversations with unread messages, largest first, and the
//! total — from whichever source answered (`GET /v1/unread`).
//!
//! Guarantee: one rule for every source (the Redis copy and the MySQL fallback both
//! hold raw counts; reconcile copies raw counts): a conversation whose newest message
//! is older than the expiry (event time, against now) counts 0, and the total drops by
//! its count in the same answer;
//! pages follow one order (unread descending, then customer id) and a cursor names the
//! last conversation shown, so paging never repeats or skips one that did not change.

use serde::Serialize;

use super::copy::Conversation;

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Redis,
    Mysql,
}

/// One conversation in an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionUnread {
    pub from_user_id: String,
    pub unread: u32,
}

/// The answer of `GET /v1/unread` (DESIGN.md, "Command line and configuration").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnreadView {
    pub source: Source,
    pub total: i64,
    pub sessions: Vec<SessionUnread>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Whether a conversation counts 0 because its newest message is older than
/// `expire_after` ms before `now` (epoch ms).
pub fn expired(conversation: &Conversation, now: i64, expire_after: Option<i64>) -> bool {
    match (expire_after, conversation.last_message_at) {
        (Some(limit), Some(at)) => now.saturating_sub(at) > limit,
        _ => false,
    }
}

/// A page of the answer: `total` is the stored total (when the source keeps one) or the
/// sum, less what expired.
pub fn page(
    source: Source,
    conversations: impl IntoIterator<Item = Conversation>,
    stored_total: Option<i64>,
    now: i64,
    expire_after: Option<i64>,
    limit: usize,
    cursor: Option<&Cursor>,
) -> UnreadView {
    let mut sum = 0;
    let mut expired_sum = 0;
    let mut unread: Vec<SessionUnread> = Vec::new();
    for c in conversations {
        sum += i64::from(c.unread);
        if expired(&c, now, expire_after) {
            expired_sum += i64::from(c.unread);
        } else if c.unread > 0 {
            unread.push(SessionUnread {
                from_user_id: c.customer,
                unread: c.unread,
            });
        }
    }
    unread.sort_by(|a, b| {
        b.unread
            .cmp(&a.unread)
            .then_with(|| a.from_user_id.cmp(&b.from_user_id))
    });
    let start = cursor.map_or(0, |cursor| {
        unread.partition_point(|s| cursor.is_at_or_after(s))
    });
    let sessions: Vec<SessionUnread> = unread.iter().skip(start).take(limit).cloned().collect();
    let next_cursor = (start + sessions.len() < unread.len())
        .then(|| sessions.last().map(Cursor::after).map(|c| c.encode()))
        .flatten();
    UnreadView {
        source,
        total: stored_total.unwrap_or(sum) - expired_sum,
        sessions,
        next_cursor,
    }
}

/// The position after a conversation in the answer's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    unread: u32,
    from_user_id: String,
}

impl Cursor {
    fn after(session: &SessionUnread) -> Self {
        Self {
            unread: session.unread,
            from_user_id: session.from_user_id.clone(),
        }
    }

    /// Whether `session` comes at or before the cursor's conversation (already shown).
    fn is_at_or_after(&self, session: &SessionUnread) -> bool {
        (std::cmp::Reverse(session.unread), &session.from_user_id)
            <= (std::cmp::Reverse(self.unread), &self.from_user_id)
    }

    /// Opaque to clients: `<unread>:<from_user_id>` in hex (URL-safe as it is).
    pub fn encode(&self) -> String {
        format!("{}:{}", self.unread, self.from_user_id)
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn decode(text: &str) -> Option<Self> {
        if !text.len().is_multiple_of(2) || !text.is_ascii() {
            return None;
        }
        let bytes = (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let plain = String::from_utf8(bytes).ok()?;
        let (unread, from_user_id) = plain.split_once(':')?;
        Some(Self {
            unread: unread.parse().ok()?,
            from_user_id: from_user_id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn conversation(customer: &str, unread: u32, at: i64) -> Conversation {
        Conversation {
            customer: customer.into(),
            unread,
            version: 1,
            last_message_at: Some(at),
        }
    }

    #[test]
    fn sessions_with_unread_come_largest_first_and_the_total_is_their_sum() {
        let all = [
            conversation("b", 2, 0),
            conversation("a", 2, 0),
            conversation("c", 0, 0),
            conversation("d", 5, 0),
        ];
        let view = page(Source::Redis, all, None, 1, None, 100, None);
        let order: Vec<&str> = view
            .sessions
            .iter()
            .map(|s| s.from_user_id.as_str())
            .collect();
        assert_eq!(order, ["d", "a", "b"]);
        assert_eq!(view.total, 9);
        assert_eq!(view.next_cursor, None);
    }

    #[test]
    fn pages_follow_the_cursor_without_repeats_or_gaps() {
        let all: Vec<Conversation> = (0..7)
            .map(|n| conversation(&format!("u{n}"), 1 + n % 3, 0))
            .collect();
        let whole = page(Source::Redis, all.clone(), None, 0, None, 100, None);
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let view = page(
                Source::Redis,
                all.clone(),
                None,
                0,
                None,
                3,
                cursor.as_ref(),
            );
            seen.extend(view.sessions);
            match view.next_cursor {
                Some(next) => cursor = Cursor::decode(&next),
                None => break,
            }
        }
        assert_eq!(seen, whole.sessions);
    }

    #[test]
    fn a_cursor_survives_its_round_trip_and_text_it_did_not_make_is_refused() {
        let cursor = Cursor::after(&SessionUnread {
            from_user_id: "a:b&c".into(),
            unread: 7,
        });
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor.clone()));
        assert!(cursor.encode().bytes().all(|b| b.is_ascii_hexdigit()));
        for foreign in ["nonsense", "7:a", "zz", "0"] {
            assert_eq!(Cursor::decode(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn an_expired_conversation_counts_zero_and_leaves_the_total_at_once() {
        let now = 100 * DAY;
        let all = [
            conversation("old", 4, now - 8 * DAY),
            conversation("new", 1, now - DAY),
        ];
        let view = page(
            Source::Mysql,
            all.clone(),
            Some(5),
            now,
            Some(7 * DAY),
            100,
            None,
        );
        assert_eq!(view.total, 1);
        assert_eq!(view.sessions.len(), 1);
        let without_expiry = page(Source::Mysql, all, Some(5), now, None, 100, None);
        assert_eq!(without_expiry.total, 5);
    }

    #[test]
    fn the_answer_has_the_contract_shape() {
        let view = page(
            Source::Redis,
            [conversation("u", 1, 0)],
            None,
            0,
            None,
            100,
            None,
        );
        assert_eq!(
            serde_json::to_value(&view).unwrap(),
            serde_json::json!({"source": "redis", "total": 1, "sessions": [{"from_user_id": "u", "unread": 1}]})
        );
    }
}
