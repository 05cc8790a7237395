//! A conversation's unread count as the truth in MySQL keeps it: `session.read_up_to`
//! (the read watermark), `session.unread_count` and `session.unread_version`.
//!
//! Guarantee: after any set of messages and read receipts has been written, in any
//! order, in any batches, any number of times, a session's `unread_count` is the
//! number of its messages sent after its watermark, and the watermark is the latest
//! read receipt's (`GREATEST`) — or, with expiry, just before the first message after a
//! silence longer than the expiry (see [`plan`]). Each change of the state increases
//! the version by one, so a copy elsewhere can keep the newest.
//!
//! The decision is pure ([`plan`]): the batch transaction reads each session's state
//! after locking its row (the session upsert) and before changing it, so no other
//! writer's messages or receipts can come in between (every writer of a session's
//! messages takes that row lock first).

/// A session's unread state, as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SessionState {
    pub read_up_to: Option<i64>,
    pub last_message_at: Option<i64>,
    pub unread: u32,
    pub version: u64,
}

/// What one batch brings to one session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Arrivals {
    /// The newest `sent_at` of the batch's messages (new or already stored).
    pub latest_message_at: Option<i64>,
    /// `sent_at` of each message row this batch inserted.
    pub new_sent_at: Vec<i64>,
    /// The newest watermark of the batch's read receipts.
    pub read_up_to: Option<i64>,
}

impl Arrivals {
    pub fn message(&mut self, sent_at: i64, inserted: bool) {
        self.latest_message_at = Some(self.latest_message_at.map_or(sent_at, |t| t.max(sent_at)));
        if inserted {
            self.new_sent_at.push(sent_at);
        }
    }

    pub fn receipt(&mut self, read_up_to: i64) {
        self.read_up_to = Some(self.read_up_to.map_or(read_up_to, |t| t.max(read_up_to)));
    }
}

/// What to do to a session's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Nothing changed.
    Keep,
    /// The new state, known without reading the messages.
    Set(SessionState),
    /// The watermark moved: the count must be taken again from the messages (the new
    /// state's `unread` is a placeholder until then).
    Recount(SessionState),
}

/// The session's next state. Messages after the watermark add one each; a receipt that
/// moves the watermark forward asks for a recount. With `expire_after` (ms), a new
/// message sent more than that after the session's newest one (in event time) first
/// moves the watermark to just before itself, so the silence's leftovers stop counting
/// and the message counts from 1 — the same rule the read side applies to a
/// conversation whose newest message is that old.
pub(crate) fn plan(old: &SessionState, arrivals: &Arrivals, expire_after: Option<i64>) -> Plan {
    let mut watermark = max_option(old.read_up_to, arrivals.read_up_to);
    let mut newest = old.last_message_at;
    let mut new_sent_at = arrivals.new_sent_at.clone();
    new_sent_at.sort_unstable();
    for &sent_at in &new_sent_at {
        if let (Some(limit), Some(previous)) = (expire_after, newest) {
            if sent_at.saturating_sub(previous) > limit {
                watermark = max_option(watermark, Some(sent_at - 1));
            }
        }
        newest = max_option(newest, Some(sent_at));
    }
    let last_message_at = max_option(newest, arrivals.latest_message_at);
    let next = SessionState {
        read_up_to: watermark,
        last_message_at,
        unread: old.unread,
        version: old.version + 1,
    };
    if watermark != old.read_up_to {
        return Plan::Recount(next);
    }
    let added = new_sent_at
        .iter()
        .filter(|&&sent_at| watermark.is_none_or(|w| sent_at > w))
        .count() as u32;
    if added == 0 && last_message_at == old.last_message_at {
        return Plan::Keep;
    }
    Plan::Set(SessionState {
        unread: old.unread + added,
        ..next
    })
}

fn max_option(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn state(read_up_to: Option<i64>, last: Option<i64>, unread: u32) -> SessionState {
        SessionState {
            read_up_to,
            last_message_at: last,
            unread,
            version: 7,
        }
    }

    fn messages(new: &[i64], old_copies: &[i64]) -> Arrivals {
        let mut arrivals = Arrivals::default();
        for &at in new {
            arrivals.message(at, true);
        }
        for &at in old_copies {
            arrivals.message(at, false);
        }
        arrivals
    }

    #[test]
    fn new_messages_after_the_watermark_add_one_each_and_the_version_moves_once() {
        let plan = plan(
            &state(Some(100), Some(150), 2),
            &messages(&[90, 200, 300], &[]),
            None,
        );
        assert_eq!(
            plan,
            Plan::Set(SessionState {
                read_up_to: Some(100),
                last_message_at: Some(300),
                unread: 4,
                version: 8,
            })
        );
    }

    #[test]
    fn copies_of_stored_messages_change_nothing() {
        let old = state(Some(100), Some(300), 2);
        assert_eq!(plan(&old, &messages(&[], &[200, 300]), None), Plan::Keep);
    }

    #[test]
    fn a_message_read_already_moves_only_the_newest_time() {
        let plan = plan(
            &state(Some(500), Some(300), 0),
            &messages(&[400], &[]),
            None,
        );
        assert_eq!(
            plan,
            Plan::Set(SessionState {
                read_up_to: Some(500),
                last_message_at: Some(400),
                unread: 0,
                version: 8,
            })
        );
    }

    #[test]
    fn a_receipt_that_moves_the_watermark_asks_for_a_recount_and_an_older_one_does_not() {
        let old = state(Some(100), Some(300), 2);
        let mut newer = Arrivals::default();
        newer.receipt(250);
        newer.receipt(200);
        assert!(matches!(
            plan(&old, &newer, None),
            Plan::Recount(SessionState {
                read_up_to: Some(250),
                ..
            })
        ));
        let mut older = Arrivals::default();
        older.receipt(50);
        assert_eq!(plan(&old, &older, None), Plan::Keep);
    }

    #[test]
    fn a_first_receipt_on_a_session_without_messages_sets_its_watermark() {
        let mut receipt = Arrivals::default();
        receipt.receipt(10);
        assert!(matches!(
            plan(&SessionState::default(), &receipt, None),
            Plan::Recount(SessionState {
                read_up_to: Some(10),
                last_message_at: None,
                version: 1,
                ..
            })
        ));
    }

    #[test]
    fn with_expiry_a_message_after_a_long_silence_moves_the_watermark_to_just_before_it() {
        let old = state(None, Some(1_000), 5);
        let late = 1_000 + 8 * DAY;
        assert_eq!(
            plan(&old, &messages(&[late], &[]), Some(7 * DAY)),
            Plan::Recount(SessionState {
                read_up_to: Some(late - 1),
                last_message_at: Some(late),
                unread: 5,
                version: 8,
            })
        );
        // Within the expiry, or with expiry off, it just counts.
        assert!(matches!(
            plan(&old, &messages(&[1_000 + 6 * DAY], &[]), Some(7 * DAY)),
            Plan::Set(SessionState { unread: 6, .. })
        ));
        assert!(matches!(
            plan(&old, &messages(&[late], &[]), None),
            Plan::Set(SessionState { unread: 6, .. })
        ));
    }

    #[test]
    fn with_expiry_a_silence_inside_one_batch_counts_like_one_across_batches() {
        let (first, second) = (1_000, 1_000 + 8 * DAY);
        let together = plan(
            &SessionState::default(),
            &messages(&[second, first], &[]),
            Some(7 * DAY),
        );
        assert!(matches!(
            together,
            Plan::Recount(SessionState { read_up_to: Some(w), .. }) if w == second - 1
        ));
    }
}
