//! Unread counters through the worker process (issue 13), against real Kafka, MariaDB
//! and Redis: each conversation's count and the agent's total agree in MySQL (the
//! truth), in the Redis copy and from `GET /v1/unread`, with the lock on and off,
//! through duplicates, a second consumption by a fresh group, read receipts racing
//! messages across partitions, Redis outages and a worker killed during one.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sqlx::MySqlPool;

use crate::admin::get;
use crate::helpers::{im_ingest, redis_url, stderr_of, unique, WorkerEnv, WorkerProcess};
use crate::kafka_util::{produce, producer};
use crate::worker::{finish, start, wait_until_all_committed, WAIT};

pub const AGENT: &str = "agent-7";
pub const PLATFORM: &str = "2";
const DAY: i64 = 86_400_000;

/// A chat message of `customer` to the agent, as a platform sends it.
pub fn message(tenant: &str, customer: &str, id: &str, sent_at: i64) -> String {
    serde_json::json!({
        "tenant_id": tenant,
        "platform": PLATFORM,
        "message_id": id,
        "from_user_id": customer,
        "to_user_id": AGENT,
        "message_type": "TEXT",
        "content": format!("hello from {id}"),
        "timestamp": sent_at,
    })
    .to_string()
}

/// A read receipt: the agent has read `customer`'s conversation up to `up_to`.
pub fn receipt(tenant: &str, customer: &str, up_to: i64) -> String {
    serde_json::json!({
        "type": "read",
        "tenant_id": tenant,
        "platform": PLATFORM,
        "from_user_id": customer,
        "to_user_id": AGENT,
        "timestamp": up_to,
    })
    .to_string()
}

/// Counts per customer, without the zeros, and the total.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub conversations: BTreeMap<String, u32>,
    pub total: i64,
}

impl Counts {
    fn from_map(all: BTreeMap<String, u32>, total: i64) -> Self {
        Self {
            conversations: all.into_iter().filter(|(_, n)| *n > 0).collect(),
            total,
        }
    }
}

/// MySQL's counts for the agent.
pub async fn in_mysql(pool: &MySqlPool, tenant: &str) -> Counts {
    let rows: Vec<(String, u32)> = sqlx::query_as(
        "SELECT CAST(c.external_user_id AS CHAR), s.unread_count FROM session s \
         JOIN customer c ON c.id = s.customer_id WHERE s.tenant_id = ? AND s.agent_id = ?",
    )
    .bind(tenant)
    .bind(AGENT)
    .fetch_all(pool)
    .await
    .unwrap();
    let total = rows.iter().map(|(_, n)| i64::from(*n)).sum();
    Counts::from_map(rows.into_iter().collect(), total)
}

pub fn key(tenant: &str) -> String {
    format!("im:unread:{{{tenant}:{PLATFORM}:{AGENT}}}")
}

/// The Redis copy's counts (`None`: no complete copy, i.e. no `total`).
pub async fn in_redis(url: &str, tenant: &str) -> Option<Counts> {
    let mut connection = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(key(tenant))
        .query_async(&mut connection)
        .await
        .unwrap();
    let total = fields.get("total")?.parse().unwrap();
    let counts = fields
        .iter()
        .filter(|(f, _)| *f != "total" && !f.starts_with("v:"))
        // A customer named like one of the hash's own fields has U+0001 before its id.
        .map(|(f, v)| {
            (
                f.trim_start_matches('\u{1}').to_string(),
                v.parse().unwrap(),
            )
        })
        .collect();
    Some(Counts::from_map(counts, total))
}

/// The versions in the agent's hash, by field.
async fn versions(tenant: &str) -> BTreeMap<String, String> {
    let mut redis = crate::helpers::redis_connection().await;
    let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(key(tenant))
        .query_async(&mut redis)
        .await
        .unwrap();
    fields
        .into_iter()
        .filter(|(f, _)| f.starts_with("v:"))
        .collect()
}

/// The read API's answer, every page followed (3 conversations a page, to exercise the
/// cursor); returns the source with the counts.
pub fn from_api(address: &str, tenant: &str) -> (String, Counts) {
    let mut conversations = BTreeMap::new();
    let mut cursor: Option<String> = None;
    let mut previous = u32::MAX;
    loop {
        let mut path =
            format!("/v1/unread?tenant={tenant}&platform={PLATFORM}&agent={AGENT}&limit=3");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let (status, body) = get(address, &path);
        assert_eq!(status, 200, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        for session in answer["sessions"].as_array().unwrap() {
            let unread = session["unread"].as_u64().unwrap() as u32;
            assert!(unread <= previous, "not largest first: {body}");
            previous = unread;
            let customer = session["from_user_id"].as_str().unwrap().to_string();
            assert!(
                conversations.insert(customer, unread).is_none(),
                "a conversation came twice"
            );
        }
        match answer["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => {
                let total = answer["total"].as_i64().unwrap();
                let source = answer["source"].as_str().unwrap().to_string();
                return (source, Counts::from_map(conversations, total));
            }
        }
    }
}

/// Produces every value concurrently (four producers), with random keys.
pub async fn push_all(topic: &str, values: Vec<String>) {
    let mut lanes = tokio::task::JoinSet::new();
    for lane in 0..4 {
        let mine: Vec<String> = values.iter().skip(lane).step_by(4).cloned().collect();
        let topic = topic.to_string();
        lanes.spawn(async move {
            let producer = producer();
            for value in mine {
                produce(&producer, &topic, None, value.as_bytes()).await;
            }
        });
    }
    while let Some(done) = lanes.join_next().await {
        done.unwrap();
    }
}

/// Waits until Redis holds a complete copy equal to `expected`.
async fn wait_for_redis(url: &str, tenant: &str, expected: &Counts, worker: &WorkerProcess) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let copy = in_redis(url, tenant).await;
        if copy.as_ref() == Some(expected) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis holds {copy:?}, expected {expected:?}; log:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The watermark model of an event log: per customer, messages (by id) sent after the
/// newest receipt.
fn model(events: &[Event]) -> Counts {
    let mut watermark: BTreeMap<&str, i64> = BTreeMap::new();
    let mut sent: BTreeMap<&str, BTreeMap<&str, i64>> = BTreeMap::new();
    for event in events {
        match event {
            Event::Message { customer, id, at } => {
                sent.entry(customer).or_default().insert(id, *at);
            }
            Event::Receipt { customer, at } => {
                let w = watermark.entry(customer).or_insert(i64::MIN);
                *w = (*w).max(*at);
            }
        }
    }
    let counts: BTreeMap<String, u32> = sent
        .iter()
        .map(|(customer, messages)| {
            let w = watermark.get(customer).copied().unwrap_or(i64::MIN);
            let n = messages.values().filter(|at| **at > w).count() as u32;
            (customer.to_string(), n)
        })
        .collect();
    let total = counts.values().map(|n| i64::from(*n)).sum();
    Counts::from_map(counts, total)
}

#[derive(Debug, Clone)]
enum Event {
    Message {
        customer: String,
        id: String,
        at: i64,
    },
    Receipt {
        customer: String,
        at: i64,
    },
}

impl Event {
    fn value(&self, tenant: &str) -> String {
        match self {
            Event::Message { customer, id, at } => message(tenant, customer, id, *at),
            Event::Receipt { customer, at } => receipt(tenant, customer, *at),
        }
    }
}

/// 50 customers × 20 messages to one agent, 200 of them pushed twice, by concurrent
/// producers; then the whole topic consumed again by a fresh group.
async fn fifty_customers_twenty_messages_each(lock_mode: &str) {
    let tenant = unique("tn");
    let env = WorkerEnv::new(3).with("LOCK__MODE", lock_mode);
    let (worker, pool) = start(&env).await;
    let mut values: Vec<String> = Vec::new();
    for c in 0..50 {
        for m in 0..20 {
            let value = message(
                &tenant,
                &format!("cust-{c:02}"),
                &format!("{c}-{m}"),
                1_000 + m,
            );
            if (c * 20 + m) % 5 == 0 {
                values.push(value.clone());
            }
            values.push(value);
        }
    }
    values.shuffle(&mut StdRng::seed_from_u64(50));
    push_all(&env.inbound, values).await;
    wait_until_all_committed(&env, &worker).await;
    let expected = Counts::from_map(
        (0..50).map(|c| (format!("cust-{c:02}"), 20)).collect(),
        1_000,
    );
    assert_eq!(in_mysql(&pool, &tenant).await, expected);
    wait_for_redis(&redis_url(), &tenant, &expected, &worker).await;
    assert_eq!(
        from_api(&worker.admin_address(), &tenant),
        ("redis".into(), expected.clone())
    );
    drop(worker);

    // A fresh group reads the whole topic again: nothing counts twice.
    let again = WorkerEnv {
        group: unique("fresh-group"),
        ..env.clone()
    };
    let worker = WorkerProcess::start(&again);
    wait_until_all_committed(&again, &worker).await;
    assert_eq!(in_mysql(&pool, &tenant).await, expected);
    assert_eq!(
        in_redis(&redis_url(), &tenant).await,
        Some(expected.clone())
    );
    assert_eq!(from_api(&worker.admin_address(), &tenant).1, expected);
    finish(&env, worker, pool).await;
}

#[tokio::test]
async fn fifty_customers_times_twenty_messages_with_copies_count_once_everywhere_even_when_consumed_again(
) {
    fifty_customers_twenty_messages_each("redis").await;
}

#[tokio::test]
async fn fifty_customers_times_twenty_messages_with_copies_count_once_everywhere_without_the_lock()
{
    fifty_customers_twenty_messages_each("none").await;
}

/// 8 customers, each 25 messages and 6 read receipts at random times, every event
/// pushed in random order over 3 partitions, a few twice.
async fn receipts_racing_messages(lock_mode: &str) {
    let tenant = unique("tr");
    let env = WorkerEnv::new(3).with("LOCK__MODE", lock_mode);
    let (worker, pool) = start(&env).await;
    let mut rng = StdRng::seed_from_u64(8);
    let mut events = Vec::new();
    for c in 0..8 {
        let customer = format!("cust-{c}");
        for m in 0..25 {
            events.push(Event::Message {
                customer: customer.clone(),
                id: format!("{c}-{m}"),
                at: rng.random_range(0..10_000),
            });
        }
        for _ in 0..6 {
            events.push(Event::Receipt {
                customer: customer.clone(),
                at: rng.random_range(0..10_000),
            });
        }
    }
    let expected = model(&events);
    let mut values: Vec<String> = events.iter().map(|e| e.value(&tenant)).collect();
    values.extend(events.iter().step_by(7).map(|e| e.value(&tenant)));
    values.shuffle(&mut rng);
    let pushed = values.len();
    push_all(&env.inbound, values).await;
    wait_until_all_committed(&env, &worker).await;
    assert_eq!(in_mysql(&pool, &tenant).await, expected);
    wait_for_redis(&redis_url(), &tenant, &expected, &worker).await;
    assert_eq!(from_api(&worker.admin_address(), &tenant).1, expected);
    // `verify` agrees: watermarks, last message times and counts as the topic implies.
    let (ok, report) = crate::verify::verify(&env);
    assert!(ok, "{report}");
    assert!(
        report.contains(&format!(": {pushed} records (")) && report.contains("; 0 mismatches"),
        "{report}"
    );
    finish(&env, worker, pool).await;
}

#[tokio::test]
async fn read_receipts_racing_messages_across_partitions_give_the_watermark_models_counts() {
    receipts_racing_messages("redis").await;
}

#[tokio::test]
async fn read_receipts_racing_messages_across_partitions_give_the_watermark_models_counts_without_the_lock(
) {
    receipts_racing_messages("none").await;
}

/// Messages sent 8 days ago with a 7-day expiry count 0 in every answer (Redis and the
/// MySQL fallback alike); a new message counts 1.
async fn expiry(lock_mode: &str) {
    let tenant = unique("te");
    let env = WorkerEnv::new(1)
        .with("LOCK__MODE", lock_mode)
        .with("UNREAD__EXPIRE_AFTER_DAYS", "7");
    let (worker, pool) = start(&env).await;
    let now = im_ingest::pipeline::now_millis();
    let old: Vec<String> = (0..3)
        .map(|n| message(&tenant, "quiet", &format!("old-{n}"), now - 8 * DAY + n))
        .chain([message(&tenant, "recent", "recent-0", now - DAY)])
        .collect();
    push_all(&env.inbound, old).await;
    wait_until_all_committed(&env, &worker).await;
    let address = worker.admin_address();
    let only_recent = Counts::from_map(BTreeMap::from([("recent".to_string(), 1)]), 1);
    assert_eq!(
        from_api(&address, &tenant),
        ("redis".into(), only_recent.clone())
    );
    // The MySQL fallback judges the same way (a worker without Redis, on a topic of
    // its own, so that it writes nothing).
    let fallback = WorkerProcess::start(
        &WorkerEnv {
            inbound: unique("idle.in"),
            group: unique("idle.group"),
            ..env.clone()
        }
        .with("REDIS__URL", "redis://127.0.0.1:1"),
    );
    assert_eq!(
        from_api(&fallback.admin_address(), &tenant),
        ("mysql".into(), only_recent)
    );
    drop(fallback);
    push_all(&env.inbound, vec![message(&tenant, "quiet", "new-0", now)]).await;
    wait_until_all_committed(&env, &worker).await;
    let (source, counts) = from_api(&address, &tenant);
    assert_eq!(source, "redis");
    assert_eq!(counts.conversations.get("quiet"), Some(&1), "{counts:?}");
    assert_eq!(counts.total, 2);
    finish(&env, worker, pool).await;
}

#[tokio::test]
async fn with_a_seven_day_expiry_eight_day_old_messages_count_zero_and_a_new_one_counts_one() {
    expiry("redis").await;
}

#[tokio::test]
async fn with_a_seven_day_expiry_eight_day_old_messages_count_zero_and_a_new_one_counts_one_without_the_lock(
) {
    expiry("none").await;
}

#[tokio::test]
async fn reconcile_reports_and_fixes_a_hand_corrupted_copy_and_a_dry_run_changes_nothing() {
    let tenant = unique("tc");
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    let values = (0..4)
        .map(|n| message(&tenant, &format!("c{}", n % 2), &format!("m{n}"), 1_000 + n))
        .collect();
    push_all(&env.inbound, values).await;
    wait_until_all_committed(&env, &worker).await;
    let expected = in_mysql(&pool, &tenant).await;
    wait_for_redis(&redis_url(), &tenant, &expected, &worker).await;
    drop(worker);
    // A count, a version MySQL never had, the total, and a conversation MySQL does not
    // have: all corrupted by hand.
    let versions_before = versions(&tenant).await;
    let mut redis = crate::helpers::redis_connection().await;
    let _: () = redis::cmd("HSET")
        .arg(key(&tenant))
        .arg("c0")
        .arg(9)
        .arg("v:c1")
        .arg(99)
        .arg("ghost")
        .arg(5)
        .arg("v:ghost")
        .arg(1)
        .arg("total")
        .arg(16)
        .query_async(&mut redis)
        .await
        .unwrap();
    let run = |dry_run: bool| {
        let mut args = vec!["reconcile", "--tenant", &tenant];
        if dry_run {
            args.push("--dry-run");
        }
        let output = im_ingest(
            &args,
            &[
                ("IM_INGEST__DATABASE__URL", &env.database_url()),
                ("IM_INGEST__REDIS__URL", &redis_url()),
            ],
        );
        assert!(output.status.success(), "{}", stderr_of(&output));
        String::from_utf8(output.stdout).unwrap()
    };
    let report = run(true);
    assert!(
        report.contains(&format!(
            "{tenant}/{PLATFORM}/{AGENT}: 3 conversation(s) off; total in Redis 16 -> 16 (MySQL 4)"
        )),
        "{report}"
    );
    assert!(report.contains("1 drifted (would fix)"), "{report}");
    assert_eq!(in_redis(&redis_url(), &tenant).await.unwrap().total, 16);
    let report = run(false);
    assert!(
        report.contains("total in Redis 16 -> 4 (MySQL 4)"),
        "{report}"
    );
    assert_eq!(in_redis(&redis_url(), &tenant).await, Some(expected));
    assert_eq!(versions(&tenant).await, versions_before);
    assert!(run(true).contains("0 drifted"));
    pool.close().await;
    env.drop_database().await;
}

/// `count` messages of each of `customers` (ids from `first`), then a receipt for
/// every second customer up to the middle of them.
fn round(customers: &[String], first: i64, count: i64) -> Vec<Event> {
    let mut events = Vec::new();
    for (n, customer) in customers.iter().enumerate() {
        for m in first..first + count {
            events.push(Event::Message {
                customer: customer.clone(),
                id: format!("{customer}-{m}"),
                at: 1_000 * m,
            });
        }
        if n % 2 == 0 {
            events.push(Event::Receipt {
                customer: customer.clone(),
                at: 1_000 * (first + count / 2),
            });
        }
    }
    events
}

/// Redis stopped mid-run while a worker stores, that worker killed during the outage,
/// Redis started again empty, a new worker started (nothing more pushed: only the
/// durable note can heal the copy); then Redis hung (SIGSTOP) while more is stored, and
/// resumed with its stale copy. After each, Redis equals MySQL equals the model, read
/// straight from Redis (a read through the API would rebuild the copy itself).
async fn redis_outages(lock_mode: &str) {
    let mut redis = crate::faults::PrivateRedis::start();
    let tenant = unique("to");
    let env = WorkerEnv::new(2)
        .with("LOCK__MODE", lock_mode)
        .with("REDIS__URL", &redis.url());
    let (worker, pool) = start(&env).await;
    let customers: Vec<String> = (0..5).map(|n| format!("cust-{n}")).collect();
    let mut log = round(&customers, 0, 4);
    push_all(&env.inbound, log.iter().map(|e| e.value(&tenant)).collect()).await;
    wait_until_all_committed(&env, &worker).await;
    wait_for_redis(&redis.url(), &tenant, &model(&log), &worker).await;

    // Redis stops; the worker stores on, and is killed before Redis is back.
    redis.kill();
    let during = round(&customers, 4, 3);
    push_all(
        &env.inbound,
        during.iter().map(|e| e.value(&tenant)).collect(),
    )
    .await;
    wait_until_all_committed(&env, &worker).await;
    log.extend(during);
    assert_eq!(in_mysql(&pool, &tenant).await, model(&log));
    let noted: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM unread_reconcile")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(noted, 1, "the agent was not noted for reconcile");
    drop(worker);
    redis.restart();
    assert_eq!(
        in_redis(&redis.url(), &tenant).await,
        None,
        "Redis came back with data"
    );
    let worker = WorkerProcess::start(&env);
    wait_for_redis(&redis.url(), &tenant, &model(&log), &worker).await;

    // Redis hangs with its copy; the worker stores on; Redis resumes, stale.
    redis.signal("-STOP");
    let hung = round(&customers, 7, 3);
    push_all(
        &env.inbound,
        hung.iter().map(|e| e.value(&tenant)).collect(),
    )
    .await;
    wait_until_all_committed(&env, &worker).await;
    log.extend(hung);
    redis.signal("-CONT");
    let expected = model(&log);
    assert_eq!(in_mysql(&pool, &tenant).await, expected);
    wait_for_redis(&redis.url(), &tenant, &expected, &worker).await;
    // The read API answers the same throughout, and from Redis again once a read has
    // found it answering (reads probe it once per probe interval while degraded).
    let address = worker.admin_address();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (source, counts) = from_api(&address, &tenant);
        assert_eq!(counts, expected);
        if source == "redis" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the read API never went back to Redis; log:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    finish(&env, worker, pool).await;
}

#[tokio::test]
async fn after_redis_stops_restarts_empty_and_hangs_with_a_worker_killed_during_the_outage_redis_heals_to_mysql(
) {
    redis_outages("redis").await;
}

#[tokio::test]
async fn after_redis_stops_restarts_empty_and_hangs_with_a_worker_killed_during_the_outage_redis_heals_to_mysql_without_the_lock(
) {
    redis_outages("none").await;
}

/// A worker aborted right after its transaction committed (before Redis saw the change
/// and before the offset moved) and restarted: the redelivered message adds nothing
/// more in MySQL, and its copy carries the count to Redis.
#[cfg(feature = "failpoints")]
async fn redelivery_after_the_commit(lock_mode: &str) {
    let tenant = unique("tf");
    let env = WorkerEnv::new(1)
        .with("LOCK__MODE", lock_mode)
        .with_var("FAILPOINTS", "after_db_commit=return");
    let (mut worker, pool) = start(&env).await;
    push_all(&env.inbound, vec![message(&tenant, "crash", "m1", 5_000)]).await;
    assert!(
        !worker.wait_for_exit(WAIT).success(),
        "the fail point should abort the worker"
    );
    let one = Counts::from_map(BTreeMap::from([("crash".to_string(), 1)]), 1);
    assert_eq!(in_mysql(&pool, &tenant).await, one);
    assert_eq!(in_redis(&redis_url(), &tenant).await, None);
    let restarted = WorkerProcess::start(&env.without_extra());
    wait_until_all_committed(&env, &restarted).await;
    assert_eq!(in_mysql(&pool, &tenant).await, one);
    wait_for_redis(&redis_url(), &tenant, &one, &restarted).await;
    finish(&env, restarted, pool).await;
}

#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_message_redelivered_after_a_crash_past_its_commit_counts_once_in_mysql_and_redis() {
    redelivery_after_the_commit("redis").await;
}

#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_message_redelivered_after_a_crash_past_its_commit_counts_once_in_mysql_and_redis_without_the_lock(
) {
    redelivery_after_the_commit("none").await;
}

/// Two copies of one message in one batch (one transaction), through the library's
/// pipeline: one row, one unread, in MySQL and in Redis.
async fn two_copies_in_one_batch(lock_mode: im_ingest::config::LockMode) {
    use im_ingest::pipeline::{Outcome, Record};
    let tenant = unique("tb");
    let env = WorkerEnv::new(1);
    let mut settings = env.settings();
    settings.lock.mode = lock_mode;
    im_ingest::store::migrate(&settings.database).await.unwrap();
    let topics = im_ingest::consumer::ensure_topics(&settings).await.unwrap();
    let pipeline = im_ingest::worker::build_pipeline(&settings, &topics)
        .await
        .unwrap();
    let value = message(&tenant, "twice", "m1", 7_000);
    let records = (0..2)
        .map(|offset| Record {
            topic: env.inbound.clone(),
            partition: 0,
            offset,
            timestamp: Some(7_000),
            key: None,
            value: Some(value.clone().into_bytes()),
            headers: None,
        })
        .collect();
    let outcomes = pipeline.process_batch(records).await.unwrap();
    assert_eq!(outcomes, [Outcome::Stored, Outcome::Duplicate]);
    let one = Counts::from_map(BTreeMap::from([("twice".to_string(), 1)]), 1);
    assert_eq!(in_mysql(&pipeline.pool, &tenant).await, one);
    assert_eq!(in_redis(&redis_url(), &tenant).await, Some(one));
    pipeline.pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn two_copies_of_a_message_in_one_batch_count_once_in_mysql_and_redis() {
    two_copies_in_one_batch(im_ingest::config::LockMode::Redis).await;
}

#[tokio::test]
async fn two_copies_of_a_message_in_one_batch_count_once_in_mysql_and_redis_without_the_lock() {
    two_copies_in_one_batch(im_ingest::config::LockMode::None).await;
}

#[tokio::test]
async fn the_read_api_names_a_missing_parameter_a_bad_limit_and_a_foreign_cursor() {
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    let address = worker.admin_address();
    for (path, expected) in [
        (
            "/v1/unread?tenant=t&platform=2",
            "tenant, platform and agent are required",
        ),
        (
            "/v1/unread?tenant=t&platform=2&agent=a&limit=0",
            "limit must be 1 to 1000",
        ),
        ("/v1/unread?tenant=t&platform=2&agent=a&limit=ten", "limit"),
        (
            "/v1/unread?tenant=t&platform=2&agent=a&cursor=nonsense",
            "cursor is not one this API gave",
        ),
    ] {
        let (status, body) = get(&address, path);
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains(expected), "{path}: {body}");
    }
    // An agent without conversations: an empty answer, and no key made for it.
    let tenant = unique("tn");
    let (status, body) = get(
        &address,
        &format!("/v1/unread?tenant={tenant}&platform={PLATFORM}&agent={AGENT}"),
    );
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"source":"redis","total":0,"sessions":[]}"#)
    );
    let mut redis = crate::helpers::redis_connection().await;
    let exists: bool = redis::cmd("EXISTS")
        .arg(key(&tenant))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!exists, "a read of an unknown agent made a key");
    finish(&env, worker, pool).await;
}

#[tokio::test]
async fn customers_named_like_the_hashs_own_fields_count_like_any_other() {
    let tenant = unique("tx");
    let env = WorkerEnv::new(1);
    let (worker, pool) = start(&env).await;
    let values = vec![
        message(&tenant, "total", "m1", 1_000),
        message(&tenant, "total", "m2", 2_000),
        message(&tenant, "v:x", "m3", 1_000),
        message(&tenant, "x", "m4", 1_000),
    ];
    push_all(&env.inbound, values).await;
    wait_until_all_committed(&env, &worker).await;
    let expected = Counts::from_map(
        BTreeMap::from([
            ("total".to_string(), 2),
            ("v:x".to_string(), 1),
            ("x".to_string(), 1),
        ]),
        4,
    );
    assert_eq!(in_mysql(&pool, &tenant).await, expected);
    assert_eq!(
        from_api(&worker.admin_address(), &tenant),
        ("redis".into(), expected)
    );
    let mut redis = crate::helpers::redis_connection().await;
    let (total, x_version): (i64, i64) = redis::pipe()
        .cmd("HGET")
        .arg(key(&tenant))
        .arg("total")
        .cmd("HGET")
        .arg(key(&tenant))
        .arg("v:x")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        (total, x_version),
        (4, 1),
        "a customer's field overwrote the hash's own"
    );
    finish(&env, worker, pool).await;
}
