# im-ingest container image: the release binary only, running as a non-root user,
# configured by built-in defaults plus IM_INGEST__SECTION__KEY environment variables.
#
#   docker build -t im-ingest .
#   docker run --rm -e IM_INGEST__KAFKA__BROKERS=kafka:9092 ... im-ingest run
#
# (No Docker engine runs on the project's CI machines: this file is reviewed, and the
# compose file that uses it is syntax-checked, but neither is built there.)

FROM rust:1.95-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY examples ./examples
RUN cargo build --release --locked --bin im-ingest

# The integration suite, for `docker compose --profile test run --rm tests`: the source
# with its tests, built once, plus redis-server for the tests that start a private Redis.
# Not part of the runtime image (a separate target; the last stage is the default).
FROM builder AS test
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/*
COPY tests ./tests
RUN cargo test --locked --features failpoints --no-run
ENV IM_TEST_KAFKA_BROKERS=kafka:19092 \
    IM_TEST_MYSQL_URL=mysql://root@mysql:3306 \
    IM_TEST_REDIS_URL=redis://redis:6379
# The stack-script tests drive scripts/stack.sh, which manages services on this
# machine's loopback, not the compose services: they are skipped here.
CMD ["cargo", "test", "--locked", "--features", "failpoints", "--lib", "--tests", "--", "--skip", "stack_script::"]

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home im-ingest
COPY --from=builder /src/target/release/im-ingest /usr/local/bin/im-ingest
USER im-ingest
# Inside a container the admin server must listen beyond loopback to be probed.
ENV IM_INGEST__ADMIN__LISTEN=0.0.0.0:9464
EXPOSE 9464
ENTRYPOINT ["im-ingest"]
CMD ["run"]
