//! The admin HTTP server: `/healthz`, `/readyz`, `/metrics`, and the read API
//! `/v1/unread`.
//!
//! Guarantee: every answer is bounded in time (each dependency check has its own
//! timeout), so a hung dependency makes the worker unready, never the admin server
//! hung. `/healthz` says whether the consumer loop turns; `/readyz` whether the worker
//! can store: Kafka and MySQL answer and partitions are assigned, naming what fails.
//! Redis is reported, not required: without it the worker stores correctly in degraded
//! mode (a rollout must not stall on a Redis outage), so the body says whether Redis
//! answers and whether the worker is degraded. Checks reuse their connections.
//! `/v1/unread` answers from Redis, or from MySQL when Redis does not answer in time,
//! within [`UNREAD_TIMEOUT`] or with 503. With `admin.token` set, `/metrics` and `/v1/*`
//! answer only requests that bear it; `/healthz` and `/readyz` stay open (orchestrator
//! probes), and no answer carries a secret.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{BaseConsumer, Consumer};
use redis::aio::MultiplexedConnection;
use serde_json::json;
use sqlx::MySqlPool;
use subtle::ConstantTimeEq;

use crate::config::Settings;
use crate::health::Health;
use crate::pipeline::{Pipeline, RedisHealth};
use crate::secret::Secret;
use crate::unread::copy::Agent;
use crate::unread::view::Cursor;
use crate::unread::Unread;

/// Conversations per page of `/v1/unread` unless `limit` says otherwise, and the most
/// it may say.
const UNREAD_PAGE: usize = 100;
const UNREAD_PAGE_MAX: usize = 1000;
/// The longest a `/v1/unread` answer may take (Redis, then MySQL).
const UNREAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one dependency check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Redis is only reported, not required: a hung Redis must not slow `/readyz` past an
/// orchestrator's probe timeout (often 1 s).
const REDIS_REPORT_TIMEOUT: Duration = Duration::from_millis(300);
/// A consumer loop that has not turned for this long is unhealthy.
const STALE_HEARTBEAT_MS: i64 = 30_000;

#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    pool: MySqlPool,
    /// Redis holds the locks (unless `lock.mode = none`) and the unread copy.
    redis: Arc<RedisCheck>,
    redis_health: Arc<RedisHealth>,
    kafka: Arc<BaseConsumer>,
    metrics: PrometheusHandle,
    unread: Unread,
}

/// Binds the admin address (failing start-up clearly if it is taken) and serves until
/// the returned task is aborted.
pub async fn serve(
    settings: &Settings,
    health: Arc<Health>,
    pipeline: &Pipeline,
    metrics: PrometheusHandle,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let kafka: BaseConsumer = settings
        .kafka
        .client_config()
        .create()
        .context("creating the Kafka client for readiness checks")?;
    let redis = Arc::new(RedisCheck {
        client: crate::redis_client::open(&settings.redis)?,
        connection: tokio::sync::Mutex::new(None),
    });
    let state = AdminState {
        health,
        pool: pipeline.pool.clone(),
        redis,
        redis_health: pipeline.redis_health(),
        kafka: Arc::new(kafka),
        metrics,
        unread: pipeline.unread(),
    };
    let mut guarded = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/v1/unread", get(unread));
    match &settings.admin.token {
        Some(token) => {
            let token = Arc::new(token.clone());
            guarded = guarded.route_layer(middleware::from_fn_with_state(token, require_token));
        }
        None if !settings.admin.listen.ip().is_loopback() => tracing::warn!(
            listen = %settings.admin.listen,
            "the admin server listens beyond loopback without `admin.token`: \
             /metrics and /v1/unread are open to anyone who reaches it"
        ),
        None => {}
    }
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(settings.admin.listen)
        .await
        .with_context(|| format!("binding the admin address {}", settings.admin.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "admin server listening");
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "admin server stopped");
        }
    });
    Ok((address, task))
}

/// Lets a request through only with `Authorization: Bearer <admin.token>` (compared in
/// constant time); else 401 with `WWW-Authenticate: Bearer`.
async fn require_token(State(token): State<Arc<Secret>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match given {
        Some(given) if bool::from(given.as_bytes().ct_eq(token.expose().as_bytes())) => {
            next.run(request).await
        }
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "this endpoint needs Authorization: Bearer <admin.token>\n",
        )
            .into_response(),
    }
}

async fn healthz(State(state): State<AdminState>) -> Response {
    match state.health.since_last_beat_ms() {
        Some(ms) if ms <= STALE_HEARTBEAT_MS => (StatusCode::OK, "ok\n").into_response(),
        Some(ms) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("consumer loop stalled for {ms} ms\n"),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "consumer loop not started\n",
        )
            .into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let (kafka, mysql, redis) = tokio::join!(
        check_kafka(state.kafka.clone()),
        check_mysql(&state.pool),
        check_redis(&state.redis)
    );
    let partitions = state.health.assigned_partitions();
    let assigned = if partitions > 0 {
        Ok(())
    } else {
        Err("no partitions assigned".to_string())
    };
    let ready = kafka.is_ok() && mysql.is_ok() && assigned.is_ok();
    let show = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => e.clone(),
    };
    let body = json!({
        "ready": ready,
        "kafka": show(&kafka),
        "mysql": show(&mysql),
        "redis": show(&redis),
        "degraded": state.redis_health.is_degraded(),
        "partitions": partitions,
        "assignment": show(&assigned),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn render_metrics(State(state): State<AdminState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// The query of `GET /v1/unread`.
#[derive(Debug, serde::Deserialize)]
struct UnreadQuery {
    tenant: Option<String>,
    platform: Option<String>,
    agent: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// An agent's unread counts: 200 with DESIGN.md's shape, 400 naming a missing or bad
/// parameter, 503 when neither Redis nor MySQL answers.
async fn unread(
    State(state): State<AdminState>,
    query: Result<axum::extract::Query<UnreadQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let bad = |message: String| (StatusCode::BAD_REQUEST, Json(json!({ "error": message })));
    let query = match query {
        Ok(axum::extract::Query(query)) => query,
        Err(rejection) => return bad(rejection.body_text()).into_response(),
    };
    let (Some(tenant_id), Some(platform), Some(agent_id)) =
        (query.tenant, query.platform, query.agent)
    else {
        return bad("tenant, platform and agent are required".into()).into_response();
    };
    let limit = query.limit.unwrap_or(UNREAD_PAGE);
    if limit == 0 || limit > UNREAD_PAGE_MAX {
        return bad(format!("limit must be 1 to {UNREAD_PAGE_MAX}")).into_response();
    }
    let cursor = match query.cursor.as_deref().map(Cursor::decode) {
        Some(None) => return bad("cursor is not one this API gave".into()).into_response(),
        Some(cursor) => cursor,
        None => None,
    };
    let agent = Agent {
        tenant_id,
        platform,
        agent_id,
    };
    let read = state.unread.read(&agent, limit, cursor.as_ref());
    let error = match tokio::time::timeout(UNREAD_TIMEOUT, read).await {
        Ok(Ok(view)) => return Json(view).into_response(),
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no answer within {} s", UNREAD_TIMEOUT.as_secs()),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": format!("neither Redis nor MySQL answered: {error}") })),
    )
        .into_response()
}

async fn check_kafka(kafka: Arc<BaseConsumer>) -> Result<(), String> {
    // librdkafka's metadata call blocks: keep it off the async workers.
    tokio::task::spawn_blocking(move || {
        kafka
            .fetch_metadata(None, CHECK_TIMEOUT)
            .map(|_| ())
            .map_err(|e| format!("down: {e}"))
    })
    .await
    .unwrap_or_else(|e| Err(format!("check failed: {e}")))
}

async fn check_mysql(pool: &MySqlPool) -> Result<(), String> {
    match tokio::time::timeout(CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(pool)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("down: {e}")),
        Err(_) => Err("down: no answer within 2 s".into()),
    }
}

/// Redis for readiness reports: one connection, opened on first use and again after
/// it failed (not one per check).
struct RedisCheck {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

async fn check_redis(check: &RedisCheck) -> Result<(), String> {
    let ping = async {
        let mut slot = check.connection.lock().await;
        let mut connection = match slot.take() {
            Some(connection) => connection,
            None => check.client.get_multiplexed_async_connection().await?,
        };
        let answer = redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await?;
        // Kept only after it answered: a failed one is opened anew next time.
        *slot = Some(connection);
        Ok::<_, redis::RedisError>(answer)
    };
    match tokio::time::timeout(REDIS_REPORT_TIMEOUT, ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("down: {e}")),
        Err(_) => Err("down: no answer within 300 ms".into()),
    }
}
