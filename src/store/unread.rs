//! A conversation's unread count as the truth in MySQL keeps it: `session.read_up_to`
//! (the read watermark), `session.expired_up_to` (the watermark expiry implies),
//! `session.unread_count` and `session.unread_version`.
//!
//! Guarantee: after any set of messages and read receipts has been written, in any
//! order, in any batches, any number of times, a session's `read_up_to` is the newest
//! receipt's watermark (`GREATEST`), its `expired_up_to` — with expiry on — is just
//! before the newest message that followed a silence longer than the expiry (in event
//! time: between the message and the one sent before it), and its `unread_count` is the
//! number of its messages sent after both. Each change of the state increases the
//! version by one, so a copy elsewhere can keep the newest.
//!
//! The decision is pure ([`plan`]): the batch transaction reads each session's state
//! after locking its customer (see `batch`) and before changing it, so no other
//! writer's messages or receipts can come in between. When the state cannot be told
//! from what the batch brings, the plan says which rows to read: a recount, or — for a
//! message sent before the session's newest one, which may fill a silence — the
//! expiry watermark derived again from every message's gap.

/// A session's unread state, as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SessionState {
    /// The newest read receipt's watermark.
    pub read_up_to: Option<i64>,
    /// Just before the newest message that followed a silence longer than the expiry.
    pub expired_up_to: Option<i64>,
    pub last_message_at: Option<i64>,
    pub unread: u32,
    pub version: u64,
}

impl SessionState {
    /// Messages sent after this are unread.
    pub fn watermark(&self) -> Option<i64> {
        max_option(self.read_up_to, self.expired_up_to)
    }
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
        self.latest_message_at = max_option(self.latest_message_at, Some(sent_at));
        if inserted {
            self.new_sent_at.push(sent_at);
        }
    }

    pub fn receipt(&mut self, read_up_to: i64) {
        self.read_up_to = max_option(self.read_up_to, Some(read_up_to));
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
    /// With expiry on, a message arrived that was sent before the session's newest:
    /// `expired_up_to` must be derived again from all the session's messages, then the
    /// count taken again (both placeholders until then).
    Rederive(SessionState),
}

/// The session's next state; see the module guarantee. `expire_after` in ms.
pub(crate) fn plan(old: &SessionState, arrivals: &Arrivals, expire_after: Option<i64>) -> Plan {
    let mut new_sent_at = arrivals.new_sent_at.clone();
    new_sent_at.sort_unstable();
    let late = match (expire_after, old.last_message_at, new_sent_at.first()) {
        (Some(_), Some(newest), Some(first)) => *first < newest,
        _ => false,
    };
    // With expiry off, an expiry watermark left from when it was on goes.
    let mut expired_up_to = expire_after.and(old.expired_up_to);
    let mut newest = old.last_message_at;
    if let (Some(limit), false) = (expire_after, late) {
        // In order: each new message's predecessor is the newest before it.
        for &sent_at in &new_sent_at {
            if newest.is_some_and(|previous| sent_at.saturating_sub(previous) > limit) {
                expired_up_to = max_option(expired_up_to, Some(sent_at - 1));
            }
            newest = max_option(newest, Some(sent_at));
        }
    }
    let next = SessionState {
        read_up_to: max_option(old.read_up_to, arrivals.read_up_to),
        expired_up_to,
        last_message_at: max_option(old.last_message_at, arrivals.latest_message_at),
        unread: old.unread,
        version: old.version + 1,
    };
    if late {
        return Plan::Rederive(next);
    }
    if next.watermark() != old.watermark() {
        return Plan::Recount(next);
    }
    let watermark = next.watermark();
    let added = new_sent_at
        .iter()
        .filter(|&&sent_at| watermark.is_none_or(|w| sent_at > w))
        .count() as u32;
    let unchanged = SessionState {
        unread: old.unread,
        version: old.version,
        ..next
    } == *old;
    if added == 0 && unchanged {
        return Plan::Keep;
    }
    Plan::Set(SessionState {
        unread: old.unread + added,
        ..next
    })
}

/// `expired_up_to` of a session whose messages were sent at `sent_at` (any order): just
/// before the newest message sent more than `expire_after` ms after the one before it.
/// The rule [`plan`] applies message by message, and the batch's derivation in SQL.
#[cfg(test)]
fn derived_expiry(sent_at: &[i64], expire_after: i64) -> Option<i64> {
    let mut sorted = sent_at.to_vec();
    sorted.sort_unstable();
    sorted
        .windows(2)
        .filter(|pair| pair[1] - pair[0] > expire_after)
        .map(|pair| pair[1] - 1)
        .max()
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
            expired_up_to: None,
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
                expired_up_to: None,
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
                expired_up_to: None,
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
    fn with_expiry_turned_off_the_next_change_drops_the_expiry_watermark_and_recounts() {
        let old = SessionState {
            expired_up_to: Some(500),
            ..state(None, Some(600), 1)
        };
        assert!(matches!(
            plan(&old, &messages(&[700], &[]), None),
            Plan::Recount(SessionState {
                expired_up_to: None,
                last_message_at: Some(700),
                ..
            })
        ));
    }

    #[test]
    fn a_receipt_below_the_expiry_watermark_is_kept_without_a_recount() {
        let old = SessionState {
            expired_up_to: Some(500),
            ..state(Some(100), Some(600), 1)
        };
        let mut receipt = Arrivals::default();
        receipt.receipt(300);
        assert_eq!(
            plan(&old, &receipt, Some(7 * DAY)),
            Plan::Set(SessionState {
                read_up_to: Some(300),
                version: 8,
                ..old
            })
        );
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
                read_up_to: None,
                expired_up_to: Some(late - 1),
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
            Plan::Recount(SessionState { expired_up_to: Some(w), .. }) if w == second - 1
        ));
    }

    #[test]
    fn with_expiry_a_message_sent_before_the_newest_asks_for_the_expiry_to_be_derived_again() {
        let old = state(None, Some(9 * DAY), 1);
        assert!(matches!(
            plan(&old, &messages(&[3 * DAY], &[]), Some(7 * DAY)),
            Plan::Rederive(_)
        ));
        // Without expiry, a late message just counts.
        assert!(matches!(
            plan(&old, &messages(&[3 * DAY], &[]), None),
            Plan::Set(SessionState { unread: 2, .. })
        ));
    }

    #[test]
    fn in_order_the_plan_gives_the_derived_expiry_and_a_gap_filled_later_is_not_one() {
        let limit = 7 * DAY;
        // 0d, 9d, 20d in order: silences before 9d and 20d.
        let mut state = SessionState::default();
        for at in [0, 9 * DAY, 20 * DAY] {
            state = match plan(&state, &messages(&[at], &[]), Some(limit)) {
                Plan::Set(next) | Plan::Recount(next) => next,
                other => panic!("{other:?}"),
            };
        }
        assert_eq!(
            state.expired_up_to,
            derived_expiry(&[0, 9 * DAY, 20 * DAY], limit)
        );
        assert_eq!(state.expired_up_to, Some(20 * DAY - 1));
        // 3d and 15d fill both silences: no expiry at all, whatever the order.
        assert_eq!(
            derived_expiry(&[20 * DAY, 3 * DAY, 0, 15 * DAY, 9 * DAY], limit),
            None
        );
    }
}
