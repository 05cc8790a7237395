//! The Redis lease lock against a real Redis: only the token holder releases or extends,
//! and a holder whose lease expired cannot touch the next holder's key.

use std::time::Duration;

use im_ingest::config::RedisSettings;
use im_ingest::lock::{holder_fingerprint, lock_key, Acquire, LockClient, LockGuard};
use im_ingest::message::UserKey;
use im_ingest::secret::SecretUrl;
use redis::AsyncCommands;

use crate::helpers::{redis_connection, redis_url, unique};

/// A lock client whose holds last as long as the lease (the keeper extends it twice).
fn client(lease: Duration) -> LockClient {
    client_holding(lease, lease)
}

fn client_holding(lease: Duration, max_hold: Duration) -> LockClient {
    let settings = RedisSettings {
        url: SecretUrl::new(redis_url()),
        ..RedisSettings::default()
    };
    LockClient::new(&settings, lease, max_hold).unwrap()
}

fn user() -> UserKey {
    UserKey {
        tenant_id: "t".into(),
        platform: "p".into(),
        user_id: unique("lock_user"),
    }
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis_connection().await
}

async fn acquired(client: &LockClient, user: &UserKey) -> LockGuard {
    match client.acquire(user).await.unwrap() {
        Acquire::Acquired(guard) => guard,
        Acquire::HeldElsewhere { .. } => panic!("lock unexpectedly held"),
    }
}

#[tokio::test]
async fn second_acquirer_sees_the_lock_held_with_its_remaining_ttl_and_holder() {
    let locks = client(Duration::from_secs(10));
    let user = user();
    let guard = acquired(&locks, &user).await;
    match locks.acquire(&user).await.unwrap() {
        Acquire::HeldElsewhere { remaining, holder } => {
            let remaining = remaining.expect("the lock has a TTL");
            assert!(remaining > Duration::from_secs(8) && remaining <= Duration::from_secs(10));
            assert_eq!(holder, Some(holder_fingerprint(guard.token())));
        }
        Acquire::Acquired(_) => panic!("two holders of one lock"),
    }
    assert!(guard.release().await.unwrap());
    // Released: free again.
    acquired(&locks, &user).await.release().await.unwrap();
}

#[tokio::test]
async fn lock_without_ttl_reports_no_remaining_time() {
    let locks = client(Duration::from_secs(10));
    let user = user();
    let mut redis = raw().await;
    let _: () = redis.set(lock_key(&user), "outsider").await.unwrap();
    match locks.acquire(&user).await.unwrap() {
        Acquire::HeldElsewhere { remaining, holder } => {
            assert_eq!(remaining, None);
            assert_eq!(holder, Some(holder_fingerprint("outsider")));
        }
        Acquire::Acquired(_) => panic!("acquired a key held from outside"),
    }
    let _: () = redis.del(lock_key(&user)).await.unwrap();
}

#[tokio::test]
async fn release_with_a_foreign_token_leaves_the_key() {
    let locks = client(Duration::from_secs(10));
    let user = user();
    let guard = acquired(&locks, &user).await;
    let key = guard.key().to_string();
    assert!(!locks.release_token(&key, "not-the-token").await.unwrap());
    let mut redis = raw().await;
    let value: Option<String> = redis.get(&key).await.unwrap();
    assert_eq!(value.as_deref(), Some(guard.token()));
    assert!(guard.release().await.unwrap());
    let value: Option<String> = redis.get(&key).await.unwrap();
    assert_eq!(value, None);
}

#[tokio::test]
async fn the_lease_is_extended_while_the_hold_lasts_and_runs_out_within_a_lease_after_it() {
    // Lease 600 ms, extended every 200 ms while the hold (1,000 ms) lasts: the key
    // outlives its first lease, and expires about 1,400 ms after it was taken (the last
    // extension, at 800 ms, plus a lease), though the guard is never released.
    let (lease, max_hold) = (Duration::from_millis(600), Duration::from_millis(1_000));
    let locks = client_holding(lease, max_hold);
    let guard = acquired(&locks, &user()).await;
    let taken = tokio::time::Instant::now();
    let mut redis = raw().await;
    while taken.elapsed() < Duration::from_millis(1_100) {
        let ttl: i64 = redis.pttl(guard.key()).await.unwrap();
        assert!(
            ttl > 0,
            "lease ran out during the hold, {:?} after it was taken (pttl {ttl})",
            taken.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep_until(taken + Duration::from_millis(1_700)).await;
    let value: Option<String> = redis.get(guard.key()).await.unwrap();
    assert_eq!(value, None, "the lease outlived its hold");
    assert!(!guard.is_lost(), "no extension found it taken over");
}

#[tokio::test]
async fn holder_whose_lease_expired_does_not_delete_the_next_holders_key() {
    let lease = Duration::from_millis(300);
    let stalled = client(lease);
    let user = user();
    let key = lock_key(&user);
    let first = acquired(&stalled, &user).await;
    let first_token = first.token().to_string();
    // Simulate a process paused past its lease: stop its keeper, let the lease run out.
    drop(first);
    tokio::time::sleep(lease + Duration::from_millis(200)).await;

    let next = acquired(&client(Duration::from_secs(10)), &user).await;
    assert!(!stalled.release_token(&key, &first_token).await.unwrap());
    assert!(!stalled.extend_token(&key, &first_token).await.unwrap());
    let mut redis = raw().await;
    let value: Option<String> = redis.get(&key).await.unwrap();
    assert_eq!(value.as_deref(), Some(next.token()));
    let ttl: i64 = redis.pttl(&key).await.unwrap();
    assert!(
        ttl > 5_000,
        "the stalled holder changed the new lease: {ttl}"
    );
    assert!(next.release().await.unwrap());
}

#[tokio::test]
async fn guard_notices_when_its_lease_was_taken_over() {
    let lease = Duration::from_millis(300);
    let locks = client(lease);
    let user = user();
    let guard = acquired(&locks, &user).await;
    let mut redis = raw().await;
    let _: () = redis.set(guard.key(), "someone-else").await.unwrap();
    tokio::time::sleep(lease).await;
    assert!(guard.is_lost());
    assert!(
        !guard.release().await.unwrap(),
        "released a key that was not ours"
    );
    let value: Option<String> = redis.get(lock_key(&user)).await.unwrap();
    assert_eq!(value.as_deref(), Some("someone-else"));
    let _: () = redis.del(lock_key(&user)).await.unwrap();
}

#[tokio::test]
async fn many_locks_are_taken_and_given_back_in_one_pipeline_each_answer_its_own_user() {
    let locks = client(Duration::from_secs(10));
    let (free, taken, also_free) = (user(), user(), user());
    let holder = acquired(&locks, &taken).await;
    let answers = locks
        .acquire_many(&[free.clone(), taken.clone(), also_free.clone()])
        .await
        .unwrap();
    let mut guards = Vec::new();
    for (user, answer) in [&free, &taken, &also_free].into_iter().zip(answers) {
        match answer {
            Acquire::Acquired(guard) => {
                assert_ne!(user, &taken, "a lock held elsewhere was taken again");
                assert_eq!(guard.key(), lock_key(user));
                guards.push(guard);
            }
            Acquire::HeldElsewhere { holder: seen, .. } => {
                assert_eq!(user, &taken, "a free lock was reported held");
                assert_eq!(seen, Some(holder_fingerprint(holder.token())));
            }
        }
    }
    assert_eq!(guards.len(), 2);
    // One of the two is taken over behind our back: only the other is still ours.
    let mut redis = raw().await;
    let _: () = redis
        .set(lock_key(&also_free), "someone-else")
        .await
        .unwrap();
    assert_eq!(locks.release_many(guards).await.unwrap(), 1);
    let left: Option<String> = redis.get(lock_key(&free)).await.unwrap();
    assert_eq!(left, None, "a released lock is still there");
    let kept: Option<String> = redis.get(lock_key(&also_free)).await.unwrap();
    assert_eq!(
        kept.as_deref(),
        Some("someone-else"),
        "another holder's key was deleted"
    );
    holder.release().await.unwrap();
    let _: () = redis.del(lock_key(&also_free)).await.unwrap();
}
