//! The customer's profile fields, each newest-wins on its own.
//!
//! Guarantee: a field (nickname, avatar) takes the value of the newest message that
//! carries it, by (`sent_at`, message id); a message that carries only one field never
//! touches the other. So the stored profile is the same whatever order its messages are
//! applied in, one by one or in batches.

use sqlx::{MySql, QueryBuilder};

use crate::message::ChatMessage;

/// One profile field's value with the marker of the message that carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Marked<'m> {
    pub value: &'m str,
    pub at: i64,
    pub message_id: &'m str,
}

impl Marked<'_> {
    fn marker(&self) -> (i64, &str) {
        (self.at, self.message_id)
    }
}

/// The nickname `message` carries, marked.
pub(super) fn nickname(message: &ChatMessage) -> Option<Marked<'_>> {
    let value = message.profile.as_ref()?.nickname.as_deref()?;
    Some(marked(message, value))
}

/// The avatar `message` carries, marked.
pub(super) fn avatar(message: &ChatMessage) -> Option<Marked<'_>> {
    let value = message.profile.as_ref()?.avatar.as_deref()?;
    Some(marked(message, value))
}

fn marked<'m>(message: &'m ChatMessage, value: &'m str) -> Marked<'m> {
    Marked {
        value,
        at: message.sent_at,
        message_id: &message.message_id,
    }
}

/// The newer of two marked values (either may be missing).
pub(super) fn newest<'m>(a: Option<Marked<'m>>, b: Option<Marked<'m>>) -> Option<Marked<'m>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.marker() > a.marker() { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Whether the row being upserted carries a newer `$field` than the stored one (a
/// macro, so that `concat!` can build the statement at compile time).
macro_rules! newer {
    ($field:literal) => {
        concat!(
            "(VALUES(",
            $field,
            "_at) IS NOT NULL AND (",
            $field,
            "_at IS NULL OR (VALUES(",
            $field,
            "_at), VALUES(",
            $field,
            "_message_id)) > (",
            $field,
            "_at, ",
            $field,
            "_message_id)))"
        )
    };
}

/// The update of one field and its marker when the upserted row's is newer.
/// Assignments run left to right, so the comparison must see the old marker: the value
/// first, then the message id, then the time. After the id is replaced, the comparison
/// for the time can only differ when both times are equal — and then the time keeps
/// the same value either way.
macro_rules! newest_wins {
    ($field:literal) => {
        concat!(
            $field,
            " = IF(",
            newer!($field),
            ", VALUES(",
            $field,
            "), ",
            $field,
            "), ",
            $field,
            "_message_id = IF(",
            newer!($field),
            ", VALUES(",
            $field,
            "_message_id), ",
            $field,
            "_message_id), ",
            $field,
            "_at = IF(",
            newer!($field),
            ", VALUES(",
            $field,
            "_at), ",
            $field,
            "_at)"
        )
    };
}

/// The customer's columns as the upsert inserts them, in this order.
const CUSTOMER_COLUMNS: &str = "INSERT INTO customer (tenant_id, platform, \
     external_user_id, nickname, nickname_at, nickname_message_id, avatar, avatar_at, \
     avatar_message_id) ";

/// The customer upsert's convergent update: each profile field newest-wins on its own.
const CUSTOMER_ON_DUPLICATE: &str = concat!(
    " ON DUPLICATE KEY UPDATE ",
    newest_wins!("nickname"),
    ", ",
    newest_wins!("avatar")
);

/// A customer's natural key: tenant, platform, external user id.
pub(super) type CustomerKey<'m> = (&'m str, &'m str, &'m str);

/// One customer row to upsert: its natural key, and the newest nickname and avatar
/// among the messages written with it (none for a customer named only by a receipt).
pub(super) type CustomerRow<'m> = (CustomerKey<'m>, Option<Marked<'m>>, Option<Marked<'m>>);

/// The multi-row customer upsert of `rows`, ending in its `ON DUPLICATE KEY UPDATE`
/// list.
pub(super) fn customer_upsert<'m>(
    rows: impl IntoIterator<Item = CustomerRow<'m>>,
) -> QueryBuilder<'m, MySql> {
    let mut insert = QueryBuilder::new(CUSTOMER_COLUMNS);
    insert.push_values(
        rows,
        |mut row, ((tenant, platform, user), nickname, avatar)| {
            row.push_bind(tenant)
                .push_bind(platform)
                .push_bind(user)
                .push_bind(nickname.map(|f| f.value))
                .push_bind(nickname.map(|f| f.at))
                .push_bind(nickname.map(|f| f.message_id))
                .push_bind(avatar.map(|f| f.value))
                .push_bind(avatar.map(|f| f.at))
                .push_bind(avatar.map(|f| f.message_id));
        },
    );
    insert.push(CUSTOMER_ON_DUPLICATE);
    insert
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Profile;

    fn message(id: &str, at: i64, nickname: Option<&str>, avatar: Option<&str>) -> ChatMessage {
        ChatMessage {
            tenant_id: "t".into(),
            platform: "2".into(),
            message_id: id.into(),
            from_user_id: "u".into(),
            to_user_id: "a".into(),
            message_type: "TEXT".into(),
            content: String::new(),
            sent_at: at,
            profile: Some(Profile {
                nickname: nickname.map(str::to_string),
                avatar: avatar.map(str::to_string),
            }),
        }
    }

    #[test]
    fn a_field_is_taken_only_from_a_message_that_carries_it() {
        let only_nickname = message("a", 2, Some("n"), None);
        assert_eq!(nickname(&only_nickname).map(|m| m.value), Some("n"));
        assert_eq!(avatar(&only_nickname), None);
    }

    #[test]
    fn newest_is_by_time_then_message_id_and_either_side_may_be_missing() {
        let (old, new) = (
            message("z", 1, Some("old"), None),
            message("a", 2, Some("new"), None),
        );
        let (tied_small, tied_big) = (
            message("a", 5, Some("x"), None),
            message("b", 5, Some("y"), None),
        );
        assert_eq!(newest(nickname(&old), nickname(&new)).unwrap().value, "new");
        assert_eq!(newest(nickname(&new), nickname(&old)).unwrap().value, "new");
        assert_eq!(
            newest(nickname(&tied_big), nickname(&tied_small))
                .unwrap()
                .value,
            "y"
        );
        assert_eq!(newest(None, nickname(&old)).unwrap().value, "old");
        assert_eq!(newest(None, None), None);
    }

    #[test]
    fn the_update_compares_each_field_with_its_own_marker() {
        assert!(CUSTOMER_ON_DUPLICATE.contains("(VALUES(nickname_at), VALUES(nickname_message_id)) > (nickname_at, nickname_message_id)"));
        assert!(CUSTOMER_ON_DUPLICATE.contains(
            "(VALUES(avatar_at), VALUES(avatar_message_id)) > (avatar_at, avatar_message_id)"
        ));
        assert!(!CUSTOMER_ON_DUPLICATE.contains("profile_"));
    }
}
