//! Pushes a burst of platform-shaped chat messages to the inbound topic, each message
//! sent `--copies` times with random keys (as platforms and their retries do), so a
//! running worker can be watched storing every message exactly once.
//!
//! `cargo run --example push -- --messages 10000 --customers 500 --copies 2`

use std::time::Instant;

use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

#[derive(Parser)]
#[command(about = "Push a burst of chat messages (with duplicates) to Kafka")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        default_value = "127.0.0.1:9092",
        env = "IM_INGEST__KAFKA__BROKERS"
    )]
    brokers: String,
    /// Topic to push to.
    #[arg(
        long,
        default_value = "im.inbound",
        env = "IM_INGEST__KAFKA__INBOUND_TOPIC"
    )]
    topic: String,
    /// Distinct messages.
    #[arg(long, default_value_t = 200)]
    messages: usize,
    /// Distinct customers the messages are spread over.
    #[arg(long, default_value_t = 5)]
    customers: usize,
    /// How often each message is sent (2 = every message duplicated once).
    #[arg(long, default_value_t = 2)]
    copies: usize,
    /// Prefix of message and customer ids; a fresh one per run keeps runs apart.
    #[arg(long)]
    run_id: Option<String>,
    /// Create the topic with this many partitions first, if it is missing.
    #[arg(long)]
    create_partitions: Option<i32>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run = args
        .run_id
        .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>()));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("linger.ms", "5")
        .create()?;
    if let Some(partitions) = args.create_partitions {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &args.brokers)
            .create()?;
        let topic = NewTopic::new(&args.topic, partitions, TopicReplication::Fixed(1));
        for result in admin.create_topics(&[topic], &AdminOptions::new()).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => anyhow::bail!("creating {topic}: {code}"),
            }
        }
    }
    let started = Instant::now();
    let mut pending = Vec::new();
    for copy in 0..args.copies {
        for n in 0..args.messages {
            let customer = format!("{run}-customer-{}", n % args.customers.max(1));
            let value = serde_json::json!({
                "message_id": format!("{run}-msg-{n}"),
                "from_user_id": customer,
                "to_user_id": "575d2c135e87e733f0162b88",
                "message_type": "TEXT",
                "message_source": 2,
                "content": format!("message {n} (copy {copy})"),
                "timestamp": (1_723_268_668_573_i64 + n as i64).to_string(),
                "user_info": [{"header_image": "avatar.jpg", "nickname": format!("customer {}", n % args.customers.max(1)), "user_id": customer}]
            })
            .to_string();
            let key = format!("{:x}", rand::random::<u64>());
            let producer = producer.clone();
            let topic = args.topic.clone();
            pending.push(tokio::spawn(async move {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&value),
                        std::time::Duration::from_secs(30),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| e)
            }));
            if pending.len() >= 1_000 {
                for task in pending.drain(..) {
                    task.await??;
                }
            }
        }
    }
    for task in pending {
        task.await??;
    }
    println!(
        "pushed {} records ({} messages x {} copies, {} customers, run id {run}) to {} in {:.2?}",
        args.messages * args.copies,
        args.messages,
        args.copies,
        args.customers,
        args.topic,
        started.elapsed()
    );
    Ok(())
}
