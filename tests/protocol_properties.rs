//! Property tests of the sans-IO codec on stable: the invariants the fuzz targets in
//! fuzz/ check under libFuzzer (nightly), checked here with proptest so `cargo test` keeps
//! them without a nightly compiler.
//!
//! For the frame header, every request decoder, every response decoder and batch
//! validation: (a) arbitrary bytes never panic, and either decode, say `Incomplete`, or
//! return a typed error; (b) generated valid values round-trip through encode and decode;
//! (c) a decoded value's lengths and counts are backed by the bytes and within the
//! `DecodeLimits` (checked by re-encoding: a request decoded from bytes re-encodes to
//! exactly those bytes).
//!
//! Case counts are modest so the whole file runs in seconds; proptest prints the seed and
//! the minimal failing input of any failure (and saves it under proptest-regressions/).
//! `dump_fuzz_seeds` (ignored) writes the encoded examples below as the fuzzers' seeds.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use shardq::protocol::batch::{
    check_framing, compute_crc, decode_records, stamp_batch, validate_batch, BatchBuilder,
    BatchError, Record, BATCH_CRC_START, BATCH_HEADER_SIZE,
};
use shardq::protocol::*;

const CASES: u32 = 1024;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Generators of valid values.

fn topic_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,24}".prop_filter("not . or ..", |name| name != "." && name != "..")
}

fn queue_settings() -> impl Strategy<Value = QueueSettings> {
    use proptest::option::of;
    (
        (
            of(any::<u32>()),
            of(any::<u64>()),
            of(any::<u64>()),
            of(any::<u64>()),
        ),
        (
            of(any::<u64>()),
            of(prop_oneof![
                Just(queue::ExpiryPolicy::Drop),
                Just(queue::ExpiryPolicy::DeadLetter)
            ]),
            of(prop_oneof![
                Just(queue::QueueOrdering::Unordered),
                Just(queue::QueueOrdering::PerKey)
            ]),
            of(topic_name()),
        ),
    )
        .prop_map(
            |(
                (deliveries_max, visibility_timeout_ms, retry_delay_ms_min, retry_delay_ms_max),
                (message_ttl_ms, expiry_policy, ordering, dlq_topic),
            )| QueueSettings {
                deliveries_max,
                visibility_timeout_ms,
                retry_delay_ms_min,
                retry_delay_ms_max,
                message_ttl_ms,
                expiry_policy,
                ordering,
                dlq_topic,
            },
        )
}

fn settle_action() -> impl Strategy<Value = SettleAction> {
    prop_oneof![
        Just(SettleAction::Ack),
        (proptest::option::of(0..i64::MAX as u64), "\\PC{0,20}").prop_map(|(delay, reason)| {
            SettleAction::Nack {
                delay: delay.map_or(queue::NackDelay::Backoff, queue::NackDelay::Ms),
                reason,
            }
        }),
        any::<u32>().prop_map(|visibility_timeout_ms| SettleAction::Extend {
            visibility_timeout_ms
        }),
    ]
}

fn retention() -> impl Strategy<Value = Retention> {
    (any::<u64>(), any::<u64>()).prop_map(|(bytes_max, ms_max)| Retention { bytes_max, ms_max })
}

type RecordSpec = (i64, Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>);

fn record_spec() -> impl Strategy<Value = RecordSpec> {
    (
        0i64..1 << 45,
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
        proptest::collection::vec(any::<u8>(), 0..32),
        proptest::collection::vec(
            ("[a-z]{0,6}", proptest::collection::vec(any::<u8>(), 0..8)),
            0..3,
        ),
    )
}

fn build_batch(records: &[RecordSpec], producer: Option<(u64, u64)>) -> Bytes {
    let mut builder = BatchBuilder::new(BytesMut::new());
    if let Some((producer_id, sequence)) = producer {
        builder.set_producer(producer_id, sequence);
    }
    for (timestamp_ms, key, value, headers) in records {
        let headers: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_slice()))
            .collect();
        builder.push(*timestamp_ms, key.as_deref(), value, &headers);
    }
    builder.finish()
}

fn batch() -> impl Strategy<Value = Bytes> {
    (
        proptest::collection::vec(record_spec(), 1..5),
        proptest::option::of((1u64.., any::<u64>())),
    )
        .prop_map(|(records, producer)| build_batch(&records, producer))
}

fn request() -> impl Strategy<Value = Request> {
    let names = || proptest::collection::vec(topic_name(), 0..4);
    prop_oneof![
        "\\PC{0,20}".prop_map(|client_name| Request::Handshake(HandshakeRequest { client_name })),
        names().prop_map(|topics| Request::Metadata(MetadataRequest { topics })),
        (topic_name(), any::<u32>(), retention()).prop_map(|(name, partitions, retention)| {
            Request::CreateTopic(CreateTopicRequest {
                name,
                partitions,
                retention,
                queue: QueueSettings::default(),
            })
        }),
        (topic_name(), any::<u32>(), queue_settings()).prop_map(|(name, partitions, queue)| {
            Request::CreateTopic(CreateTopicRequest {
                name,
                partitions,
                retention: Retention::default(),
                queue,
            })
        }),
        topic_name().prop_map(|name| Request::DeleteTopic(DeleteTopicRequest { name })),
        (
            topic_name(),
            proptest::option::of(retention()),
            queue_settings()
        )
            .prop_map(
                |(name, retention, queue)| Request::AlterTopic(AlterTopicRequest {
                    name,
                    retention,
                    queue
                })
            ),
        (
            topic_name(),
            topic_name(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(
                |(topic, group, messages_max, visibility_timeout_ms, wait_ms)| Request::Receive(
                    queue::ReceiveRequest {
                        topic,
                        group,
                        messages_max,
                        visibility_timeout_ms,
                        wait_ms,
                    }
                )
            ),
        (
            topic_name(),
            topic_name(),
            settle_action(),
            proptest::collection::vec(
                (any::<u32>(), 0..u64::MAX / 2, 1..u32::MAX, 1..u32::MAX),
                0..4
            )
        )
            .prop_map(
                |(topic, group, action, ranges)| Request::Settle(SettleRequest {
                    topic,
                    group,
                    action,
                    ranges: ranges
                        .into_iter()
                        .map(
                            |(partition, first_offset, count, attempt)| queue::HandleRange {
                                partition,
                                first_offset,
                                count,
                                attempt,
                            }
                        )
                        .collect(),
                })
            ),
        (
            topic_name(),
            topic_name(),
            proptest::collection::vec((any::<u32>(), any::<u64>()), 0..4)
        )
            .prop_map(|(topic, group, partitions)| Request::CommitOffsets(
                CommitOffsetsRequest {
                    group,
                    topic,
                    partitions: partitions
                        .into_iter()
                        .map(|(partition, offset)| queue::CommitPartition { partition, offset })
                        .collect(),
                }
            )),
        (
            topic_name(),
            topic_name(),
            proptest::collection::vec(any::<u32>(), 0..4)
        )
            .prop_map(|(topic, group, partitions)| Request::FetchCommitted(
                FetchCommittedRequest {
                    group,
                    topic,
                    partitions,
                }
            )),
        (topic_name(), proptest::option::of(topic_name())).prop_map(|(topic, group)| {
            Request::DescribeGroups(DescribeGroupsRequest {
                topic,
                group: group.unwrap_or_default(),
            })
        }),
        topic_name().prop_map(|topic| Request::PurgeTopic(PurgeTopicRequest { topic })),
        proptest::collection::vec(topic_name(), 0..4)
            .prop_map(|topics| Request::Stats(StatsRequest { topics })),
        (topic_name(), topic_name(), queue_settings()).prop_map(|(topic, group, settings)| {
            Request::AlterGroup(AlterGroupRequest {
                topic,
                group,
                settings,
            })
        }),
        proptest::collection::vec(
            (
                topic_name(),
                proptest::collection::vec((any::<u32>(), any::<i64>()), 0..4)
            ),
            0..3
        )
        .prop_map(|topics| Request::ListOffsets(ListOffsetsRequest {
            topics: topics
                .into_iter()
                .map(|(name, partitions)| ListOffsetsTopic {
                    name,
                    partitions: partitions
                        .into_iter()
                        .map(|(partition, timestamp_ms)| ListOffsetsPartition {
                            partition,
                            timestamp_ms
                        })
                        .collect(),
                })
                .collect(),
        })),
        (
            0u8..3,
            any::<u32>(),
            proptest::collection::vec(
                (
                    topic_name(),
                    proptest::collection::vec((any::<u32>(), batch()), 0..3)
                ),
                0..3
            )
        )
            .prop_map(
                |(acks, timeout_ms, topics)| Request::Produce(ProduceRequest {
                    acks: Acks::from_wire(acks).expect("0..3 are acks"),
                    timeout_ms,
                    topics: topics
                        .into_iter()
                        .map(|(name, partitions)| ProduceTopic {
                            name,
                            partitions: partitions
                                .into_iter()
                                .map(|(partition, batch)| ProducePartition { partition, batch })
                                .collect(),
                        })
                        .collect(),
                })
            ),
        (
            any::<u32>(),
            any::<u32>(),
            proptest::collection::vec(
                (
                    topic_name(),
                    proptest::collection::vec((any::<u32>(), any::<u64>(), any::<u32>()), 0..4)
                ),
                0..3
            )
        )
            .prop_map(
                |(wait_ms_max, bytes_max, topics)| Request::Fetch(FetchRequest {
                    wait_ms_max,
                    bytes_max,
                    topics: topics
                        .into_iter()
                        .map(|(name, partitions)| FetchTopic {
                            name,
                            partitions: partitions
                                .into_iter()
                                .map(|(partition, offset, bytes_max)| FetchPartition {
                                    partition,
                                    offset,
                                    bytes_max,
                                })
                                .collect(),
                        })
                        .collect(),
                })
            ),
    ]
}

/// Error codes that survive a round trip (`from_wire` of an unknown code reads Internal;
/// `None` is success, not an error).
fn wire_error() -> impl Strategy<Value = WireError> {
    (1u16..=21, "\\PC{0,16}").prop_map(|(code, message)| WireError {
        code: ErrorCode::from_wire(code),
        message,
    })
}

fn response() -> impl Strategy<Value = (Opcode, ResponseBody)> {
    prop_oneof![
        (
            any::<u8>(),
            any::<u16>(),
            any::<u16>(),
            "\\PC{0,12}",
            any::<u32>()
        )
            .prop_map(
                |(protocol_version, shard_count, shard_id, server_version, batch_bytes_max)| (
                    Opcode::Handshake,
                    ResponseBody::Handshake(HandshakeResponse {
                        protocol_version,
                        shard_count,
                        shard_id,
                        server_version,
                        batch_bytes_max,
                    })
                )
            ),
        (
            proptest::collection::vec(any::<u16>(), 0..4),
            proptest::collection::vec(
                (
                    topic_name(),
                    proptest::option::of(wire_error()),
                    proptest::collection::vec((any::<u32>(), any::<u16>()), 0..4),
                    retention(),
                    queue_settings()
                ),
                0..3
            )
        )
            .prop_map(|(shard_ports, topics)| (
                Opcode::Metadata,
                ResponseBody::Metadata(MetadataResponse {
                    shard_ports,
                    topics: topics
                        .into_iter()
                        .map(
                            |(name, error, partitions, retention, queue)| TopicMetadata {
                                name,
                                error,
                                partitions: partitions
                                    .into_iter()
                                    .map(|(partition, shard)| PartitionMetadata {
                                        partition,
                                        shard
                                    })
                                    .collect(),
                                retention,
                                queue,
                            }
                        )
                        .collect(),
                })
            )),
        Just((Opcode::CreateTopic, ResponseBody::CreateTopic)),
        Just((Opcode::DeleteTopic, ResponseBody::DeleteTopic)),
        Just((Opcode::AlterTopic, ResponseBody::AlterTopic)),
        Just((Opcode::AlterGroup, ResponseBody::AlterGroup)),
        (
            proptest::collection::vec(any::<(u16, u32, u32, u64, u64, u64, u64)>(), 0..3),
            proptest::collection::vec(
                (
                    "\\PC{0,12}",
                    any::<(u32, u16, u64, u64, u64, u64, u32)>(),
                    any::<(u64, u64, u64, u64)>()
                ),
                0..3
            )
        )
            .prop_map(|(shards, partitions)| (
                Opcode::Stats,
                ResponseBody::Stats(StatsResponse {
                    shards: shards
                        .into_iter()
                        .map(
                            |(
                                shard,
                                connections_open,
                                requests_in_flight,
                                bytes_in_flight,
                                requests_total,
                                errors_total,
                                busy_ms,
                            )| ShardStats {
                                shard,
                                connections_open,
                                requests_in_flight,
                                bytes_in_flight,
                                requests_total,
                                errors_total,
                                busy_ms,
                            }
                        )
                        .collect(),
                    partitions: partitions
                        .into_iter()
                        .map(
                            |(
                                topic,
                                (
                                    partition,
                                    shard,
                                    log_start_offset,
                                    log_end_offset,
                                    high_watermark,
                                    bytes,
                                    segments,
                                ),
                                (records_in, bytes_in, records_out, bytes_out),
                            )| PartitionStats {
                                topic,
                                partition,
                                shard,
                                log_start_offset,
                                log_end_offset,
                                high_watermark,
                                bytes,
                                segments,
                                records_in,
                                bytes_in,
                                records_out,
                                bytes_out,
                            }
                        )
                        .collect(),
                })
            )),
        proptest::collection::vec(
            (
                topic_name(),
                proptest::collection::vec(
                    (
                        any::<u32>(),
                        proptest::result::maybe_ok(
                            (any::<u64>(), any::<u64>(), any::<u64>()),
                            wire_error()
                        )
                    ),
                    0..3
                )
            ),
            0..3
        )
        .prop_map(|topics| (
            Opcode::ListOffsets,
            ResponseBody::ListOffsets(ListOffsetsResponse {
                topics: topics
                    .into_iter()
                    .map(|(name, partitions)| ListOffsetsTopicResult {
                        name,
                        partitions: partitions
                            .into_iter()
                            .map(|(partition, result)| ListOffsetsPartitionResult {
                                partition,
                                result: result.map(|(offset, log_start_offset, high_watermark)| {
                                    PartitionOffsets {
                                        offset,
                                        log_start_offset,
                                        high_watermark,
                                    }
                                }),
                            })
                            .collect(),
                    })
                    .collect(),
            })
        )),
        proptest::collection::vec(
            (
                topic_name(),
                proptest::collection::vec(
                    (
                        any::<u32>(),
                        proptest::result::maybe_ok(any::<u64>(), wire_error())
                    ),
                    0..3
                )
            ),
            0..3
        )
        .prop_map(|topics| (
            Opcode::Produce,
            ResponseBody::Produce(ProduceResponse {
                topics: topics
                    .into_iter()
                    .map(|(name, partitions)| ProduceTopicResult {
                        name,
                        partitions: partitions
                            .into_iter()
                            .map(|(partition, result)| ProducePartitionResult { partition, result })
                            .collect(),
                    })
                    .collect(),
            })
        )),
        proptest::collection::vec(
            (
                topic_name(),
                proptest::collection::vec(
                    (
                        any::<u32>(),
                        any::<u64>(),
                        any::<u64>(),
                        proptest::result::maybe_ok(batch(), wire_error())
                    ),
                    0..3
                )
            ),
            0..3
        )
        .prop_map(|topics| (
            Opcode::Fetch,
            ResponseBody::Fetch(FetchResponse {
                topics: topics
                    .into_iter()
                    .map(|(name, partitions)| FetchTopicResult {
                        name,
                        partitions: partitions
                            .into_iter()
                            .map(|(partition, log_start_offset, high_watermark, batches)| {
                                FetchPartitionResult {
                                    partition,
                                    data: FetchPartitionData {
                                        log_start_offset,
                                        high_watermark,
                                        batches,
                                    },
                                }
                            })
                            .collect(),
                    })
                    .collect(),
            })
        )),
    ]
}

// ---------------------------------------------------------------------------------------
// Shared checks (the fuzz targets do the same).

fn body_of(frame: &[u8]) -> Bytes {
    Bytes::copy_from_slice(&frame[FRAME_HEADER_SIZE..])
}

/// (c) for requests: counts within the limits, and the value re-encodes to exactly the
/// bytes it was decoded from, so every declared length was backed by those bytes.
fn check_decoded_request(request: &Request, body: &[u8], limits: &DecodeLimits) {
    let (topics, partitions) = match request {
        Request::Metadata(request) => (request.topics.len(), 0),
        Request::Stats(request) => (request.topics.len(), 0),
        Request::ListOffsets(request) => (
            request.topics.len(),
            request.topics.iter().map(|t| t.partitions.len()).sum(),
        ),
        Request::Produce(request) => (
            request.topics.len(),
            request.topics.iter().map(|t| t.partitions.len()).sum(),
        ),
        Request::Fetch(request) => (
            request.topics.len(),
            request.topics.iter().map(|t| t.partitions.len()).sum(),
        ),
        _ => (0, 0),
    };
    assert!(topics <= limits.topics_per_request_max as usize);
    assert!(partitions <= limits.partitions_per_request_max as usize);
    let mut out = BytesMut::new();
    request.encode(7, &mut out);
    let encoded = &out[FRAME_HEADER_SIZE..];
    // A CreateTopic may leave out its queue settings (protocol.md §5.3): it decodes to
    // the defaults, which the encoder writes out as 6 bytes (no settings, no DLQ topic).
    if let Request::CreateTopic(create) = request {
        if create.queue == QueueSettings::default() && encoded.len() == body.len() + 6 {
            assert_eq!(
                &encoded[..body.len()],
                body,
                "decode then encode changed the bytes"
            );
            assert_eq!(&encoded[body.len()..], [0u8; 6], "empty settings");
            return;
        }
    }
    assert_eq!(encoded, body, "decode then encode changed the bytes");
}

/// Decoding never panics on these bytes; a success is checked by `check_decoded_request`.
fn decode_request_bytes(opcode: u8, body: &[u8], limits: &DecodeLimits) {
    let Some(opcode) = Opcode::from_wire(opcode) else {
        return;
    };
    if let Ok(request) = Request::decode(opcode, Bytes::copy_from_slice(body), limits) {
        assert_eq!(request.opcode(), opcode);
        check_decoded_request(&request, body, limits);
    }
}

/// A response decoded from arbitrary bytes re-encodes to bytes that decode to the same
/// value. (Not byte-identical: a success status may carry a message that is dropped, and
/// unknown error codes read as Internal.)
fn decode_response_bytes(opcode: u8, body: &[u8]) {
    let Some(opcode) = Opcode::from_wire(opcode) else {
        return;
    };
    let Ok(decoded) = decode_response(opcode, Bytes::copy_from_slice(body)) else {
        return;
    };
    let mut out = BytesMut::new();
    encode_response(&mut out, opcode, 9, decoded.as_ref());
    let again = decode_response(opcode, body_of(&out)).expect("re-encoded response decodes");
    assert_eq!(again, decoded);
}

/// Batch checks on arbitrary bytes: none panics, and what passes is backed by the bytes.
fn check_batch_bytes(bytes: &[u8], records_max: u32) {
    if let Ok(header) = check_framing(bytes) {
        assert!(header.batch_length as usize >= BATCH_HEADER_SIZE);
        assert!(header.batch_length as usize <= bytes.len());
        assert!(header.record_count >= 1);
    }
    let validated = validate_batch(bytes, records_max);
    if let Ok(header) = &validated {
        assert_eq!(header.batch_length as usize, bytes.len());
        assert!(header.record_count <= records_max);
    }
    let mut records = Vec::new();
    let decoded = decode_records(&Bytes::copy_from_slice(bytes), 0, &mut records);
    if let Ok(header) = validated {
        // validate_batch checks what a producer sent, before the broker stamps the base
        // offset; only the reader sees offsets that do not fit in 64 bits.
        let last_delta = u64::from(header.record_count - 1);
        if header.base_offset.checked_add(last_delta).is_none() {
            assert!(
                matches!(decoded, Err(BatchError::OffsetOverflow { .. })),
                "{decoded:?}"
            );
            return;
        }
        decoded.expect("a valid batch decodes");
        assert_eq!(records.len(), header.record_count as usize);
        for (index, record) in records.iter().enumerate() {
            assert_eq!(
                Some(record.offset),
                header.base_offset.checked_add(index as u64)
            );
        }
    }
}

/// Makes the CRC right, so the checks behind it see the bytes too.
fn fix_crc(bytes: &mut [u8]) {
    if bytes.len() < BATCH_HEADER_SIZE {
        return;
    }
    let length = (u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize)
        .clamp(BATCH_CRC_START, bytes.len());
    let crc = compute_crc(&bytes[..length]);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
}

// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn frame_header_of_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..40),
        body_length_max in any::<u32>(),
        version_ok in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if version_ok && bytes.len() > 4 {
            bytes[4] = PROTOCOL_VERSION;
        }
        match decode_frame_header(&bytes, body_length_max) {
            Ok(Decoded::Incomplete { need }) => {
                prop_assert!(bytes.len() < FRAME_HEADER_SIZE);
                prop_assert_eq!(need, FRAME_HEADER_SIZE);
            }
            Ok(Decoded::Complete(header)) => {
                prop_assert_eq!(header.version, PROTOCOL_VERSION);
                prop_assert!(header.body_length <= body_length_max);
                prop_assert_eq!(&header.body_length.to_le_bytes()[..], &bytes[0..4]);
                prop_assert_eq!(header.opcode, bytes[5]);
                prop_assert_eq!(Some(header.correlation_id), peek_correlation_id(&bytes));
            }
            Err(ProtocolError::UnsupportedVersion { version }) => prop_assert_eq!(version, bytes[4]),
            Err(ProtocolError::FrameTooLarge { body_length, .. }) => prop_assert!(body_length > body_length_max),
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
    }

    #[test]
    fn request_decoders_on_arbitrary_bytes(
        opcode in 0u8..19,
        body in proptest::collection::vec(any::<u8>(), 0..96),
        topics_max in 0u32..4,
        partitions_max in 0u32..6,
    ) {
        decode_request_bytes(opcode, &body, &DecodeLimits::default());
        decode_request_bytes(opcode, &body, &DecodeLimits {
            topics_per_request_max: topics_max,
            partitions_per_request_max: partitions_max,
        });
    }

    /// Arbitrary bytes rarely get past the first count; mutating a valid request reaches
    /// the decoders' later branches.
    #[test]
    fn request_decoders_on_mutated_requests(
        request in request(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut out = BytesMut::new();
        request.encode(1, &mut out);
        let mut body = out[FRAME_HEADER_SIZE..].to_vec();
        if !body.is_empty() {
            for (at, byte) in &flips {
                let at = at.index(body.len());
                body[at] = *byte;
            }
        }
        let opcode = request.opcode() as u8;
        decode_request_bytes(opcode, &body, &DecodeLimits::default());
        let cut = cut.index(body.len() + 1);
        decode_request_bytes(opcode, &body[..cut], &DecodeLimits::default());
    }

    #[test]
    fn requests_roundtrip(request in request(), correlation_id in any::<u64>()) {
        let mut out = BytesMut::new();
        request.encode(correlation_id, &mut out);
        let Ok(Decoded::Complete(header)) = decode_frame_header(&out, u32::MAX) else {
            panic!("a whole encoded frame has a header");
        };
        prop_assert_eq!(header.correlation_id, correlation_id);
        prop_assert_eq!(header.frame_length(), out.len());
        prop_assert!(!header.is_response());
        let opcode = Opcode::from_wire(header.opcode).expect("encoded opcode is known");
        let decoded = Request::decode(opcode, body_of(&out), &DecodeLimits::default())
            .expect("a valid request decodes");
        prop_assert_eq!(decoded, request);
    }

    #[test]
    fn response_decoders_on_arbitrary_bytes(
        opcode in 0u8..19,
        body in proptest::collection::vec(any::<u8>(), 0..96),
        success in any::<bool>(),
    ) {
        let mut body = body;
        // Half the inputs open with a success status, so the bodies get decoded.
        if success && body.len() >= 4 {
            body[..4].copy_from_slice(&[0, 0, 0, 0]);
        }
        decode_response_bytes(opcode, &body);
    }

    #[test]
    fn response_decoders_on_mutated_responses(
        (opcode, response) in response(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut out = BytesMut::new();
        encode_response(&mut out, opcode, 1, Ok(&response));
        let mut body = out[FRAME_HEADER_SIZE..].to_vec();
        for (at, byte) in &flips {
            let at = at.index(body.len());
            body[at] = *byte;
        }
        decode_response_bytes(opcode as u8, &body);
        let cut = cut.index(body.len() + 1);
        decode_response_bytes(opcode as u8, &body[..cut]);
    }

    #[test]
    fn responses_roundtrip(
        (opcode, response) in response(),
        refusal in proptest::option::of(wire_error()),
        correlation_id in any::<u64>(),
    ) {
        let sent = match &refusal {
            None => Ok(&response),
            Some(error) => Err(error),
        };
        let mut out = BytesMut::new();
        encode_response(&mut out, opcode, correlation_id, sent);
        let Ok(Decoded::Complete(header)) = decode_frame_header(&out, u32::MAX) else {
            panic!("a whole encoded frame has a header");
        };
        prop_assert!(header.is_response());
        prop_assert_eq!(header.frame_length(), out.len());
        let decoded = decode_response(opcode, body_of(&out)).expect("a valid response decodes");
        prop_assert_eq!(decoded, sent.cloned().map_err(Clone::clone));
        // The vectored form is the same bytes.
        let parts = encode_response_parts(opcode, correlation_id, sent);
        prop_assert_eq!(parts.concat(), out.to_vec());
    }

    #[test]
    fn batch_checks_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        records_max in 0u32..8,
        crc_right in any::<bool>(),
        magic_right in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if bytes.len() >= BATCH_HEADER_SIZE {
            if magic_right {
                bytes[24] = 2;
            }
            if crc_right {
                fix_crc(&mut bytes);
            }
        }
        check_batch_bytes(&bytes, records_max);
    }

    #[test]
    fn batch_checks_on_mutated_batches(
        batch in batch(),
        // The broker's field, outside the CRC: any value a damaged disk or a broker sends.
        base_offset in prop_oneof![any::<u64>(), u64::MAX - 8..=u64::MAX],
        append_time_ms in any::<i64>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = batch.to_vec();
        stamp_batch(&mut bytes, base_offset, append_time_ms);
        for (at, byte) in &flips {
            let at = at.index(bytes.len());
            bytes[at] = *byte;
        }
        fix_crc(&mut bytes);
        check_batch_bytes(&bytes, 8);
        let cut = cut.index(bytes.len() + 1);
        check_batch_bytes(&bytes[..cut], 8);
    }

    #[test]
    fn batches_roundtrip(
        records in proptest::collection::vec(record_spec(), 1..6),
        producer in proptest::option::of((1u64.., any::<u64>())),
        base_offset in 0u64..1 << 62,
        from_offset_delta in 0u64..8,
    ) {
        let mut bytes = build_batch(&records, producer).to_vec();
        stamp_batch(&mut bytes, base_offset, 1);
        let header = validate_batch(&bytes, records.len() as u32).expect("a built batch is valid");
        prop_assert_eq!(header.record_count as usize, records.len());
        prop_assert_eq!(header.base_offset, base_offset);
        prop_assert_eq!(header.producer_id, producer.map_or(0, |(id, _)| id));
        let mut decoded = Vec::new();
        let from_offset = base_offset + from_offset_delta;
        decode_records(&Bytes::from(bytes), from_offset, &mut decoded).expect("decodes");
        let first_timestamp_ms = records[0].0;
        let expected: Vec<Record> = records
            .iter()
            .enumerate()
            .map(|(index, (timestamp_ms, key, value, headers))| Record {
                offset: base_offset + index as u64,
                // Deltas are u32: the builder clamps later times to first + u32::MAX.
                timestamp_ms: (*timestamp_ms)
                    .clamp(first_timestamp_ms, first_timestamp_ms + i64::from(u32::MAX)),
                key: key.clone().map(Bytes::from),
                value: Bytes::from(value.clone()),
                headers: headers
                    .iter()
                    .map(|(name, value)| (name.clone(), Bytes::from(value.clone())))
                    .collect(),
            })
            .filter(|record| record.offset >= from_offset)
            .collect();
        prop_assert_eq!(decoded, expected);
    }
}

/// Writes encoded example frames and batches as the fuzz targets' seed corpora:
/// `cargo test --test protocol_properties -- --ignored dump_fuzz_seeds`
/// (scripts/fuzz.sh runs it when a corpus is missing).
#[test]
#[ignore = "writes fuzz/corpus/; run by scripts/fuzz.sh"]
fn dump_fuzz_seeds() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let write = |target: &str, name: String, bytes: &[u8]| {
        let directory = root.join(target);
        std::fs::create_dir_all(&directory).expect("create corpus directory");
        std::fs::write(directory.join(name), bytes).expect("write seed");
    };
    let seed = [7u8; 32];
    println!("seed corpus from proptest with fixed seed {seed:?}");
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &seed),
    );
    for index in 0..48 {
        let request = request().new_tree(&mut runner).unwrap().current();
        let mut out = BytesMut::new();
        request.encode(index, &mut out);
        // frame_header: the first 4 bytes are the body length limit, then the header.
        let mut input = u32::MAX.to_le_bytes().to_vec();
        input.extend_from_slice(&out[..FRAME_HEADER_SIZE]);
        write("frame_header", format!("request-{index}"), &input);
        // request_decoders: a byte that picks the opcode (`byte % 8 + 1`), then the body.
        let mut input = vec![request.opcode() as u8 - 1];
        input.extend_from_slice(&out[FRAME_HEADER_SIZE..]);
        write("request_decoders", format!("request-{index}"), &input);
        let (opcode, response) = response().new_tree(&mut runner).unwrap().current();
        let mut out = BytesMut::new();
        encode_response(&mut out, opcode, index, Ok(&response));
        let mut input = vec![opcode as u8 - 1];
        input.extend_from_slice(&out[FRAME_HEADER_SIZE..]);
        write("response_decoders", format!("response-{index}"), &input);
        let batch = batch().new_tree(&mut runner).unwrap().current();
        // batch_validation: a control byte (bit 0: fix the CRC; bits 1..4: records_max,
        // here 15), then the batch.
        let mut input = vec![1 | 15 << 1];
        input.extend_from_slice(&batch);
        write("batch_validation", format!("batch-{index}"), &input);
    }
}
