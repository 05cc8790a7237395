//! Kafka ACLs on the secure stack (its broker runs the standard authorizer): the worker
//! runs with exactly the ACLs the README lists for `run` — the inbound topic, the delay
//! topics through a prefix, the dead-letter topic, the group — stores, delays and
//! dead-letters; with one of them taken away (Write on the dead-letter topic,
//! DescribeConfigs on the inbound one) it stops naming what was refused.

use std::process::Command;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::helpers::{unique, WorkerEnv, WorkerProcess};
use crate::kafka_util::produce;
use crate::secure::{
    admin_pool, drop_database, migrate_as_admin, redis_client, secure_dir, secure_worker, tls,
    Transport,
};
use crate::unread::{message, PLATFORM};
use crate::worker::wait_for_count;

/// Runs Kafka's `AclCommand` as the mTLS client (a super user of the secure broker).
struct AclTool {
    dir: tempfile::TempDir,
}

impl AclTool {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key_and_certificate = [tls("client.key"), tls("client.pem")]
            .iter()
            .map(|path| std::fs::read_to_string(path).unwrap())
            .collect::<String>();
        std::fs::write(dir.path().join("client-keystore.pem"), key_and_certificate).unwrap();
        std::fs::write(
            dir.path().join("admin.properties"),
            format!(
                "security.protocol=SSL\nssl.keystore.type=PEM\nssl.keystore.location={}\n\
                 ssl.truststore.type=PEM\nssl.truststore.location={}\n",
                dir.path().join("client-keystore.pem").display(),
                tls("ca.pem"),
            ),
        )
        .unwrap();
        Self { dir }
    }

    /// `--add` or `--remove` ACLs for principal `User:im_scram`.
    fn change(&self, action: &str, resource: &[&str], operations: &[&str]) {
        let lib = secure_dir().parent().unwrap().join("kafka").join("lib");
        let mut command = Command::new("java");
        command
            .arg("-cp")
            .arg(format!("{}/*", lib.display()))
            .arg(format!(
                "-Dlog4j2.configurationFile={}/scripts/kafka/log4j2.properties",
                env!("CARGO_MANIFEST_DIR")
            ))
            // Where that configuration writes its log: the tool's own directory.
            .arg(format!("-Dkafka.logs.dir={}", self.dir.path().display()))
            .arg("org.apache.kafka.tools.AclCommand")
            .args(["--bootstrap-server", &crate::secure::kafka_ssl()])
            .arg("--command-config")
            .arg(self.dir.path().join("admin.properties"))
            .args([action, "--force", "--allow-principal", "User:im_scram"])
            .args(resource);
        for operation in operations {
            command.args(["--operation", operation]);
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "AclCommand {action} {resource:?} (\"No Authorizer is configured\": the secure \
             Kafka predates its authorizer; `scripts/stack.sh down --secure` then `up --secure`): \
             {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The worker's topics, made beforehand by the super user (the ACLs under test grant no
/// Create).
async fn create_topics(env: &WorkerEnv) -> Vec<String> {
    let admin: AdminClient<DefaultClientContext> =
        Transport::MutualTls.client_config().create().unwrap();
    let mut names = vec![env.inbound.clone(), env.dlq.clone()];
    names.extend(env.delay_topics());
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|name| NewTopic::new(name, env.partitions, TopicReplication::Fixed(1)))
        .collect();
    for result in admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .unwrap()
    {
        result.unwrap();
    }
    names
}

/// Records on `topic` (all partitions), read by the super user.
fn records_on(topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = Transport::MutualTls.client_config().create().unwrap();
    (0..partitions)
        .map(|partition| {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .unwrap();
            high - low
        })
        .sum()
}

/// Waits for `worker` to fail; its last log line (the cause).
fn last_line_of_failure(mut worker: WorkerProcess) -> String {
    let status = worker.wait_for_exit(Duration::from_secs(60));
    let log = worker.log_text();
    assert!(!status.success(), "{log}");
    log.lines().last().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_runs_with_exactly_the_readmes_kafka_acls_and_stops_naming_one_taken_away() {
    let env = secure_worker(Transport::Scram256);
    migrate_as_admin(&env);
    create_topics(&env).await;
    let acl = AclTool::new();
    let delay_prefix = format!("{}-", env.retry_prefix);
    let (inbound, dlq, group) = (
        ["--topic", env.inbound.as_str()],
        ["--topic", env.dlq.as_str()],
        ["--group", env.group.as_str()],
    );
    let delay = [
        "--resource-pattern-type",
        "prefixed",
        "--topic",
        delay_prefix.as_str(),
    ];
    acl.change("--add", &inbound, &["Read", "Describe", "DescribeConfigs"]);
    acl.change(
        "--add",
        &delay,
        &["Read", "Write", "Describe", "DescribeConfigs"],
    );
    acl.change("--add", &dlq, &["Write", "Describe", "DescribeConfigs"]);
    acl.change("--add", &group, &["Read"]);

    // One user's lock held elsewhere: its record goes through a delay topic.
    let tenant = unique("acl");
    let mut redis = redis_client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let lock = format!("im:lock:{{{tenant}:{PLATFORM}:held}}");
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("outsider")
        .query_async(&mut redis)
        .await
        .unwrap();
    let worker = WorkerProcess::start(&env);
    let producer = Transport::MutualTls.producer();
    for (customer, id) in [
        ("held", "m-held"),
        ("free", "m-free-1"),
        ("free", "m-free-2"),
    ] {
        let value = message(
            &tenant,
            customer,
            &format!("{tenant}-{id}"),
            1_700_000_000_000,
        );
        produce(&producer, &env.inbound, None, value.as_bytes()).await;
    }
    produce(&producer, &env.inbound, None, b"not json").await;
    let pool = admin_pool(&env.database).await;
    wait_for_count(&pool, "SELECT COUNT(*) FROM message", 2, &worker).await;
    // Held until its record has gone to a delay topic, then let go: it is stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while env
        .delay_topics()
        .iter()
        .map(|topic| records_on(topic, env.partitions))
        .sum::<i64>()
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the held user's record went through no delay topic: {}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _: () = redis::cmd("DEL")
        .arg(&lock)
        .query_async(&mut redis)
        .await
        .unwrap();
    wait_for_count(&pool, "SELECT COUNT(*) FROM message", 3, &worker).await;
    assert_eq!(records_on(&env.dlq, env.partitions), 1);
    let (exit, log) = worker.stop_with_log();
    assert!(exit.is_some_and(|status| status.success()), "{log}");

    // Without Write on the dead-letter topic, the next poison record stops the worker.
    acl.change("--remove", &dlq, &["Write"]);
    let worker = WorkerProcess::start(&env);
    produce(&producer, &env.inbound, None, b"not json either").await;
    let last = last_line_of_failure(worker);
    assert!(
        last.contains(&env.dlq) && last.contains("not allowed"),
        "{last}"
    );
    assert_eq!(records_on(&env.dlq, env.partitions), 1);

    // Without DescribeConfigs on the inbound topic it stops at start, saying so.
    acl.change("--remove", &inbound, &["DescribeConfigs"]);
    let last = last_line_of_failure(WorkerProcess::start(&env));
    assert!(
        last.contains(&env.inbound) && last.contains("is DescribeConfigs on this topic allowed"),
        "{last}"
    );
    drop_database(pool, &env.database).await;
}
