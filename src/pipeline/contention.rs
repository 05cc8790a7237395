//! Telling contention from a stuck lock when a record's attempts are used up.
//!
//! Guarantee: a valid record is dead-lettered with `LockHeld` only when its user's lock
//! was held by the same holder at its last two attempts (or the holder at the previous
//! one is unknown). When the lock changed hands in between, holders are making
//! progress and this record merely lost races; it is then written without the lock,
//! which is safe because the unique indexes alone keep data single (DESIGN.md,
//! "Defence in depth": each layer alone must be safe). The holder travels from attempt
//! to attempt inside the `kafka_dlt-exception-message` text, so the contract's header
//! set stays exactly as specified.

const HOLDER_PREFIX: &str = " (holder ";

/// The exception message of a delay or dead-letter record whose lock was held.
pub fn lock_held_message(what: &str, holder: Option<&str>) -> String {
    match holder {
        Some(holder) => format!("{what}{HOLDER_PREFIX}{holder})"),
        None => what.to_string(),
    }
}

/// The holder fingerprint recorded by [`lock_held_message`], if any.
pub fn holder_in(message: &str) -> Option<&str> {
    let (_, rest) = message.rsplit_once(HOLDER_PREFIX)?;
    let holder = rest.strip_suffix(')')?;
    (!holder.is_empty() && holder.bytes().all(|b| b.is_ascii_hexdigit())).then_some(holder)
}

/// Whether the lock changed hands between the previous attempt (`previous` holder, as
/// recorded in the record) and this one (`current`; `None` = released meanwhile).
pub fn changed_hands(previous: Option<&str>, current: Option<&str>) -> bool {
    match previous {
        Some(previous) => current != Some(previous),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_survives_a_round_trip_through_the_message() {
        let message = lock_held_message("user lock held elsewhere", Some("00ff12ab34cd56ef"));
        assert_eq!(
            message,
            "user lock held elsewhere (holder 00ff12ab34cd56ef)"
        );
        assert_eq!(holder_in(&message), Some("00ff12ab34cd56ef"));
    }

    #[test]
    fn messages_without_a_well_formed_holder_yield_none() {
        for message in [
            "user lock held elsewhere",
            "user lock held elsewhere (holder )",
            "user lock held elsewhere (holder xyz)",
            "user lock held elsewhere (holder 00ff",
            "",
        ] {
            assert_eq!(holder_in(message), None, "{message:?}");
        }
        assert_eq!(lock_held_message("held", None), "held");
    }

    #[test]
    fn only_a_known_previous_holder_that_differs_counts_as_changed_hands() {
        assert!(changed_hands(Some("aa"), Some("bb")));
        assert!(changed_hands(Some("aa"), None), "released meanwhile");
        assert!(!changed_hands(Some("aa"), Some("aa")), "same holder: stuck");
        assert!(
            !changed_hands(None, Some("bb")),
            "unknown: the contract's dead letter"
        );
        assert!(!changed_hands(None, None));
    }
}
