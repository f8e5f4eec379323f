//! The Stats operation (opcode 18): what each shard and each partition is doing, for
//! `shardq stats` and `shardq topic describe`. docs/protocol.md §12 has the byte layout.
//!
//! Counters count since the broker started (a restart starts them at zero again); rates
//! are the reader's to compute from two answers.

use super::codec::{Reader, Writer};
use super::{read_topic_name, DecodeLimits, ProtocolError};

/// Stats of the topics named, or of every topic when the list is empty. Shards are
/// always reported.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatsRequest {
    pub topics: Vec<String>,
}

/// One shard, as its own connections and executor see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShardStats {
    pub shard: u16,
    pub connections_open: u32,
    /// Requests read whose answer is not written yet.
    pub requests_in_flight: u32,
    /// Bytes of request frames and unwritten responses its connections hold.
    pub bytes_in_flight: u64,
    /// Requests its connections received, and errors answered (a request's, or a
    /// partition's of a produce, fetch or list-offsets).
    pub requests_total: u64,
    pub errors_total: u64,
    /// Time its executor spent running tasks, in milliseconds.
    pub busy_ms: u64,
}

/// One partition: its log on the owning shard, and what every shard fetched from it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionStats {
    pub topic: String,
    pub partition: u32,
    pub shard: u16,
    pub log_start_offset: u64,
    /// One past the last appended offset (durable or not).
    pub log_end_offset: u64,
    /// One past the last durable offset.
    pub high_watermark: u64,
    /// Bytes of batches in its segments.
    pub bytes: u64,
    pub segments: u32,
    pub records_in: u64,
    pub bytes_in: u64,
    pub records_out: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatsResponse {
    pub shards: Vec<ShardStats>,
    /// Ordered by topic, then partition.
    pub partitions: Vec<PartitionStats>,
}

/// Bytes of one encoded `ShardStats`.
const SHARD_STATS_SIZE: usize = 2 + 4 + 4 + 8 + 8 + 8 + 8;
/// Bytes of one encoded `PartitionStats` without its topic name's bytes.
const PARTITION_STATS_SIZE_MIN: usize = 2 + 4 + 2 + 8 * 4 + 4 + 8 * 4;

pub(super) fn encode_request(request: &StatsRequest, writer: &mut Writer<'_>) {
    writer.count(request.topics.len());
    for topic in &request.topics {
        writer.string(topic);
    }
}

pub(super) fn decode_request(
    reader: &mut Reader,
    limits: &DecodeLimits,
) -> Result<StatsRequest, ProtocolError> {
    let count = reader.count("topics", limits.topics_per_request_max, 2)?;
    let mut topics = Vec::with_capacity(count);
    for _ in 0..count {
        topics.push(read_topic_name(reader)?);
    }
    Ok(StatsRequest { topics })
}

pub(super) fn encode_response(response: &StatsResponse, writer: &mut Writer<'_>) {
    writer.count(response.shards.len());
    for shard in &response.shards {
        writer.u16(shard.shard);
        writer.u32(shard.connections_open);
        writer.u32(shard.requests_in_flight);
        writer.u64(shard.bytes_in_flight);
        writer.u64(shard.requests_total);
        writer.u64(shard.errors_total);
        writer.u64(shard.busy_ms);
    }
    writer.count(response.partitions.len());
    for partition in &response.partitions {
        writer.string(&partition.topic);
        writer.u32(partition.partition);
        writer.u16(partition.shard);
        writer.u64(partition.log_start_offset);
        writer.u64(partition.log_end_offset);
        writer.u64(partition.high_watermark);
        writer.u64(partition.bytes);
        writer.u32(partition.segments);
        writer.u64(partition.records_in);
        writer.u64(partition.bytes_in);
        writer.u64(partition.records_out);
        writer.u64(partition.bytes_out);
    }
}

pub(super) fn decode_response(reader: &mut Reader) -> Result<StatsResponse, ProtocolError> {
    let count = reader.count("shards", u32::MAX, SHARD_STATS_SIZE)?;
    let mut shards = Vec::with_capacity(count);
    for _ in 0..count {
        shards.push(ShardStats {
            shard: reader.u16("shard")?,
            connections_open: reader.u32("connections_open")?,
            requests_in_flight: reader.u32("requests_in_flight")?,
            bytes_in_flight: reader.u64("bytes_in_flight")?,
            requests_total: reader.u64("requests_total")?,
            errors_total: reader.u64("errors_total")?,
            busy_ms: reader.u64("busy_ms")?,
        });
    }
    let count = reader.count("partitions", u32::MAX, PARTITION_STATS_SIZE_MIN)?;
    let mut partitions = Vec::with_capacity(count);
    for _ in 0..count {
        partitions.push(PartitionStats {
            topic: reader.string("topic")?,
            partition: reader.u32("partition")?,
            shard: reader.u16("shard")?,
            log_start_offset: reader.u64("log_start_offset")?,
            log_end_offset: reader.u64("log_end_offset")?,
            high_watermark: reader.u64("high_watermark")?,
            bytes: reader.u64("bytes")?,
            segments: reader.u32("segments")?,
            records_in: reader.u64("records_in")?,
            bytes_in: reader.u64("bytes_in")?,
            records_out: reader.u64("records_out")?,
            bytes_out: reader.u64("bytes_out")?,
        });
    }
    Ok(StatsResponse { shards, partitions })
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::protocol::{decode_response, encode_response, Opcode, Request, ResponseBody};

    /// docs/protocol.md §12's example request, byte for byte, read from the document.
    #[test]
    fn documented_request_encodes_as_shown() {
        let mut out = BytesMut::new();
        Request::Stats(StatsRequest {
            topics: vec!["orders".into()],
        })
        .encode(7, &mut out);
        assert_eq!(
            out.to_vec(),
            crate::protocol::protocol_md_example_bytes("Example request frame, correlation id 7"),
            "protocol.md §12"
        );
    }

    #[test]
    fn a_response_round_trips_and_its_sizes_match_the_layout() {
        let response = StatsResponse {
            shards: vec![ShardStats {
                shard: 1,
                connections_open: 2,
                requests_in_flight: 3,
                bytes_in_flight: 4,
                requests_total: 5,
                errors_total: 6,
                busy_ms: 7,
            }],
            partitions: vec![PartitionStats {
                topic: "orders".into(),
                partition: 3,
                shard: 1,
                log_start_offset: 10,
                log_end_offset: 20,
                high_watermark: 19,
                bytes: 4096,
                segments: 2,
                records_in: 20,
                bytes_in: 4096,
                records_out: 40,
                bytes_out: 8192,
            }],
        };
        let mut out = BytesMut::new();
        encode_response(
            &mut out,
            Opcode::Stats,
            9,
            Ok(&ResponseBody::Stats(response.clone())),
        );
        // Header, status (u16 code, empty message), two counts, one shard, one partition.
        let status = 2 + 2;
        assert_eq!(
            out.len(),
            16 + status + 4 + SHARD_STATS_SIZE + 4 + PARTITION_STATS_SIZE_MIN + "orders".len()
        );
        let body = out.split_off(16).freeze();
        let decoded = decode_response(Opcode::Stats, body).expect("decodes");
        assert_eq!(decoded, Ok(ResponseBody::Stats(response)));
    }
}
