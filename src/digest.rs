//! Per-chunk content digests: BLAKE3 of each chunk of a source file, recorded at populate time and
//! checked on every fetch, so that a backend that returns the wrong bytes (corruption, a replaced
//! object, a bug) fails the access with EIO instead of writing them into the stub.
//!
//! The list of a file's digests can be larger than an ext4 inode's xattr space, so it lives in the
//! store (`.hsm/digests/<hex>`), content-addressed: its name is the BLAKE3 of its contents, and
//! that hash is in the file's source record. A list that does not hash to its name is corrupt.

use std::io;
use std::path::{Path, PathBuf};

use crate::record::SourceRecord;

pub type Digest = [u8; 32];

pub fn hex(h: &Digest) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn list_path(digest_dir: &Path, list_hash: &Digest) -> PathBuf {
    digest_dir.join(hex(list_hash))
}

/// Store a digest list; returns the hash that names it.
pub fn write_list(digest_dir: &Path, digests: &[Digest]) -> io::Result<Digest> {
    let bytes: Vec<u8> = digests.concat();
    let hash = *blake3::hash(&bytes).as_bytes();
    let path = list_path(digest_dir, &hash);
    if !path.exists() {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(hash)
}

/// Load and check the digest list of `source`, if it has one.
pub fn load_list(digest_dir: &Path, source: &SourceRecord) -> io::Result<Option<Vec<Digest>>> {
    let Some(hash) = source.digests else {
        return Ok(None);
    };
    let bytes = std::fs::read(list_path(digest_dir, &hash))?;
    if blake3::hash(&bytes).as_bytes() != &hash {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "digest list does not match its hash",
        ));
    }
    if bytes.len() as u64 != source.chunks() * 32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "digest list has the wrong length",
        ));
    }
    Ok(Some(
        bytes
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect(),
    ))
}

pub fn chunk_digest(data: &[u8]) -> Digest {
    *blake3::hash(data).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::StubKind;

    #[test]
    fn list_round_trip_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let digests = vec![chunk_digest(b"a"), chunk_digest(b"b")];
        let hash = write_list(dir.path(), &digests).unwrap();
        let src = SourceRecord {
            key: b"f".to_vec(),
            size: 8192 + 1,
            mtime: (0, 0),
            version: None,
            chunk_size: 8192,
            kind: StubKind::Sparse,
            digests: Some(hash),
        };
        assert_eq!(load_list(dir.path(), &src).unwrap(), Some(digests));
        std::fs::write(list_path(dir.path(), &hash), [0u8; 64]).unwrap();
        assert!(load_list(dir.path(), &src).is_err());
    }
}
