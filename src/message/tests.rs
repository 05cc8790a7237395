use super::*;

const SAMPLE: &str = r#"{"message_id":"7c1c9e","from_user_id":"63038d28000000001200d311",
 "to_user_id":"575d2c135e87e733f0162b88","message_type":"HINT","message_source":2,
 "content":"hello","timestamp":"1723268668573","intentCommentId":"",
 "user_info":[{"header_image":"xxx.jpg","nickname":"- ","user_id":"63038d28000000001200d311"}]}"#;

fn decode_str(text: &str) -> Result<Inbound, InvalidMessage> {
    decode(Some(text.as_bytes()), DEFAULT_MAX_BYTES)
}

fn message(text: &str) -> ChatMessage {
    match decode_str(text).unwrap() {
        Inbound::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

fn reason(text: &str) -> String {
    decode_str(text).unwrap_err().0
}

fn with(field: &str, value: &str) -> String {
    let mut json: Value = serde_json::from_str(SAMPLE).unwrap();
    json[field] = serde_json::from_str(value).unwrap();
    json.to_string()
}

fn without(field: &str) -> String {
    let mut json: Value = serde_json::from_str(SAMPLE).unwrap();
    json.as_object_mut().unwrap().remove(field);
    json.to_string()
}

#[test]
fn platform_payload_decodes_with_defaults_and_profile() {
    let m = message(SAMPLE);
    assert_eq!(m.tenant_id, "default");
    assert_eq!(m.platform, "2");
    assert_eq!(m.message_id, "7c1c9e");
    assert_eq!(m.from_user_id, "63038d28000000001200d311");
    assert_eq!(m.to_user_id, "575d2c135e87e733f0162b88");
    assert_eq!(m.message_type, "HINT");
    assert_eq!(m.content, "hello");
    assert_eq!(m.sent_at, 1_723_268_668_573);
    assert_eq!(
        m.profile,
        Some(Profile {
            nickname: Some("- ".into()),
            avatar: Some("xxx.jpg".into())
        })
    );
}

#[test]
fn explicit_platform_wins_over_message_source_and_default_applies_without_both() {
    assert_eq!(message(&with("platform", "\"xhs\"")).platform, "xhs");
    assert_eq!(message(&with("message_source", "\"web\"")).platform, "web");
    assert_eq!(message(&without("message_source")).platform, "default");
    assert_eq!(message(&with("tenant_id", "\"acme\"")).tenant_id, "acme");
}

#[test]
fn timestamp_may_be_a_number_or_a_numeric_string() {
    assert_eq!(
        message(&with("timestamp", "1723268668573")).sent_at,
        1_723_268_668_573
    );
    assert!(reason(&with("timestamp", "\"soon\"")).contains("timestamp"));
    assert!(reason(&with("timestamp", "-5")).contains("timestamp"));
    assert!(reason(&with("timestamp", "1.5")).contains("timestamp"));
    assert!(reason(&without("timestamp")).contains("timestamp is missing"));
}

#[test]
fn user_info_may_be_an_object_and_other_users_entries_are_not_applied() {
    let object = with(
        "user_info",
        r#"{"nickname":"Ann","user_id":"63038d28000000001200d311"}"#,
    );
    assert_eq!(
        message(&object).profile.unwrap().nickname.as_deref(),
        Some("Ann")
    );
    let agent_only = with(
        "user_info",
        r#"[{"nickname":"Agent","user_id":"575d2c135e87e733f0162b88"}]"#,
    );
    assert_eq!(message(&agent_only).profile, None);
    assert!(reason(&with("user_info", "7")).contains("user_info"));
}

#[test]
fn overlong_nickname_is_cut_and_overlong_avatar_dropped() {
    let long = "é".repeat(300);
    let m = message(&with(
        "user_info",
        &format!(
            r#"{{"nickname":"{long}","header_image":"{}"}}"#,
            "a".repeat(3000)
        ),
    ));
    let profile = m.profile.unwrap();
    assert_eq!(
        profile.nickname.unwrap().chars().count(),
        MAX_NICKNAME_CHARS
    );
    assert_eq!(profile.avatar, None);
}

#[test]
fn unknown_fields_are_ignored() {
    assert_eq!(
        message(&with("brand_new_field", "{\"x\":1}")).message_id,
        "7c1c9e"
    );
}

#[test]
fn read_receipt_decodes_as_a_watermark() {
    let text = r#"{"type":"read","tenant_id":"t","platform":"p","from_user_id":"c",
        "to_user_id":"a","timestamp":1723268668573}"#;
    assert_eq!(
        decode_str(text).unwrap(),
        Inbound::Read(ReadReceipt {
            tenant_id: "t".into(),
            platform: "p".into(),
            from_user_id: "c".into(),
            to_user_id: "a".into(),
            read_up_to: 1_723_268_668_573,
        })
    );
    assert!(reason(&with("type", "\"typing\"")).contains("unknown type"));
}

#[test]
fn bad_ids_are_invalid_naming_the_field() {
    for (field, value, expected) in [
        ("message_id", "\"\"", "message_id is empty"),
        (
            "from_user_id",
            "\" u1\"",
            "from_user_id has leading or trailing whitespace",
        ),
        (
            "to_user_id",
            "\"a1 \"",
            "to_user_id has leading or trailing whitespace",
        ),
        (
            "message_id",
            "\"a\\u0007b\"",
            "message_id contains a control character",
        ),
        ("tenant_id", "\"\"", "tenant_id is empty"),
    ] {
        assert_eq!(reason(&with(field, value)), expected, "{field}={value}");
    }
    let long = format!("\"{}\"", "x".repeat(MAX_ID_BYTES + 1));
    assert!(reason(&with("from_user_id", &long)).contains("more than 64"));
    let exactly = format!("\"{}\"", "x".repeat(MAX_ID_BYTES));
    assert_eq!(
        message(&with("from_user_id", &exactly)).from_user_id.len(),
        64
    );
    assert_eq!(reason(&without("message_id")), "message_id is missing");
    assert!(reason(&with("message_id", "42")).contains("wrong shape"));
}

#[test]
fn non_json_wrong_shape_and_empty_values_are_invalid() {
    assert!(reason("not json").contains("not JSON"));
    assert!(reason("[1,2]").contains("not an object"));
    assert!(decode(None, DEFAULT_MAX_BYTES)
        .unwrap_err()
        .0
        .contains("no value"));
    assert!(decode(Some(b""), DEFAULT_MAX_BYTES)
        .unwrap_err()
        .0
        .contains("zero-length"));
    let bad_utf8 = [b'{', 0xff, 0xfe, b'}'];
    assert!(decode(Some(&bad_utf8), DEFAULT_MAX_BYTES)
        .unwrap_err()
        .0
        .contains("UTF-8"));
}

#[test]
fn oversized_input_is_invalid() {
    let big = with("content", &format!("\"{}\"", "x".repeat(600)));
    assert!(decode(Some(big.as_bytes()), 500)
        .unwrap_err()
        .0
        .contains("exceeds the limit"));
    assert!(decode(Some(big.as_bytes()), big.len()).is_ok());
}

#[test]
fn ids_differing_only_in_case_stay_distinct() {
    let upper = message(&with("message_id", "\"ABC\""));
    let lower = message(&with("message_id", "\"abc\""));
    assert_ne!(upper.message_id, lower.message_id);
}
