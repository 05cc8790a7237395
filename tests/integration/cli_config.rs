//! The binary's configuration errors: one clear line on stderr naming the key, non-zero
//! exit, and nothing attempted with a half-read configuration.

use crate::helpers::{im_ingest, stderr_of};

#[test]
fn unknown_configuration_key_in_file_fails_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("settings.toml");
    std::fs::write(
        &file,
        "[redis]\nurl = \"redis://127.0.0.1:6379\"\nlease_msec = 5\n",
    )
    .unwrap();
    let output = im_ingest(&["--config", file.to_str().unwrap(), "migrate"], &[]);
    let stderr = stderr_of(&output);
    assert!(
        !output.status.success(),
        "exit should be non-zero: {stderr}"
    );
    assert!(stderr.contains("redis.lease_msec"), "{stderr}");
    assert!(stderr.contains("settings.toml"), "{stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one line expected: {stderr}"
    );
}

#[test]
fn unknown_environment_key_fails_naming_the_variable() {
    let output = im_ingest(
        &["migrate"],
        &[("IM_INGEST__KAFKA__BROKER", "127.0.0.1:9092")],
    );
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("kafka.broker"), "{stderr}");
    assert!(stderr.contains("IM_INGEST__KAFKA__BROKER"), "{stderr}");
}

#[test]
fn malformed_environment_override_fails_naming_the_key() {
    let output = im_ingest(
        &["migrate"],
        &[("IM_INGEST__DATABASE__MAX_CONNECTIONS", "many")],
    );
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("database.max_connections"), "{stderr}");
    assert!(
        stderr.contains("IM_INGEST__DATABASE__MAX_CONNECTIONS"),
        "{stderr}"
    );
}

#[test]
fn missing_config_file_fails_naming_the_file() {
    let output = im_ingest(&["--config", "no/such/file.toml", "migrate"], &[]);
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("no/such/file.toml"), "{stderr}");
}

#[test]
fn database_password_is_not_printed_when_connecting_fails() {
    // Port 1 on loopback refuses at once: the error must name the URL without its password.
    let output = im_ingest(
        &["migrate"],
        &[(
            "IM_INGEST__DATABASE__URL",
            "mysql://app:hunter2@127.0.0.1:1/im",
        )],
    );
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
}

#[test]
fn help_documents_every_flag() {
    let output = im_ingest(&["--help"], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    for word in ["--config", "migrate", "IM_INGEST__"] {
        assert!(stdout.contains(word), "--help lacks {word}: {stdout}");
    }
}
