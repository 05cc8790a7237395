//! Spring Kafka's retry and dead-letter headers, byte for byte (DESIGN.md, "Topics and
//! headers").
//!
//! Guarantee: what [`RetryHeaders::to_headers`] writes, a Spring Kafka consumer reads
//! (and vice versa): the `retry_topic-*` numbers as Java's `BigInteger.toByteArray()`
//! (minimal big-endian two's complement), the partition as a 4-byte and offsets and
//! timestamps as 8-byte big-endian integers, strings as UTF-8. Decoding accepts any
//! `retry_topic-*` length from 1 to 8 bytes and rejects anything else with a reason.

use rdkafka::message::{Header, Headers, OwnedHeaders};

pub const ATTEMPTS: &str = "retry_topic-attempts";
pub const BACKOFF_TIMESTAMP: &str = "retry_topic-backoff-timestamp";
pub const ORIGINAL_TIMESTAMP: &str = "retry_topic-original-timestamp";
pub const DLT_ORIGINAL_TOPIC: &str = "kafka_dlt-original-topic";
pub const DLT_ORIGINAL_PARTITION: &str = "kafka_dlt-original-partition";
pub const DLT_ORIGINAL_OFFSET: &str = "kafka_dlt-original-offset";
pub const DLT_ORIGINAL_TIMESTAMP: &str = "kafka_dlt-original-timestamp";
pub const DLT_ORIGINAL_CONSUMER_GROUP: &str = "kafka_dlt-original-consumer-group";
pub const DLT_EXCEPTION_FQCN: &str = "kafka_dlt-exception-fqcn";
pub const DLT_EXCEPTION_MESSAGE: &str = "kafka_dlt-exception-message";
/// How often `im-ingest replay` republished a record (decimal UTF-8); carried onto every
/// delay and dead-letter record made of it.
pub const REPLAY_COUNT: &str = "im_ingest-replay-count";
/// Longest `kafka_dlt-exception-message` the worker writes (a longer reason is cut).
pub const MAX_EXCEPTION_MESSAGE_BYTES: usize = 4096;

/// The main-topic record a retry or dead letter stems from; kept unchanged across hops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The main-topic record's timestamp, epoch ms.
    pub timestamp: i64,
    pub consumer_group: String,
}

/// Every header a delay or dead-letter record carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryHeaders {
    /// Deliveries so far, the first included (the first delay record carries 2).
    pub attempts: i64,
    /// Due time, epoch ms: the record is not processed before it.
    pub backoff_timestamp: i64,
    pub origin: Origin,
    /// Error class, e.g. `im_ingest::LockHeld`.
    pub exception_fqcn: String,
    pub exception_message: String,
    /// [`REPLAY_COUNT`] of the record, when it was replayed.
    pub replay_count: Option<u32>,
}

/// The [`REPLAY_COUNT`] a record carries (absent or unreadable: never replayed).
pub fn replay_count(headers: Option<&impl Headers>) -> Option<u32> {
    let value = last(headers?, REPLAY_COUNT)?;
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Java `BigInteger.valueOf(v).toByteArray()`: big-endian two's complement, as few bytes
/// as keep the sign.
pub fn encode_big_integer(value: i64) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let mut start = 0;
    while start < bytes.len() - 1 {
        let (byte, next_high_bit) = (bytes[start], bytes[start + 1] & 0x80);
        let redundant =
            (byte == 0x00 && next_high_bit == 0) || (byte == 0xff && next_high_bit != 0);
        if !redundant {
            break;
        }
        start += 1;
    }
    bytes[start..].to_vec()
}

/// Reads a big-endian two's-complement integer of 1 to 8 bytes.
pub fn decode_big_integer(bytes: &[u8]) -> Result<i64, String> {
    if bytes.is_empty() || bytes.len() > 8 {
        return Err(format!("expected 1 to 8 bytes, got {}", bytes.len()));
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xff } else { 0x00 };
    let mut full = [fill; 8];
    full[8 - bytes.len()..].copy_from_slice(bytes);
    Ok(i64::from_be_bytes(full))
}

impl RetryHeaders {
    pub fn to_headers(&self) -> OwnedHeaders {
        let attempts = encode_big_integer(self.attempts);
        let backoff = encode_big_integer(self.backoff_timestamp);
        let original = encode_big_integer(self.origin.timestamp);
        let partition = self.origin.partition.to_be_bytes();
        let offset = self.origin.offset.to_be_bytes();
        let timestamp = self.origin.timestamp.to_be_bytes();
        let replay_count = self.replay_count.map(|n| n.to_string());
        let entries: [(&str, &[u8]); 10] = [
            (ATTEMPTS, &attempts),
            (BACKOFF_TIMESTAMP, &backoff),
            (ORIGINAL_TIMESTAMP, &original),
            (DLT_ORIGINAL_TOPIC, self.origin.topic.as_bytes()),
            (DLT_ORIGINAL_PARTITION, &partition),
            (DLT_ORIGINAL_OFFSET, &offset),
            (DLT_ORIGINAL_TIMESTAMP, &timestamp),
            (
                DLT_ORIGINAL_CONSUMER_GROUP,
                self.origin.consumer_group.as_bytes(),
            ),
            (DLT_EXCEPTION_FQCN, self.exception_fqcn.as_bytes()),
            (DLT_EXCEPTION_MESSAGE, self.exception_message.as_bytes()),
        ];
        let replayed = replay_count
            .as_deref()
            .map(|count| (REPLAY_COUNT, count.as_bytes()));
        entries.into_iter().chain(replayed).fold(
            OwnedHeaders::new_with_capacity(entries.len() + 1),
            |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: Some(value),
                })
            },
        )
    }

    /// Reads the headers of a delay record; `None` when it carries no retry headers at
    /// all (a record that never went through a delay topic), an error naming the header
    /// when one is missing or malformed.
    pub fn from_headers(headers: &impl Headers) -> Result<Option<Self>, String> {
        if last(headers, ATTEMPTS).is_none() {
            return Ok(None);
        }
        let big = |name: &str| -> Result<i64, String> {
            decode_big_integer(required(headers, name)?).map_err(|e| format!("header {name}: {e}"))
        };
        let fixed = |name: &str, len: usize| -> Result<Vec<u8>, String> {
            let value = required(headers, name)?;
            if value.len() == len {
                Ok(value.to_vec())
            } else {
                Err(format!(
                    "header {name}: expected {len} bytes, got {}",
                    value.len()
                ))
            }
        };
        let text = |name: &str| -> Result<String, String> {
            String::from_utf8(required(headers, name)?.to_vec())
                .map_err(|_| format!("header {name}: not UTF-8"))
        };
        let partition = fixed(DLT_ORIGINAL_PARTITION, 4)?;
        let offset = fixed(DLT_ORIGINAL_OFFSET, 8)?;
        let timestamp = fixed(DLT_ORIGINAL_TIMESTAMP, 8)?;
        Ok(Some(Self {
            attempts: big(ATTEMPTS)?,
            backoff_timestamp: big(BACKOFF_TIMESTAMP)?,
            origin: Origin {
                topic: text(DLT_ORIGINAL_TOPIC)?,
                partition: i32::from_be_bytes(partition.try_into().expect("4 bytes")),
                offset: i64::from_be_bytes(offset.try_into().expect("8 bytes")),
                timestamp: i64::from_be_bytes(timestamp.try_into().expect("8 bytes")),
                consumer_group: text(DLT_ORIGINAL_CONSUMER_GROUP)?,
            },
            exception_fqcn: text(DLT_EXCEPTION_FQCN).unwrap_or_default(),
            exception_message: text(DLT_EXCEPTION_MESSAGE).unwrap_or_default(),
            replay_count: replay_count(Some(headers)),
        }))
    }
}

/// The last value of a header (Kafka allows repeats; the newest wins, as in Spring).
fn last<'a>(headers: &'a impl Headers, name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
}

fn required<'a>(headers: &'a impl Headers, name: &str) -> Result<&'a [u8], String> {
    last(headers, name).ok_or_else(|| format!("header {name} is missing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_integer_matches_java_to_byte_array() {
        // Expected bytes were printed by jshell: java.math.BigInteger.valueOf(v).toByteArray().
        let cases: [(i64, &[u8]); 10] = [
            (0, &[0x00]),
            (1, &[0x01]),
            (2, &[0x02]),
            (127, &[0x7f]),
            (128, &[0x00, 0x80]),
            (255, &[0x00, 0xff]),
            (-1, &[0xff]),
            (-128, &[0x80]),
            (-129, &[0xff, 0x7f]),
            // 2024-08-10T05:44:28.573Z in epoch ms.
            (1_723_268_668_573, &[0x01, 0x91, 0x3a, 0xd1, 0x1c, 0x9d]),
        ];
        for (value, bytes) in cases {
            assert_eq!(encode_big_integer(value), bytes, "encoding {value}");
            assert_eq!(
                decode_big_integer(bytes),
                Ok(value),
                "decoding {bytes:02x?}"
            );
        }
        assert_eq!(encode_big_integer(i64::MAX).len(), 8);
        assert_eq!(encode_big_integer(i64::MIN).len(), 8);
    }

    #[test]
    fn big_integer_reads_any_length_from_one_to_eight_bytes() {
        assert_eq!(decode_big_integer(&[0, 0, 0, 5]), Ok(5)); // a Java int
        assert_eq!(decode_big_integer(&[0, 0, 0, 0, 0, 0, 0, 5]), Ok(5)); // a Java long
        assert_eq!(decode_big_integer(&[0xff, 0xff, 0xff, 0xfe]), Ok(-2));
        assert!(decode_big_integer(&[]).is_err());
        assert!(decode_big_integer(&[0; 9]).is_err());
    }

    fn sample() -> RetryHeaders {
        RetryHeaders {
            attempts: 2,
            backoff_timestamp: 1_723_268_668_823,
            origin: Origin {
                topic: "im.inbound".into(),
                partition: 3,
                offset: 42,
                timestamp: 1_723_268_668_573,
                consumer_group: "im-ingest".into(),
            },
            exception_fqcn: "im_ingest::LockHeld".into(),
            exception_message: "lock held elsewhere".into(),
            replay_count: None,
        }
    }

    #[test]
    fn headers_carry_springs_names_and_encodings() {
        let headers = sample().to_headers();
        let get = |name| last(&headers, name).unwrap().to_vec();
        assert_eq!(get(ATTEMPTS), [0x02]);
        assert_eq!(get(BACKOFF_TIMESTAMP), [0x01, 0x91, 0x3a, 0xd1, 0x1d, 0x97]);
        assert_eq!(
            get(ORIGINAL_TIMESTAMP),
            [0x01, 0x91, 0x3a, 0xd1, 0x1c, 0x9d]
        );
        assert_eq!(get(DLT_ORIGINAL_TOPIC), b"im.inbound");
        assert_eq!(get(DLT_ORIGINAL_PARTITION), [0, 0, 0, 3]);
        assert_eq!(get(DLT_ORIGINAL_OFFSET), [0, 0, 0, 0, 0, 0, 0, 42]);
        assert_eq!(
            get(DLT_ORIGINAL_TIMESTAMP),
            [0x00, 0x00, 0x01, 0x91, 0x3a, 0xd1, 0x1c, 0x9d]
        );
        assert_eq!(get(DLT_ORIGINAL_CONSUMER_GROUP), b"im-ingest");
        assert_eq!(get(DLT_EXCEPTION_FQCN), b"im_ingest::LockHeld");
        assert_eq!(get(DLT_EXCEPTION_MESSAGE), b"lock held elsewhere");
    }

    #[test]
    fn headers_round_trip() {
        let headers = sample().to_headers();
        assert_eq!(RetryHeaders::from_headers(&headers), Ok(Some(sample())));
        assert_eq!(RetryHeaders::from_headers(&OwnedHeaders::new()), Ok(None));
    }

    #[test]
    fn malformed_partition_header_is_an_error_naming_it() {
        let headers = sample().to_headers().insert(Header {
            key: DLT_ORIGINAL_PARTITION,
            value: Some(&[0u8, 3][..]),
        });
        let error = RetryHeaders::from_headers(&headers).unwrap_err();
        assert!(error.contains(DLT_ORIGINAL_PARTITION), "{error}");
    }
}
