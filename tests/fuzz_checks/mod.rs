//! What must hold for every input to the parsers that see outside input, whatever its bytes:
//! no panic, and whatever a parser accepts is well formed and survives a round trip. Shared by
//! the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`, nightly) and the stable property tests
//! (`tests/fuzz_parsers.rs`, run by `cargo test`), so both check exactly the same things.
#![allow(dead_code)]

use hsm::manifest::{self, EntryType};
use hsm::protocol::{EventMsg, ReplyMsg, EVENT_LEN, REPLY_LEN};
use hsm::record::{SourceRecord, StateRecord, StubKind};
use hsm::sys::fanotify::{parse_events, RawEvent, Verdict, FANOTIFY_METADATA_VERSION};

pub const MAGIC_SOURCE: &[u8; 4] = b"HSs1";
pub const MAGIC_STATE: &[u8; 4] = b"HSt1";

/// A record sealed as `hsm::record` seals them (magic, payload, 8 bytes of BLAKE3): arbitrary
/// payloads get past the checksum, so the decoder behind it is exercised too.
pub fn sealed(magic: &[u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(&sum.as_bytes()[..8]);
    out
}

/// Events as the kernel lays them out: metadata, then a range info record for pre-content events.
pub fn encode_events(events: &[RawEvent]) -> Vec<u8> {
    let mut v = Vec::new();
    for e in events {
        let len = if e.range.is_some() { 48u32 } else { 24 };
        v.extend_from_slice(&len.to_ne_bytes());
        v.push(FANOTIFY_METADATA_VERSION);
        v.push(0);
        v.extend_from_slice(&24u16.to_ne_bytes());
        v.extend_from_slice(&e.mask.to_ne_bytes());
        v.extend_from_slice(&e.fd.to_ne_bytes());
        v.extend_from_slice(&e.pid.to_ne_bytes());
        if let Some((off, count)) = e.range {
            v.push(hsm::sys::fanotify::FAN_EVENT_INFO_TYPE_RANGE);
            v.push(0);
            v.extend_from_slice(&24u16.to_ne_bytes());
            v.extend_from_slice(&0u32.to_ne_bytes());
            v.extend_from_slice(&off.to_ne_bytes());
            v.extend_from_slice(&count.to_ne_bytes());
        }
    }
    v
}

/// `parse_events` on any buffer: no panic, never more events than 24-byte records fit, and the
/// events it returns, laid out again by the kernel's rules, parse to the same events.
pub fn check_fanotify(data: &[u8]) {
    let mut out = Vec::new();
    let res = parse_events(data, &mut out);
    assert!(
        out.len() <= data.len() / 24,
        "{} events from {} bytes",
        out.len(),
        data.len()
    );
    if res.is_ok() {
        // Success means every whole record was consumed: at most a partial header is left.
        let consumed: usize = encode_events(&out).len();
        assert!(
            consumed <= data.len(),
            "parsed events need {consumed} bytes, buffer has {}",
            data.len()
        );
    }
    let again_buf = encode_events(&out);
    let mut again = Vec::new();
    parse_events(&again_buf, &mut again).expect("well-formed events parse");
    assert_eq!(again, out);
}

/// `SourceRecord::decode` on any bytes, bare and sealed: what it accepts is valid and round-trips.
pub fn check_source_record(data: &[u8]) {
    for bytes in [data.to_vec(), sealed(MAGIC_SOURCE, data)] {
        if let Ok(rec) = SourceRecord::decode(&bytes) {
            check_valid_source(&rec);
        }
    }
}

pub fn check_valid_source(rec: &SourceRecord) {
    assert!(
        rec.chunk_size >= 4096 && rec.chunk_size.is_multiple_of(4096),
        "accepted chunk size {}",
        rec.chunk_size
    );
    assert!(!rec.key.is_empty(), "accepted an empty key");
    let _ = rec.chunks();
    let enc = rec.encode();
    assert_eq!(SourceRecord::decode(&enc).as_ref(), Ok(rec), "round trip");
    let fresh = rec.fresh_state();
    assert_eq!(
        StateRecord::decode(&fresh.encode(), rec).as_ref(),
        Ok(&fresh),
        "a fresh state fits its source"
    );
}

/// A source record for state records to be checked against; its size comes from the input so
/// that both fitting and oversized states are seen.
pub fn source_for_state(data: &[u8]) -> SourceRecord {
    let size = data
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .unwrap_or(10 << 20);
    SourceRecord {
        key: b"k".to_vec(),
        size,
        mtime: (0, 0),
        version: None,
        chunk_size: 1 << 20,
        kind: StubKind::Cloned,
        digests: None,
    }
}

/// `StateRecord::decode` on any bytes, bare and sealed: what it accepts fits its source, its
/// ranges are canonical, the derived figures agree with the ranges, and it round-trips.
pub fn check_state_record(data: &[u8]) {
    let src = source_for_state(data);
    let payload = data.get(8..).unwrap_or(&[]);
    for bytes in [data.to_vec(), sealed(MAGIC_STATE, payload)] {
        if let Ok(st) = StateRecord::decode(&bytes, &src) {
            check_valid_state(&st, &src);
        }
    }
}

pub fn check_valid_state(st: &StateRecord, src: &SourceRecord) {
    assert!(
        st.backed_len <= src.size,
        "backed_len beyond the source size"
    );
    let pairs = st.present.pairs();
    for w in pairs.windows(2) {
        assert!(
            w[0].1 < w[1].0,
            "ranges not sorted, disjoint, apart: {pairs:?}"
        );
    }
    for &(s, e) in pairs {
        assert!(s < e, "empty or reversed range in {pairs:?}");
    }
    let limit = st.backed_len;
    let covered: u64 = pairs
        .iter()
        .map(|&(s, e)| e.min(limit) - s.min(limit))
        .sum();
    assert_eq!(
        st.present_bytes(),
        covered,
        "present_bytes of {pairs:?} to {limit}"
    );
    assert_eq!(
        st.is_complete(),
        st.present.gaps(0, limit).is_empty(),
        "is_complete disagrees with gaps for {pairs:?} to {limit}"
    );
    let gaps: u64 = st.present.gaps(0, limit).iter().map(|(s, e)| e - s).sum();
    assert_eq!(
        gaps + covered,
        limit,
        "gaps and present do not add up for {pairs:?}"
    );
    assert_eq!(
        StateRecord::decode(&st.encode(), src).as_ref(),
        Ok(st),
        "round trip"
    );
}

/// The supervisor/worker messages: what decodes re-encodes to a message that decodes the same;
/// replies are canonical (the kernel sees exactly what the worker sent), and only verdicts the
/// kernel accepts decode.
pub fn check_protocol(data: &[u8]) {
    if let Some(m) = EventMsg::decode(data) {
        assert_eq!(data.len(), EVENT_LEN);
        assert_eq!(EventMsg::decode(&m.encode()), Some(m));
    }
    if let Some(r) = ReplyMsg::decode(data) {
        assert_eq!(data.len(), REPLY_LEN);
        assert_eq!(&r.encode()[..], data, "a reply is canonical");
    }
    if let Some(raw) = data.get(..4) {
        let raw = u32::from_le_bytes(raw.try_into().unwrap());
        if let Some(v) = Verdict::decode(raw) {
            assert_eq!(v.encode(), raw);
        }
    }
}

/// `manifest::parse` on any UTF-8 text: accepted files have a size, symlinks a target, paths can
/// be judged, and the entries written back out parse to the same entries.
pub fn check_manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check_manifest_text(text);
}

pub fn check_manifest_text(text: &str) {
    let Ok(entries) = manifest::parse(text) else {
        return;
    };
    let mut again = String::from("{\"hsm_manifest\":1}\n");
    for e in &entries {
        let _ = manifest::path_problem(&e.path);
        match e.kind {
            EntryType::File => assert!(e.size.is_some(), "a file without a size: {e:?}"),
            EntryType::Symlink => assert!(e.target.is_some(), "a symlink without a target: {e:?}"),
            EntryType::Dir => {}
        }
        again.push_str(&serde_json::to_string(e).expect("an entry serialises"));
        again.push('\n');
    }
    let reparsed = manifest::parse(&again).expect("written-out entries parse");
    assert_eq!(reparsed, entries, "manifest round trip");
}
