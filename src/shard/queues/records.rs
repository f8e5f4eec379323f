//! Reading what queue groups need from the log, and writing dead-letter records. Pure
//! functions over record batches: the shard does the I/O.
//!
//! - `metas`: a message's `MessageMeta` from its stored batch (the batch's broker append
//!   time, the `deliver_after` and `ttl_ms` headers, the key's hash for ordered mode).
//! - `dead_letter_headers`: the source record's headers plus the `shardq-*` headers of
//!   docs/queues.md §3.
//! - `dead_letter_source`: which source message a DLQ record copies (the reconcile
//!   search after a restart, §7).

use bytes::Bytes;

use crate::delivery::{DeadLetterRequest, MessageMeta};
use crate::placement::fnv1a64;
use crate::protocol::batch::{decode_records, BatchError, BatchHeader, Record, BATCH_HEADER_SIZE};
use crate::protocol::queue::headers;

/// A header value holding a u64 little-endian, if it is exactly that.
fn header_u64(record: &Record, name: &str) -> Option<u64> {
    record
        .headers
        .iter()
        .find(|(header, _)| header == name)
        .and_then(|(_, value)| <[u8; 8]>::try_from(value.as_ref()).ok())
        .map(u64::from_le_bytes)
}

fn header_u32(record: &Record, name: &str) -> Option<u32> {
    record
        .headers
        .iter()
        .find(|(header, _)| header == name)
        .and_then(|(_, value)| <[u8; 4]>::try_from(value.as_ref()).ok())
        .map(u32::from_le_bytes)
}

/// A record with the broker append time of its batch.
pub struct StoredRecord {
    pub append_time_ms: u64,
    pub record: Record,
}

/// Decodes the records at or after `from_offset` of a run of whole batches (as
/// `PartitionLog::read` returns them), each with its batch's append time.
pub fn stored_records(
    batches: &Bytes,
    from_offset: u64,
    out: &mut Vec<StoredRecord>,
) -> Result<(), BatchError> {
    let mut position = 0;
    let mut records = Vec::new();
    while position + BATCH_HEADER_SIZE <= batches.len() {
        let header = BatchHeader::read(&batches[position..]).expect("a whole header");
        let end = position + header.batch_length as usize;
        if header.batch_length as usize <= BATCH_HEADER_SIZE || end > batches.len() {
            break;
        }
        records.clear();
        decode_records(&batches.slice(position..end), from_offset, &mut records)?;
        let append_time_ms = u64::try_from(header.append_time_ms).unwrap_or(0);
        out.extend(records.drain(..).map(|record| StoredRecord {
            append_time_ms,
            record,
        }));
        position = end;
    }
    Ok(())
}

/// What a queue group needs to know of a stored message.
pub fn meta_of(stored: &StoredRecord) -> MessageMeta {
    let record = &stored.record;
    let append_time_ms = stored.append_time_ms;
    MessageMeta {
        append_time_ms,
        deliver_after_ms: header_u64(record, headers::DELIVER_AFTER).unwrap_or(0),
        expires_at_ms: header_u64(record, headers::TTL_MS)
            .map_or(u64::MAX, |ttl_ms| append_time_ms.saturating_add(ttl_ms)),
        key_hash: record.key.as_deref().map(fnv1a64),
    }
}

/// The DLQ copy's headers: the source record's own, then the `shardq-*` ones.
pub fn dead_letter_headers(
    source: &Record,
    source_topic: &str,
    source_partition: u32,
    request: &DeadLetterRequest,
) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = source
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), value.to_vec()))
        .collect();
    out.push((
        headers::SOURCE_TOPIC.into(),
        source_topic.as_bytes().to_vec(),
    ));
    out.push((
        headers::SOURCE_PARTITION.into(),
        source_partition.to_le_bytes().to_vec(),
    ));
    out.push((
        headers::SOURCE_OFFSET.into(),
        request.offset.to_le_bytes().to_vec(),
    ));
    out.push((
        headers::ATTEMPTS.into(),
        request.attempts.to_le_bytes().to_vec(),
    ));
    out.push((
        headers::DEAD_LETTER_CAUSE.into(),
        request.cause.as_str().as_bytes().to_vec(),
    ));
    out.push((headers::REASON.into(), request.reason.clone()));
    out.push((
        headers::DEAD_LETTERED_AT_MS.into(),
        request.decided_at_ms.to_le_bytes().to_vec(),
    ));
    out
}

/// The source offset a DLQ record copies, if it copies a message of
/// (`source_topic`, `source_partition`).
pub fn dead_letter_source(
    record: &Record,
    source_topic: &str,
    source_partition: u32,
) -> Option<u64> {
    let topic = record
        .headers
        .iter()
        .find(|(name, _)| name == headers::SOURCE_TOPIC)?;
    if topic.1.as_ref() != source_topic.as_bytes()
        || header_u32(record, headers::SOURCE_PARTITION)? != source_partition
    {
        return None;
    }
    header_u64(record, headers::SOURCE_OFFSET)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::DeadLetterCause;
    use crate::protocol::batch::{stamp_batch, BatchBuilder};
    use bytes::BytesMut;

    /// A record's key and headers.
    type Shape<'a> = (Option<&'a [u8]>, &'a [(&'a str, &'a [u8])]);

    fn stored(records: &[Shape<'_>], base: u64, append_ms: i64) -> Bytes {
        let mut builder = BatchBuilder::new(BytesMut::new());
        for (key, record_headers) in records {
            builder.push(1_000, *key, b"v", record_headers);
        }
        let mut batch = BytesMut::from(&builder.finish()[..]);
        stamp_batch(&mut batch, base, append_ms);
        batch.freeze()
    }

    #[test]
    fn metas_come_from_the_append_time_and_the_headers() {
        let after = 5_000u64.to_le_bytes();
        let ttl = 300u64.to_le_bytes();
        let mut bytes = BytesMut::new();
        bytes.extend_from_slice(&stored(
            &[
                (None, &[]),
                (Some(b"k"), &[(headers::DELIVER_AFTER, &after)]),
                (None, &[(headers::TTL_MS, &ttl), ("other", b"x")]),
            ],
            10,
            2_000,
        ));
        bytes.extend_from_slice(&stored(&[(None, &[(headers::TTL_MS, b"bad")])], 13, 3_000));
        let mut out = Vec::new();
        stored_records(&bytes.freeze(), 11, &mut out).unwrap();
        let offsets: Vec<u64> = out.iter().map(|stored| stored.record.offset).collect();
        assert_eq!(offsets, vec![11, 12, 13]);
        let metas: Vec<MessageMeta> = out.iter().map(meta_of).collect();
        assert_eq!(metas[0].deliver_after_ms, 5_000);
        assert_eq!(metas[0].key_hash, Some(fnv1a64(b"k")));
        assert_eq!(metas[0].append_time_ms, 2_000);
        assert_eq!(metas[1].expires_at_ms, 2_300);
        assert_eq!(metas[1].key_hash, None);
        // A header of the wrong size is ignored, not misread.
        assert_eq!(metas[2], MessageMeta::plain(3_000));
    }

    #[test]
    fn dead_letter_records_name_their_source() {
        let source = Record {
            offset: 17,
            timestamp_ms: 1,
            key: None,
            value: Bytes::from_static(b"v"),
            headers: vec![("trace".into(), Bytes::from_static(b"t"))],
        };
        let request = DeadLetterRequest {
            offset: 17,
            attempts: 3,
            cause: DeadLetterCause::Nacked,
            decided_at_ms: 41_000,
            reason: b"bad payload".to_vec(),
            after_seq: Some(9),
        };
        let headers_out = dead_letter_headers(&source, "orders", 2, &request);
        assert_eq!(headers_out[0], ("trace".into(), b"t".to_vec()));
        let copy = Record {
            headers: headers_out
                .into_iter()
                .map(|(name, value)| (name, Bytes::from(value)))
                .collect(),
            ..source
        };
        assert_eq!(dead_letter_source(&copy, "orders", 2), Some(17));
        assert_eq!(dead_letter_source(&copy, "orders", 3), None);
        assert_eq!(dead_letter_source(&copy, "order", 2), None);
        assert_eq!(header_u32(&copy, headers::ATTEMPTS), Some(3));
        assert_eq!(
            header_u64(&copy, headers::DEAD_LETTERED_AT_MS),
            Some(41_000)
        );
    }
}
