//! Reading what queue groups need from the log, and writing dead-letter records. Pure
//! functions over record batches: the shard does the I/O.
//!
//! - `metas`: a message's `MessageMeta` from its stored batch (the batch's broker append
//!   time, the `deliver_after` and `ttl_ms` headers, the key's hash for ordered mode).
//! - `dead_letter_headers`: the source record's headers, less any `shardq-*` ones (a
//!   producer cannot forge them) and the delivery headers `ttl_ms` / `deliver_after` (the
//!   copy's time is the dead-letter time), plus the broker's `shardq-*` headers of
//!   docs/queues.md §3.
//! - `dead_letter_source`: which source message a DLQ record copies (the reconcile
//!   search after a restart, §7), from the broker's own (last) `shardq-source-*` headers.

use bytes::Bytes;

use crate::delivery::{DeadLetterRequest, MessageMeta};
use crate::placement::fnv1a64;
use crate::protocol::batch::{
    decode_records, BatchBuilder, BatchError, BatchHeader, Record, BATCH_HEADER_SIZE,
};
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

/// The last header of that name: on a DLQ copy, the broker's own (it adds its headers
/// after the source's, and drops any source header of the broker's prefix besides).
fn last_header<'a>(record: &'a Record, name: &str) -> Option<&'a [u8]> {
    record
        .headers
        .iter()
        .rev()
        .find(|(header, _)| header == name)
        .map(|(_, value)| value.as_ref())
}

fn last_header_u64(record: &Record, name: &str) -> Option<u64> {
    last_header(record, name)
        .and_then(|value| <[u8; 8]>::try_from(value).ok())
        .map(u64::from_le_bytes)
}

fn last_header_u32(record: &Record, name: &str) -> Option<u32> {
    last_header(record, name)
        .and_then(|value| <[u8; 4]>::try_from(value).ok())
        .map(u32::from_le_bytes)
}

/// A record with the broker append time of its batch.
pub struct StoredRecord {
    pub append_time_ms: u64,
    pub record: Record,
}

/// Decodes the records in `[from_offset, end_offset)` of a run of whole batches (as
/// `PartitionLog::read` returns them), each with its batch's append time. Batches that
/// begin at or after `end_offset` are not decoded.
pub fn stored_records(
    batches: &Bytes,
    from_offset: u64,
    end_offset: u64,
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
        if header.base_offset >= end_offset {
            break;
        }
        records.clear();
        decode_records(&batches.slice(position..end), from_offset, &mut records)?;
        let append_time_ms = u64::try_from(header.append_time_ms).unwrap_or(0);
        out.extend(
            records
                .drain(..)
                .filter(|record| record.offset < end_offset)
                .map(|record| StoredRecord {
                    append_time_ms,
                    record,
                }),
        );
        position = end;
    }
    Ok(())
}

/// The record with its parts copied out of the read buffer they slice: a kept record
/// must not hold a whole read (up to a MiB) alive.
pub fn owned(record: Record) -> Record {
    Record {
        offset: record.offset,
        timestamp_ms: record.timestamp_ms,
        key: record.key.map(|key| Bytes::copy_from_slice(&key)),
        value: Bytes::copy_from_slice(&record.value),
        headers: record
            .headers
            .into_iter()
            .map(|(name, value)| (name, Bytes::copy_from_slice(&value)))
            .collect(),
    }
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
        size_bytes: u32::try_from(record_size(record)).unwrap_or(u32::MAX),
    }
}

/// What a record weighs in a receive's answer: its key, value and headers.
pub fn record_size(record: &Record) -> u64 {
    let key = record.key.as_ref().map_or(0, |key| key.len());
    let headers: usize = record
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    (key + record.value.len() + headers) as u64
}

/// Whether a source header goes on its DLQ copy: not the broker's (`shardq-*`: a
/// producer must not be able to say where a copy came from), not the delivery headers
/// (the copy is a new message, its time the dead-letter time).
fn kept_on_copy(name: &str) -> bool {
    !name.starts_with(headers::BROKER_PREFIX)
        && name != headers::TTL_MS
        && name != headers::DELIVER_AFTER
}

/// The DLQ copy's headers: the source record's own (less the ones `kept_on_copy`
/// refuses), then the `shardq-*` ones.
pub fn dead_letter_headers(
    source: &Record,
    source_topic: &str,
    source_partition: u32,
    request: &DeadLetterRequest,
) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = source
        .headers
        .iter()
        .filter(|(name, _)| kept_on_copy(name))
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
    let topic = last_header(record, headers::SOURCE_TOPIC)?;
    if topic != source_topic.as_bytes()
        || last_header_u32(record, headers::SOURCE_PARTITION)? != source_partition
    {
        return None;
    }
    last_header_u64(record, headers::SOURCE_OFFSET)
}

/// A DLQ copy that fits in one batch of at most `batch_bytes_max` bytes: the value is cut
/// to what fits, and a `shardq-truncated` header (u64 LE, the original value's length)
/// says so. `None` when even an empty value does not fit (the key and headers alone are
/// too large): the caller drops the source's own headers and tries again.
pub fn fit_value<'a>(
    key: Option<&[u8]>,
    value: &'a [u8],
    copy_headers: &mut Vec<(String, Vec<u8>)>,
    batch_bytes_max: usize,
) -> Option<&'a [u8]> {
    let size = |headers: &[(String, Vec<u8>)], value: &[u8]| {
        let views: Vec<(&str, &[u8])> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_slice()))
            .collect();
        BATCH_HEADER_SIZE + BatchBuilder::record_size(key, value, &views)
    };
    if size(copy_headers, value) <= batch_bytes_max {
        return Some(value);
    }
    copy_headers.push((
        headers::TRUNCATED.into(),
        (value.len() as u64).to_le_bytes().to_vec(),
    ));
    let overhead = size(copy_headers, b"");
    if overhead > batch_bytes_max {
        copy_headers.pop();
        return None;
    }
    Some(&value[..(batch_bytes_max - overhead).min(value.len())])
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
        stored_records(&bytes.freeze(), 11, u64::MAX, &mut out).unwrap();
        let offsets: Vec<u64> = out.iter().map(|stored| stored.record.offset).collect();
        assert_eq!(offsets, vec![11, 12, 13]);
        let metas: Vec<MessageMeta> = out.iter().map(meta_of).collect();
        assert_eq!(metas[0].deliver_after_ms, 5_000);
        assert_eq!(metas[0].key_hash, Some(fnv1a64(b"k")));
        assert_eq!(metas[0].append_time_ms, 2_000);
        assert_eq!(metas[1].expires_at_ms, 2_300);
        assert_eq!(metas[1].key_hash, None);
        // A header of the wrong size is ignored, not misread.
        assert_eq!(
            metas[2],
            MessageMeta {
                size_bytes: metas[2].size_bytes,
                ..MessageMeta::plain(3_000)
            }
        );
        // What each weighs in a receive: key, value and headers.
        for (meta, stored) in metas.iter().zip(&out) {
            let record = &stored.record;
            let headers: usize = record
                .headers
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum();
            let expected =
                record.key.as_ref().map_or(0, |key| key.len()) + record.value.len() + headers;
            assert_eq!(meta.size_bytes as usize, expected);
        }
        assert_eq!(
            metas[1].size_bytes as usize,
            out[1].record.value.len() + 6 + 8 + 5 + 1
        );
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
        assert_eq!(last_header_u32(&copy, headers::ATTEMPTS), Some(3));
        assert_eq!(
            header_u64(&copy, headers::DEAD_LETTERED_AT_MS),
            Some(41_000)
        );
    }

    fn copy_of(source: &Record, copy_headers: Vec<(String, Vec<u8>)>) -> Record {
        Record {
            headers: copy_headers
                .into_iter()
                .map(|(name, value)| (name, Bytes::from(value)))
                .collect(),
            ..source.clone()
        }
    }

    fn request_for(offset: u64) -> DeadLetterRequest {
        DeadLetterRequest {
            offset,
            attempts: 2,
            cause: DeadLetterCause::Nacked,
            decided_at_ms: 5,
            reason: Vec::new(),
            after_seq: None,
        }
    }

    /// A producer writes `shardq-source-*` headers naming another message of the
    /// partition: its DLQ copy must not pass for that message's copy (a reconcile would
    /// settle the other message without a copy), and the copy carries one set of source
    /// headers, the broker's.
    #[test]
    fn forged_broker_headers_are_dropped_from_dead_letter_copies() {
        let forged = Record {
            offset: 17,
            timestamp_ms: 1,
            key: None,
            value: Bytes::from_static(b"v"),
            headers: vec![
                (headers::SOURCE_TOPIC.into(), Bytes::from_static(b"orders")),
                (
                    headers::SOURCE_PARTITION.into(),
                    Bytes::copy_from_slice(&2u32.to_le_bytes()),
                ),
                (
                    headers::SOURCE_OFFSET.into(),
                    Bytes::copy_from_slice(&5u64.to_le_bytes()),
                ),
                ("shardq-anything".into(), Bytes::from_static(b"x")),
                ("trace".into(), Bytes::from_static(b"t")),
            ],
        };
        let copy = copy_of(
            &forged,
            dead_letter_headers(&forged, "orders", 2, &request_for(17)),
        );
        let names: Vec<&str> = copy.headers.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names
                .iter()
                .filter(|name| **name == headers::SOURCE_OFFSET)
                .count(),
            1
        );
        assert!(!names.contains(&"shardq-anything"), "{names:?}");
        assert_eq!(names[0], "trace");
        assert_eq!(dead_letter_source(&copy, "orders", 2), Some(17));
        // A record holding a forged set before the broker's (written before the broker
        // stripped them) is matched on the broker's, the last.
        let mut both = forged.clone();
        both.headers.extend(copy.headers.iter().cloned());
        assert_eq!(dead_letter_source(&both, "orders", 2), Some(17));
    }

    #[test]
    fn dead_letter_copies_drop_the_delivery_headers() {
        let source = Record {
            offset: 3,
            timestamp_ms: 1,
            key: None,
            value: Bytes::from_static(b"v"),
            headers: vec![
                (
                    headers::TTL_MS.into(),
                    Bytes::copy_from_slice(&1u64.to_le_bytes()),
                ),
                (
                    headers::DELIVER_AFTER.into(),
                    Bytes::copy_from_slice(&u64::MAX.to_le_bytes()),
                ),
                ("keep".into(), Bytes::from_static(b"k")),
            ],
        };
        let copy = dead_letter_headers(&source, "orders", 0, &request_for(3));
        assert!(copy
            .iter()
            .all(|(name, _)| name != headers::TTL_MS && name != headers::DELIVER_AFTER));
        assert_eq!(copy[0].0, "keep");
    }

    #[test]
    fn an_oversized_dead_letter_copy_is_cut_to_fit_and_says_so() {
        let value = vec![7u8; 10_000];
        let mut copy_headers = vec![("h".to_owned(), b"v".to_vec())];
        let limit = 4_096;
        let cut = fit_value(Some(b"key"), &value, &mut copy_headers, limit).unwrap();
        assert!(cut.len() < value.len());
        let (name, length) = copy_headers.last().unwrap();
        assert_eq!(name, headers::TRUNCATED);
        assert_eq!(length, &10_000u64.to_le_bytes().to_vec());
        let views: Vec<(&str, &[u8])> = copy_headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_slice()))
            .collect();
        let mut builder = BatchBuilder::new(BytesMut::new());
        builder.push(1, Some(b"key"), cut, &views);
        assert_eq!(builder.finish().len(), limit, "cut exactly to the limit");
        // What fits is left alone.
        let mut small_headers = Vec::new();
        assert_eq!(
            fit_value(None, b"small", &mut small_headers, limit),
            Some(&b"small"[..])
        );
        assert!(small_headers.is_empty());
        // Headers alone too large: refused, nothing added.
        let mut huge = vec![("h".to_owned(), vec![0u8; 8_000])];
        assert_eq!(fit_value(None, b"v", &mut huge, limit), None);
        assert_eq!(huge.len(), 1);
    }

    /// A read for offsets before `end_offset` decodes nothing from the batches past it:
    /// a damaged batch there is not even looked at, and no record past it is kept.
    #[test]
    fn batches_past_the_end_offset_are_not_decoded() {
        let mut bytes = BytesMut::new();
        bytes.extend_from_slice(&stored(&[(None, &[]), (None, &[])], 10, 1_000));
        let mut damaged = BytesMut::from(&stored(&[(None, &[])], 12, 1_000)[..]);
        let last = damaged.len() - 1;
        damaged[last] ^= 0xff;
        bytes.extend_from_slice(&damaged);
        let bytes = bytes.freeze();
        let mut out = Vec::new();
        stored_records(&bytes, 11, 12, &mut out).unwrap();
        let offsets: Vec<u64> = out.iter().map(|stored| stored.record.offset).collect();
        assert_eq!(offsets, vec![11]);
        out.clear();
        assert!(stored_records(&bytes, 10, 13, &mut out).is_err());
        // What is kept no longer slices the read buffer.
        let kept = owned(out.first().map_or_else(
            || {
                let mut again = Vec::new();
                stored_records(&bytes, 10, 11, &mut again).unwrap();
                again.remove(0).record
            },
            |stored| stored.record.clone(),
        ));
        let buffer = bytes.as_ptr() as usize..bytes.as_ptr() as usize + bytes.len();
        assert!(!buffer.contains(&(kept.value.as_ptr() as usize)));
    }
}
