//! `scripts/stack.sh`: idempotent `up`, and recovery of a managed service that died.
//! The recovery test runs a private Redis (own port, own state directory) so the shared
//! stack that other tests use is never disturbed.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh")
}

fn stack(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new("bash")
        .arg(script())
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("running stack.sh")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_answers(port: u16) -> bool {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "ping"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
        .unwrap_or(false)
}

fn is_alive(pid: &str) -> bool {
    Path::new("/proc").join(pid).exists()
        && !std::fs::read_to_string(Path::new("/proc").join(pid).join("stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

#[test]
fn up_while_everything_is_up_is_a_noop_that_exits_zero() {
    // The suite runs on a stack that is already up (scripts/test.sh brings it up).
    let output = stack(&["up"], &[]);
    let out = text(&output);
    assert!(output.status.success(), "{out}");
    for service in ["kafka", "mariadb", "redis"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{service}:")))
            .unwrap_or_else(|| panic!("no line for {service}: {out}"));
        assert!(line.contains("already"), "{service} was not reused: {out}");
    }
}

#[test]
fn up_restarts_a_managed_service_that_was_killed() {
    let state = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let envs = [
        ("STACK_DIR", state.path().to_str().unwrap()),
        ("REDIS_PORT", port.as_str()),
    ];
    let port: u16 = port.parse().unwrap();

    let first = stack(&["up", "redis"], &envs);
    assert!(first.status.success(), "{}", text(&first));
    assert!(redis_answers(port));
    let pid = std::fs::read_to_string(state.path().join("redis/pid")).unwrap();
    let pid = pid.trim().to_string();

    let again = stack(&["up", "redis"], &envs);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("already running"), "{}", text(&again));

    let killed = Command::new("kill").args(["-KILL", &pid]).status().unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_answers(port) || is_alive(&pid) {
        assert!(Instant::now() < deadline, "redis {pid} did not die");
        std::thread::sleep(Duration::from_millis(100));
    }

    let revived = stack(&["up", "redis"], &envs);
    let out = text(&revived);
    assert!(revived.status.success(), "{out}");
    assert!(out.contains("died, starting it again"), "{out}");
    assert!(redis_answers(port), "{out}");
    let new_pid = std::fs::read_to_string(state.path().join("redis/pid")).unwrap();
    assert_ne!(new_pid.trim(), pid);

    let down = stack(&["down", "redis"], &envs);
    assert!(down.status.success(), "{}", text(&down));
    assert!(!redis_answers(port));
}
