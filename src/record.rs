//! Per-file records, kept as `trusted.*` extended attributes on each stub.
//!
//! Why xattrs: they travel with the inode (a rename keeps them, a restart finds them, no database
//! can drift from the tree), and the `trusted.` namespace needs CAP_SYS_ADMIN to read or write, so
//! a user who owns a stub cannot point it at another object or claim ranges present. Each record
//! carries a checksum; one that fails it is corrupt and the file is served with EIO, never followed.
//!
//! Two records per stub: `source` (written once by `populate`: where the content lives and what it
//! must look like) and `state` (rewritten by the daemon: which ranges are present).

use std::ffi::CStr;
use std::os::fd::BorrowedFd;

use serde::{Deserialize, Serialize};

use crate::ranges::RangeSet;

pub const XATTR_SOURCE: &CStr = c"trusted.hsm.source";
pub const XATTR_STATE: &CStr = c"trusted.hsm.state";

const MAGIC_SOURCE: &[u8; 4] = b"HSs1";
const MAGIC_STATE: &[u8; 4] = b"HSt1";
const SUM_LEN: usize = 8;

/// How a stub was made, which decides how it is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StubKind {
    /// A sparse file: fetched whole when opened (other than for exec), so that no copy tool can
    /// see its holes before they are filled.
    Sparse,
    /// Built from reflinked zero blocks: reads as data to every tool, so it is filled range by range.
    Cloned,
    /// A sparse file filled range by range, by the user's choice (ext4 `--lazy-sparse`): copy
    /// tools that trust `SEEK_DATA` see its unfetched ranges as holes.
    SparseLazy,
}

/// Where a stub's content lives and what it must look like there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// Object key relative to the store's source root (bytes: names need not be UTF-8).
    pub key: Vec<u8>,
    pub size: u64,
    /// Source mtime, seconds and nanoseconds.
    pub mtime: (i64, u32),
    /// Backend object identity (ETag or version), when the backend has one.
    pub version: Option<String>,
    pub chunk_size: u32,
    pub kind: StubKind,
    /// BLAKE3 of the file that lists one BLAKE3 digest per chunk (in the store's `.hsm/digests/`,
    /// named by this hash): when present, every fetched chunk is checked before it is written.
    pub digests: Option<[u8; 32]>,
}

/// What the daemon has filled in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    /// Bytes `[0, backed_len)` come from the source; beyond, the file is the user's own (it was
    /// truncated and maybe extended locally). Only ever shrinks.
    pub backed_len: u64,
    /// Ranges that hold the source's bytes (or the user's writes over them), durable on disk.
    pub present: RangeSet,
    /// The file was changed locally; it is never refetched over.
    pub modified: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record has the wrong magic or version")]
    Magic,
    #[error("record checksum mismatch (corrupt or hand-edited)")]
    Checksum,
    #[error("record does not decode: {0}")]
    Decode(String),
    #[error("record is inconsistent: {0}")]
    Invalid(&'static str),
}

fn seal(magic: &[u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + payload.len() + SUM_LEN);
    out.extend_from_slice(magic);
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(&sum.as_bytes()[..SUM_LEN]);
    out
}

fn unseal<'a>(magic: &[u8; 4], bytes: &'a [u8]) -> Result<&'a [u8], RecordError> {
    if bytes.len() < 4 + SUM_LEN || &bytes[..4] != magic {
        return Err(RecordError::Magic);
    }
    let (body, sum) = bytes.split_at(bytes.len() - SUM_LEN);
    if &blake3::hash(body).as_bytes()[..SUM_LEN] != sum {
        return Err(RecordError::Checksum);
    }
    Ok(&body[4..])
}

impl SourceRecord {
    pub fn encode(&self) -> Vec<u8> {
        seal(
            MAGIC_SOURCE,
            &postcard::to_allocvec(self).expect("serialising to a Vec cannot fail"),
        )
    }

    pub fn decode(bytes: &[u8]) -> Result<SourceRecord, RecordError> {
        let rec: SourceRecord = postcard::from_bytes(unseal(MAGIC_SOURCE, bytes)?)
            .map_err(|e| RecordError::Decode(e.to_string()))?;
        if rec.chunk_size == 0 || !rec.chunk_size.is_multiple_of(4096) {
            return Err(RecordError::Invalid("chunk size is not a multiple of 4096"));
        }
        if rec.key.is_empty() {
            return Err(RecordError::Invalid("empty source key"));
        }
        Ok(rec)
    }

    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size as u64)
    }

    pub fn fresh_state(&self) -> StateRecord {
        StateRecord {
            backed_len: self.size,
            present: RangeSet::new(),
            modified: false,
        }
    }
}

impl StateRecord {
    pub fn encode(&self) -> Vec<u8> {
        seal(
            MAGIC_STATE,
            &postcard::to_allocvec(self).expect("serialising to a Vec cannot fail"),
        )
    }

    /// Decode and check against the source record it belongs to.
    pub fn decode(bytes: &[u8], source: &SourceRecord) -> Result<StateRecord, RecordError> {
        let rec = StateRecord::decode_alone(bytes)?;
        if rec.backed_len > source.size {
            return Err(RecordError::Invalid("backed length beyond the source size"));
        }
        Ok(rec)
    }

    /// Decode and check what can be checked without the source record.
    pub fn decode_alone(bytes: &[u8]) -> Result<StateRecord, RecordError> {
        let rec: StateRecord = postcard::from_bytes(unseal(MAGIC_STATE, bytes)?)
            .map_err(|e| RecordError::Decode(e.to_string()))?;
        let Some(present) = RangeSet::from_pairs(rec.present.pairs()) else {
            return Err(RecordError::Invalid("empty or reversed present range"));
        };
        if present.pairs() != rec.present.pairs() {
            return Err(RecordError::Invalid(
                "present ranges not in canonical order",
            ));
        }
        Ok(rec)
    }

    /// The file was changed locally: the record says so, or its size or mtime (`size`, `mtime`:
    /// the file's now) is no longer the source's. Its only copy is here.
    pub fn changed_locally(&self, source: &SourceRecord, size: u64, mtime: (i64, u32)) -> bool {
        self.modified
            || self.backed_len != source.size
            || size != source.size
            || mtime != source.mtime
    }

    /// Every byte that must come from the source is here.
    pub fn is_complete(&self) -> bool {
        self.present.contains(0, self.backed_len)
    }

    /// Bytes present out of those that come from the source.
    pub fn present_bytes(&self) -> u64 {
        self.present.covered(self.backed_len)
    }
}

/// Whether the file behind `fd` is a stub whose state record says every byte from the source
/// is present: records are written only after the bytes are synced, and a complete file never
/// needs a fetch again. One xattr read, for the event path; anything else (no record, a corrupt
/// one, not a stub at all) says no and is left to the engine, which decides and logs why.
pub fn complete_on_disk(fd: BorrowedFd<'_>) -> bool {
    match crate::sys::fs::fgetxattr(fd, XATTR_STATE) {
        Ok(Some(raw)) => StateRecord::decode_alone(&raw).is_ok_and(|s| s.is_complete()),
        _ => false,
    }
}

/// Bytes of the stub behind `fd` that its records say are present; `None` for a file that is
/// not a stub (or whose source record is unreadable). A missing or corrupt state record: none.
pub fn present_on_disk(fd: BorrowedFd<'_>) -> Option<u64> {
    let raw = crate::sys::fs::fgetxattr(fd, XATTR_SOURCE).ok()??;
    let source = SourceRecord::decode(&raw).ok()?;
    Some(match crate::sys::fs::fgetxattr(fd, XATTR_STATE) {
        Ok(Some(raw)) => StateRecord::decode(&raw, &source).map_or(0, |s| s.present_bytes()),
        _ => 0,
    })
}

/// The stub kind of the file behind `fd`, if it has a valid source record.
pub fn stub_kind(fd: BorrowedFd<'_>) -> Option<StubKind> {
    let raw = crate::sys::fs::fgetxattr(fd, XATTR_SOURCE).ok()??;
    SourceRecord::decode(&raw).ok().map(|s| s.kind)
}

/// Whether the file behind `fd` is a stub (has a source record). A file of the store's
/// filesystem without one is the user's own, or the store's internals: no fetch concerns it. An
/// error reading the xattr says yes, so that the engine decides and logs why.
pub fn is_stub(fd: BorrowedFd<'_>) -> bool {
    !matches!(crate::sys::fs::fgetxattr(fd, XATTR_SOURCE), Ok(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> SourceRecord {
        SourceRecord {
            key: b"dir/f\xff".to_vec(),
            size: 10 << 20,
            mtime: (1_700_000_000, 5),
            version: None,
            chunk_size: 1 << 20,
            kind: StubKind::Cloned,
            digests: None,
        }
    }

    #[test]
    fn round_trip_and_tamper_detection() {
        let src = source();
        let bytes = src.encode();
        assert_eq!(SourceRecord::decode(&bytes).unwrap(), src);
        let mut bad = bytes.clone();
        bad[6] ^= 1;
        assert_eq!(SourceRecord::decode(&bad), Err(RecordError::Checksum));
        assert_eq!(SourceRecord::decode(b"HSs1"), Err(RecordError::Magic));

        let mut st = src.fresh_state();
        st.present.insert(0, 1 << 20);
        let enc = st.encode();
        assert_eq!(StateRecord::decode(&enc, &src).unwrap(), st);
        assert!(!st.is_complete());
        st.present.insert(1 << 20, 10 << 20);
        assert!(st.is_complete());
        // A state from a bigger file does not fit this source.
        let mut big = src.fresh_state();
        big.backed_len = src.size + 1;
        assert!(StateRecord::decode(&big.encode(), &src).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = SourceRecord::decode(&bytes);
            let _ = StateRecord::decode(&bytes, &source());
            // Also with a valid seal around arbitrary payloads, so postcard itself is exercised.
            let _ = SourceRecord::decode(&seal(MAGIC_SOURCE, &bytes));
            let _ = StateRecord::decode(&seal(MAGIC_STATE, &bytes), &source());
        }
    }
}
