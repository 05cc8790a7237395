//! Failures that really happen, each proven deterministically: Redis stopped or hung
//! (a private redis-server, never the shared one), and a lock lease that expired while
//! its holder stalled.

use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use im_ingest::consumer;
use im_ingest::lock::{lock_key, Acquire, LockClient};
use im_ingest::message::{ChatMessage, UserKey};
use im_ingest::secret::SecretUrl;
use im_ingest::store::{write_message, Provenance, WriteOutcome};
use im_ingest::worker::{build_pipeline, consumer_subscriptions, metrics_handle};
use redis::AsyncCommands;

use crate::helpers::{unique, WorkerEnv};
use crate::kafka_util::{produce, producer};
use crate::worker::{count, create_topics};

/// A redis-server of this test's own, on a free loopback port.
pub struct PrivateRedis {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("starting redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(Instant::now() < deadline, "private redis did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn answers(&self) -> bool {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "ping"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
            .unwrap_or(false)
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

fn degraded_gauge() -> Option<f64> {
    metrics_handle()
        .render()
        .lines()
        .find(|l| l.starts_with("im_ingest_redis_degraded "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

async fn wait_for_gauge(value: f64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while degraded_gauge() != Some(value) {
        assert!(
            Instant::now() < deadline,
            "degraded gauge never became {value} ({what}); now {:?}",
            degraded_gauge()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 1,000 distinct messages of 20 customers, each pushed twice (2,000 records), in bursts
/// around the faults.
#[tokio::test]
async fn redis_stopped_then_hung_mid_run_loses_and_doubles_nothing_and_degraded_mode_comes_and_goes(
) {
    let mut redis = PrivateRedis::start();
    let env = WorkerEnv::new(3);
    let mut settings = env.settings();
    settings.redis.url = SecretUrl::new(redis.url());
    settings.redis.connect_timeout_ms = 300;
    settings.redis.response_timeout_ms = 300;
    settings.redis.probe_interval_ms = 200;
    im_ingest::store::migrate(&settings.database).await.unwrap();
    create_topics(&env).await;
    let topics = consumer::ensure_topics(&settings).await.unwrap();
    metrics_handle();
    let pipeline = build_pipeline(&settings, &topics).await.unwrap();
    let pool = pipeline.pool.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let topics = consumer_subscriptions(&settings);
    let worker = {
        let (settings, pipeline) = (settings.clone(), pipeline.clone());
        tokio::spawn(async move {
            let health = std::sync::Arc::new(im_ingest::health::Health::default());
            consumer::run(&settings, &topics, pipeline, health, async {
                let _ = stopped.await;
            })
            .await
        })
    };

    let producer = producer();
    let run = unique("r");
    let mut pushed = 0;
    let mut push = |n: usize| {
        let start = pushed;
        pushed += n;
        let (producer, topic, run) = (producer.clone(), env.inbound.clone(), run.clone());
        async move {
            for i in start..start + n {
                let value =
                    crate::pipeline::payload(&format!("{run}-c{}", i % 20), &format!("{run}-m{i}"));
                produce(&producer, &topic, None, value.as_bytes()).await;
                produce(&producer, &topic, None, value.as_bytes()).await;
            }
        }
    };

    push(200).await;
    // Redis stopped: the worker goes on without the lock and says so.
    redis.kill();
    push(250).await;
    wait_for_gauge(1.0, "after Redis stopped").await;
    push(200).await;
    redis.restart();
    push(100).await;
    wait_for_gauge(0.0, "after Redis came back").await;
    // Redis hung: accepts connections (the kernel does), never answers.
    redis.signal("-STOP");
    push(150).await;
    wait_for_gauge(1.0, "while Redis was hung").await;
    redis.signal("-CONT");
    // Recovery is noticed by the next lock attempt, so it needs traffic.
    push(100).await;
    wait_for_gauge(0.0, "after Redis answered again").await;

    let expected = pushed as i64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored = count(
            &pool,
            &format!("SELECT COUNT(*) FROM message WHERE external_message_id LIKE '{run}-%'"),
        )
        .await;
        if stored == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{stored} of {expected} messages stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        count(
            &pool,
            &format!("SELECT COUNT(*) FROM customer WHERE external_user_id LIKE '{run}-%'")
        )
        .await,
        20
    );
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM session").await, 20);
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test]
async fn holder_stalled_past_its_lease_neither_duplicates_rows_nor_deletes_the_next_holders_key() {
    let env = WorkerEnv::new(1);
    let settings = env.settings();
    im_ingest::store::migrate(&settings.database).await.unwrap();
    let pool = im_ingest::store::connect(&settings.database).await.unwrap();
    let user = UserKey {
        tenant_id: "default".into(),
        platform: "2".into(),
        user_id: unique("u"),
    };
    let message = ChatMessage {
        tenant_id: user.tenant_id.clone(),
        platform: user.platform.clone(),
        message_id: unique("m"),
        from_user_id: user.user_id.clone(),
        to_user_id: "agent".into(),
        message_type: "TEXT".into(),
        content: "hi".into(),
        sent_at: 1_000,
        profile: None,
    };
    let from = |offset| Provenance {
        topic: env.inbound.clone(),
        partition: 0,
        offset,
    };

    let stalled = LockClient::new(
        &settings.redis,
        Duration::from_millis(300),
        Duration::from_millis(300),
    )
    .unwrap();
    let Acquire::Acquired(first) = stalled.acquire(&user).await.unwrap() else {
        panic!("lock busy")
    };
    let stalled_token = first.token().to_string();
    // The holder stalls: its keeper stops, the lease runs out.
    drop(first);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let next = LockClient::new(
        &settings.redis,
        Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .unwrap();
    let Acquire::Acquired(second) = next.acquire(&user).await.unwrap() else {
        panic!("lease did not expire")
    };
    assert_eq!(
        write_message(&pool, &message, &from(2)).await.unwrap(),
        WriteOutcome::Stored
    );
    // The stalled holder wakes up and finishes its work and its release.
    assert_eq!(
        write_message(&pool, &message, &from(1)).await.unwrap(),
        WriteOutcome::Duplicate
    );
    assert!(!stalled
        .release_token(&lock_key(&user), &stalled_token)
        .await
        .unwrap());

    let mut redis = crate::helpers::redis_connection().await;
    let value: Option<String> = redis.get(lock_key(&user)).await.unwrap();
    assert_eq!(
        value.as_deref(),
        Some(second.token()),
        "the new holder's key survived"
    );
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM message").await, 1);
    assert!(second.release().await.unwrap());
    pool.close().await;
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_cut_for_ten_seconds_moves_no_offset_past_unstored_records_and_causes_no_rebalance(
) {
    use std::collections::HashMap;

    use rdkafka::Message;

    use crate::db_proxy::DbProxy;
    use crate::kafka_util::{committed, read_all};
    use crate::worker::{start, wait_until_all_committed};

    let server = url::Url::parse(&crate::helpers::mysql_server_url()).unwrap();
    let upstream = format!(
        "{}:{}",
        server.host_str().unwrap(),
        server.port().unwrap_or(3306)
    );
    let proxy = DbProxy::start(upstream).await;
    let base = WorkerEnv::new(2);
    let proxied_url = format!("mysql://root@127.0.0.1:{}/{}", proxy.port, base.database);
    let env = base
        .with("DATABASE__URL", &proxied_url)
        .with("DATABASE__ACQUIRE_TIMEOUT_MS", "1000")
        .with("WORKER__MAX_IN_FLIGHT", "20")
        .with("WORKER__DB_RETRY_MAX_MS", "1000")
        // Shorter than the cut: a worker that stopped polling would be evicted.
        .with("KAFKA__LIBRDKAFKA__MAX.POLL.INTERVAL.MS", "7000");
    let (worker, pool) = start(&env).await;
    let producer = producer();
    let run = unique("db");
    let push = |from: usize, to: usize| {
        let (producer, topic, run) = (producer.clone(), env.inbound.clone(), run.clone());
        async move {
            for i in from..to {
                let value =
                    crate::pipeline::payload(&format!("{run}-c{}", i % 10), &format!("{run}-m{i}"));
                produce(&producer, &topic, None, value.as_bytes()).await;
                produce(&producer, &topic, None, value.as_bytes()).await;
            }
        }
    };
    push(0, 100).await;
    wait_until_all_committed(&env, &worker).await;

    let log_at_cut = worker.log_text().len();
    proxy.cut();
    push(100, 200).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let snapshot: Vec<Option<i64>> = (0..2)
        .map(|p| committed(&env.group, &env.inbound, p))
        .collect();
    let stored = crate::worker::stored_message_ids(&pool).await;
    // Every record below a committed offset is stored.
    let mut below: HashMap<i32, usize> = HashMap::new();
    for record in read_all(&env.inbound) {
        let position = snapshot[record.partition() as usize].unwrap_or(0);
        if record.offset() < position {
            let id = crate::kafka_util::message_id_of(&record);
            assert!(
                stored.contains(&id),
                "offset {} committed but {id} not stored",
                record.offset()
            );
            *below.entry(record.partition()).or_default() += 1;
        }
    }
    assert_eq!(
        below.values().sum::<usize>(),
        200,
        "the first 200 records were committed"
    );
    // For the rest of the ten seconds nothing becomes durable, so nothing is committed.
    let cut_until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < cut_until {
        for p in 0..2 {
            assert_eq!(
                committed(&env.group, &env.inbound, p),
                snapshot[p as usize],
                "offset moved during the cut"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    proxy.restore();

    wait_until_all_committed(&env, &worker).await;
    let like = format!("SELECT COUNT(*) FROM message WHERE external_message_id LIKE '{run}-%'");
    assert_eq!(count(&pool, &like).await, 200);
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM customer").await, 10);
    let log = worker.log_text();
    assert!(
        log.contains("in-flight limit reached"),
        "backpressure never engaged:\n{log}"
    );
    // The assignments all happened at start (the instance's two members join one
    // after the other), none from the cut on.
    assert!(
        !log.get(log_at_cut..)
            .unwrap_or("")
            .contains("partitions assigned"),
        "a rebalance happened:\n{log}"
    );
    assert!(
        !log.contains("partitions revoked"),
        "a rebalance happened:\n{log}"
    );
    drop(worker);
    pool.close().await;
    env.drop_database().await;
}
