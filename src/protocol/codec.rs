//! Primitive readers and writers for the wire format: fixed-width little-endian integers,
//! length-prefixed strings and byte strings, counted lists.
//!
//! `Reader` walks a `Bytes` so that byte strings (record batches above all) come out as
//! zero-copy slices of the frame the connection read. `Writer` appends to a caller-owned
//! `BytesMut`, so a connection reuses one output buffer for all its responses.

use bytes::{BufMut, Bytes, BytesMut};

use super::ProtocolError;

/// A cursor over one frame body.
pub struct Reader {
    body: Bytes,
    position: usize,
}

impl Reader {
    pub fn new(body: Bytes) -> Reader {
        Reader { body, position: 0 }
    }

    pub fn position(&self) -> usize {
        self.position
    }

    pub fn remaining(&self) -> usize {
        self.body.len() - self.position
    }

    fn take(&mut self, need: usize, field: &'static str) -> Result<&[u8], ProtocolError> {
        let have = self.remaining();
        if have < need {
            return Err(ProtocolError::Truncated {
                field,
                offset: self.position,
                need,
                have,
            });
        }
        let start = self.position;
        self.position += need;
        Ok(&self.body[start..start + need])
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, field)?[0])
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, ProtocolError> {
        let bytes = self.take(2, field)?;
        Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32, ProtocolError> {
        let bytes = self.take(4, field)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("four bytes")))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64, ProtocolError> {
        let bytes = self.take(8, field)?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("eight bytes")))
    }

    pub fn i64(&mut self, field: &'static str) -> Result<i64, ProtocolError> {
        Ok(self.u64(field)? as i64)
    }

    /// A string: `u16` length, then that many bytes of UTF-8.
    pub fn string(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let length = self.u16(field)? as usize;
        let offset = self.position;
        let bytes = self.take(length, field)?;
        match std::str::from_utf8(bytes) {
            Ok(text) => Ok(text.to_owned()),
            Err(source) => Err(ProtocolError::InvalidUtf8 {
                field,
                offset,
                source,
            }),
        }
    }

    /// `length` raw bytes, returned without copying (the caller read the length).
    pub fn take_bytes(
        &mut self,
        length: usize,
        field: &'static str,
    ) -> Result<Bytes, ProtocolError> {
        let start = self.position;
        self.take(length, field)?;
        Ok(self.body.slice(start..start + length))
    }

    /// A byte string: `u32` length, then that many bytes, returned without copying.
    pub fn bytes(&mut self, field: &'static str) -> Result<Bytes, ProtocolError> {
        let length = self.u32(field)? as usize;
        let have = self.remaining();
        if have < length {
            return Err(ProtocolError::Truncated {
                field,
                offset: self.position,
                need: length,
                have,
            });
        }
        let start = self.position;
        self.position += length;
        Ok(self.body.slice(start..start + length))
    }

    /// A list count: `u32`, checked against `count_max` and against the bytes left (every
    /// element takes at least `element_size_min` bytes), so a hostile count cannot make the
    /// decoder reserve memory the frame does not back.
    pub fn count(
        &mut self,
        field: &'static str,
        count_max: u32,
        element_size_min: usize,
    ) -> Result<usize, ProtocolError> {
        let count = self.u32(field)?;
        if count > count_max {
            return Err(ProtocolError::TooMany {
                field,
                count,
                count_max,
            });
        }
        let need = count as usize * element_size_min;
        if need > self.remaining() {
            return Err(ProtocolError::Truncated {
                field,
                offset: self.position,
                need,
                have: self.remaining(),
            });
        }
        Ok(count as usize)
    }

    /// Every body must be consumed exactly: trailing bytes mean the peer and we disagree
    /// about the layout, which is a malformed frame rather than something to ignore.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if self.remaining() != 0 {
            return Err(ProtocolError::TrailingBytes {
                offset: self.position,
                count: self.remaining(),
            });
        }
        Ok(())
    }
}

/// Appends wire values to a caller-owned buffer.
pub struct Writer<'a> {
    pub buffer: &'a mut BytesMut,
}

impl<'a> Writer<'a> {
    pub fn new(buffer: &'a mut BytesMut) -> Writer<'a> {
        Writer { buffer }
    }

    pub fn u8(&mut self, value: u8) {
        self.buffer.put_u8(value);
    }

    pub fn u16(&mut self, value: u16) {
        self.buffer.put_u16_le(value);
    }

    pub fn u32(&mut self, value: u32) {
        self.buffer.put_u32_le(value);
    }

    pub fn u64(&mut self, value: u64) {
        self.buffer.put_u64_le(value);
    }

    pub fn i64(&mut self, value: i64) {
        self.buffer.put_i64_le(value);
    }

    /// Strings longer than `u16::MAX` bytes are a caller bug: every string on the wire is
    /// a name or a message, both validated far below that.
    pub fn string(&mut self, value: &str) {
        let length = u16::try_from(value.len()).expect("wire strings are at most 65535 bytes");
        self.buffer.put_u16_le(length);
        self.buffer.put_slice(value.as_bytes());
    }

    pub fn bytes(&mut self, value: &[u8]) {
        let length = u32::try_from(value.len()).expect("wire byte strings are below 4 GiB");
        self.buffer.put_u32_le(length);
        self.buffer.put_slice(value);
    }

    pub fn count(&mut self, count: usize) {
        self.buffer
            .put_u32_le(u32::try_from(count).expect("wire lists hold below 2^32 entries"));
    }
}
