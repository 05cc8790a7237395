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
use im_ingest::worker::{build_pipeline, consumed_topics, metrics_handle};
use redis::AsyncCommands;

use crate::helpers::{unique, WorkerEnv};
use crate::kafka_util::{produce, producer};
use crate::worker::{count, create_topics};

/// A redis-server of this test's own, on a free loopback port.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    fn start() -> Self {
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

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
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

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    }

    fn kill(&mut self) {
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

/// 550 distinct messages of 20 customers, each pushed twice (1,100 records), in bursts
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
    consumer::ensure_topics(&settings).await.unwrap();
    metrics_handle();
    let pipeline = build_pipeline(&settings).await.unwrap();
    let pool = pipeline.pool.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let topics = consumed_topics(&settings);
    let worker = {
        let (settings, pipeline) = (settings.clone(), pipeline.clone());
        tokio::spawn(async move {
            consumer::run(&settings, &topics, pipeline, async {
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

    push(100).await;
    // Redis stopped: the worker goes on without the lock and says so.
    redis.kill();
    push(150).await;
    wait_for_gauge(1.0, "after Redis stopped").await;
    push(100).await;
    redis.restart();
    push(50).await;
    wait_for_gauge(0.0, "after Redis came back").await;
    // Redis hung: accepts connections (the kernel does), never answers.
    redis.signal("-STOP");
    push(100).await;
    wait_for_gauge(1.0, "while Redis was hung").await;
    redis.signal("-CONT");
    // Recovery is noticed by the next lock attempt, so it needs traffic.
    push(50).await;
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

    let stalled = LockClient::new(&settings.redis, Duration::from_millis(300)).unwrap();
    let Acquire::Acquired(first) = stalled.acquire(&user).await.unwrap() else {
        panic!("lock busy")
    };
    let stalled_token = first.token().to_string();
    // The holder stalls: its keeper stops, the lease runs out.
    drop(first);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let next = LockClient::new(&settings.redis, Duration::from_secs(10)).unwrap();
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
