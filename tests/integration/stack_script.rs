//! `scripts/stack.sh`: idempotent `up` (plain and `--secure`), recovery of a managed
//! service that died, and the secure set's certificates, ACL user and TLS-only Redis.
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

#[test]
fn up_secure_while_it_is_up_is_a_noop_and_status_secure_shows_each_service_answering() {
    // scripts/test.sh brings the secure set up too.
    let output = stack(&["up", "--secure"], &[]);
    let out = text(&output);
    assert!(output.status.success(), "{out}");
    let status = stack(&["status", "--secure"], &[]);
    let status_text = text(&status);
    for service in ["kafka", "mariadb", "redis"] {
        let up_line = out
            .lines()
            .find(|l| l.starts_with(&format!("{service} (secure):")))
            .unwrap_or_else(|| panic!("no line for {service}: {out}"));
        assert!(
            up_line.contains("already"),
            "{service} was not reused: {out}"
        );
        let status_line = status_text
            .lines()
            .find(|l| l.starts_with(&format!("{service} (secure)")))
            .unwrap_or_else(|| panic!("no status for {service}: {status_text}"));
        assert!(
            status_line.contains(" answering"),
            "{service}: {status_text}"
        );
    }
}

#[test]
fn up_secure_makes_certificates_and_an_acl_user_and_serves_redis_over_tls_only() {
    let state = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let envs = [
        ("STACK_DIR", state.path().to_str().unwrap()),
        ("SECURE_REDIS_PORT", port.as_str()),
    ];
    let up = stack(&["up", "--secure", "redis"], &envs);
    assert!(up.status.success(), "{}", text(&up));
    let secure = state.path().join("secure");
    let password = std::fs::read_to_string(secure.join("secrets/redis_im")).unwrap();
    let ping = |tls: bool, user: &str| {
        let mut command = Command::new("redis-cli");
        command.args(["-h", "127.0.0.1", "-p", port.as_str(), "--user", user]);
        if tls {
            command
                .arg("--tls")
                .arg("--cacert")
                .arg(secure.join("tls/ca.pem"));
        }
        let output = command
            .arg("ping")
            .env("REDISCLI_AUTH", password.trim())
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    assert_eq!(ping(true, "im"), "PONG");
    assert_ne!(ping(false, "im"), "PONG", "plaintext was answered");
    assert_ne!(ping(true, "default"), "PONG", "the default user is on");
    let mode = std::fs::metadata(secure.join("secrets/redis_im"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077,
        0,
        "secrets readable by others"
    );
    let down = stack(&["down", "--secure", "redis"], &envs);
    assert!(down.status.success(), "{}", text(&down));
}
