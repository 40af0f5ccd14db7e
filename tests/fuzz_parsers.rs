//! The parsers that see outside input, under many generated inputs on the stable toolchain (the
//! same checks as the cargo-fuzz targets in `fuzz/`, which need nightly): fanotify event buffers
//! (from the kernel), per-file records (from xattrs anyone with CAP_SYS_ADMIN can write),
//! supervisor/worker messages (from another process) and manifests (from a web server).
//!
//! Each parser gets raw bytes, and also well-formed inputs with mutations, which reach far deeper
//! than random bytes (a random buffer almost never passes a checksum or a JSON header).
mod fuzz_checks;
use fuzz_checks::*;

use hsm::manifest::{Entry, EntryType};
use hsm::protocol::{EventMsg, ReplyMsg};
use hsm::ranges::RangeSet;
use hsm::record::{RecordError, SourceRecord, StateRecord, StubKind};
use hsm::sys::fanotify::{parse_events, DenyErrno, RawEvent, Verdict};
use proptest::collection::vec;
use proptest::num::u8::ANY as BYTE;
use proptest::prelude::*;

/// Raw inputs: many cases, small inputs.
fn raw() -> ProptestConfig {
    ProptestConfig::with_cases(20_000)
}

/// Structured inputs: fewer, bigger cases.
fn structured() -> ProptestConfig {
    ProptestConfig::with_cases(3_000)
}

// ---------------------------------------------------------------------------------------------
// fanotify event buffers
// ---------------------------------------------------------------------------------------------

fn raw_event() -> impl Strategy<Value = RawEvent> {
    (
        any::<u64>(),
        any::<i32>(),
        any::<i32>(),
        proptest::option::of((any::<u64>(), any::<u64>())),
    )
        .prop_map(|(mask, fd, pid, range)| RawEvent {
            mask,
            fd,
            pid,
            range,
        })
}

/// An edit of a buffer: set byte `at` (modulo the length) to `to`, or cut it at `at`.
#[derive(Clone, Debug)]
enum Edit {
    Set(usize, u8),
    Cut(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), BYTE).prop_map(|(a, b)| Edit::Set(a, b)),
        1 => any::<usize>().prop_map(Edit::Cut),
    ]
}

fn apply_edits(mut buf: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        if buf.is_empty() {
            break;
        }
        match *e {
            Edit::Set(at, b) => {
                let n = buf.len();
                buf[at % n] = b;
            }
            Edit::Cut(at) => {
                let n = buf.len();
                buf.truncate(at % n);
            }
        }
    }
    buf
}

proptest! {
    #![proptest_config(raw())]

    #[test]
    fn fanotify_raw_bytes(data in vec(BYTE, 0..400)) {
        check_fanotify(&data);
    }

    #[test]
    fn source_record_raw_bytes(data in vec(BYTE, 0..200)) {
        check_source_record(&data);
    }

    #[test]
    fn state_record_raw_bytes(data in vec(BYTE, 0..200)) {
        check_state_record(&data);
    }

    #[test]
    fn protocol_raw_bytes(data in vec(BYTE, 0..64)) {
        check_protocol(&data);
    }

    /// Messages of exactly the right lengths, where the interesting decoding happens.
    #[test]
    fn protocol_exact_lengths(ev in vec(BYTE, 41), rep in vec(BYTE, 13)) {
        check_protocol(&ev);
        check_protocol(&rep);
    }

    #[test]
    fn manifest_raw_bytes(data in vec(BYTE, 0..300)) {
        check_manifest(&data);
        let mut with_header = b"{\"hsm_manifest\":1}\n".to_vec();
        with_header.extend_from_slice(&data);
        check_manifest(&with_header);
    }
}

proptest! {
    #![proptest_config(structured())]

    /// Well-formed buffers parse to exactly the events in them.
    #[test]
    fn fanotify_well_formed_buffers_parse_exactly(events in vec(raw_event(), 0..20)) {
        let buf = encode_events(&events);
        let mut out = Vec::new();
        prop_assert_eq!(parse_events(&buf, &mut out), Ok(()));
        prop_assert_eq!(out, events);
    }

    /// Well-formed buffers, damaged: no panic, and the events returned before the damage are
    /// the ones that were there.
    #[test]
    fn fanotify_damaged_buffers(events in vec(raw_event(), 1..10), edits in vec(edit(), 1..4)) {
        let buf = apply_edits(encode_events(&events), &edits);
        check_fanotify(&buf);
    }

    /// Unknown info records before and after the range record are skipped.
    #[test]
    fn fanotify_unknown_info_records_are_skipped(
        ev in raw_event(),
        before in vec((1u8..=5, vec(BYTE, 0..3)), 0..3),
        after in vec((7u8..=255, vec(BYTE, 0..3)), 0..3),
    ) {
        let info = |t: u8, words: &Vec<u8>| {
            let len = 4 + 4 * words.len();
            let mut v = vec![t, 0];
            v.extend_from_slice(&(len as u16).to_ne_bytes());
            for w in words {
                v.extend_from_slice(&[*w; 4]);
            }
            v
        };
        let mut body = Vec::new();
        for (t, w) in &before {
            body.extend(info(*t, w));
        }
        let base = encode_events(&[ev]);
        body.extend_from_slice(&base[24..]);
        for (t, w) in &after {
            body.extend(info(*t, w));
        }
        let mut buf = base[..24].to_vec();
        buf[0..4].copy_from_slice(&((24 + body.len()) as u32).to_ne_bytes());
        buf.extend(body);
        let mut out = Vec::new();
        prop_assert_eq!(parse_events(&buf, &mut out), Ok(()));
        prop_assert_eq!(out, vec![ev]);
    }
}

// ---------------------------------------------------------------------------------------------
// Per-file records
// ---------------------------------------------------------------------------------------------

fn source_record() -> impl Strategy<Value = SourceRecord> {
    (
        vec(BYTE, 1..64),
        any::<u64>(),
        (any::<i64>(), 0u32..1_000_000_000),
        proptest::option::of("[ -~]{0,40}"),
        1u32..=4096,
        prop_oneof![
            Just(StubKind::Sparse),
            Just(StubKind::Cloned),
            Just(StubKind::SparseLazy)
        ],
        proptest::option::of(any::<[u8; 32]>()),
    )
        .prop_map(
            |(key, size, mtime, version, pages, kind, digests)| SourceRecord {
                key,
                size,
                mtime,
                version,
                chunk_size: pages * 4096,
                kind,
                digests,
            },
        )
}

/// A source record and a state that fits it.
fn source_and_state() -> impl Strategy<Value = (SourceRecord, StateRecord)> {
    (
        source_record(),
        any::<u64>(),
        vec((any::<u64>(), any::<u64>()), 0..12),
        any::<bool>(),
    )
        .prop_map(|(src, backed, raw, modified)| {
            let size = src.size;
            let backed_len = match size.checked_add(1) {
                Some(n) => backed % n,
                None => backed,
            };
            let mut present = RangeSet::new();
            for (a, b) in raw {
                let (s, e) = if size == 0 {
                    (0, 0)
                } else {
                    (a % size, b % size)
                };
                present.insert(s.min(e), s.max(e));
            }
            (
                src,
                StateRecord {
                    backed_len,
                    present,
                    modified,
                },
            )
        })
}

proptest! {
    #![proptest_config(structured())]

    #[test]
    fn source_records_round_trip(rec in source_record()) {
        prop_assert_eq!(SourceRecord::decode(&rec.encode()), Ok(rec.clone()));
        check_valid_source(&rec);
    }

    /// Any one bit flipped anywhere in a record, or any truncation, is refused: a damaged or
    /// hand-edited record is never followed.
    #[test]
    fn damaged_source_records_are_refused(rec in source_record(), bit in any::<usize>(), cut in any::<usize>()) {
        let enc = rec.encode();
        let mut flipped = enc.clone();
        let bit = bit % (enc.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(SourceRecord::decode(&flipped).is_err(), "bit {} flipped, still accepted", bit);
        let cut = cut % enc.len();
        prop_assert!(SourceRecord::decode(&enc[..cut]).is_err(), "cut at {}, still accepted", cut);
        // A state record is never taken for a source record, nor the other way round.
        let st = rec.fresh_state().encode();
        prop_assert_eq!(SourceRecord::decode(&st), Err(RecordError::Magic));
        prop_assert_eq!(StateRecord::decode(&enc, &rec), Err(RecordError::Magic));
    }

    /// Sealed payloads that are a valid record with one field pushed out of range are refused.
    #[test]
    fn invalid_source_fields_are_refused(rec in source_record(), bad_chunk in any::<u32>()) {
        let mut bad = rec.clone();
        bad.chunk_size = if bad_chunk % 4096 == 0 { 0 } else { bad_chunk };
        prop_assert!(SourceRecord::decode(&bad.encode()).is_err());
        let mut empty = rec;
        empty.key.clear();
        prop_assert!(SourceRecord::decode(&empty.encode()).is_err());
    }

    /// Sealed random payloads behind a valid checksum: postcard and the checks after it.
    #[test]
    fn sealed_random_payloads(payload in vec(BYTE, 0..120)) {
        check_source_record(&payload);
        let mut with_size = 1_000_000u64.to_le_bytes().to_vec();
        with_size.extend_from_slice(&payload);
        check_state_record(&with_size);
    }

    #[test]
    fn state_records_round_trip((src, st) in source_and_state()) {
        check_valid_state(&st, &src);
    }

    #[test]
    fn damaged_state_records_are_refused((src, st) in source_and_state(), bit in any::<usize>(), cut in any::<usize>()) {
        let enc = st.encode();
        let mut flipped = enc.clone();
        let bit = bit % (enc.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(StateRecord::decode(&flipped, &src).is_err(), "bit {} flipped, still accepted", bit);
        let cut = cut % enc.len();
        prop_assert!(StateRecord::decode(&enc[..cut], &src).is_err(), "cut at {}, still accepted", cut);
    }

    /// A state that claims more than its source holds, or ranges out of canonical order, is
    /// refused even when properly sealed.
    #[test]
    fn states_that_do_not_fit_are_refused((src, st) in source_and_state(), extra in 1u64..1000, swap in any::<bool>()) {
        if let Some(backed_len) = src.size.checked_add(extra) {
            let big = StateRecord { backed_len, ..st.clone() };
            prop_assert!(StateRecord::decode(&big.encode(), &src).is_err());
        }
        let pairs = st.present.pairs().to_vec();
        if pairs.len() >= 2 {
            // Out of order, or overlapping/adjacent: not what the daemon writes.
            let mut bad = pairs.clone();
            if swap {
                bad.swap(0, 1);
            } else {
                bad[1].0 = bad[0].1;
            }
            let mut payload = postcard::to_allocvec(&st.backed_len).unwrap();
            payload.extend(postcard::to_allocvec(&bad).unwrap());
            payload.extend(postcard::to_allocvec(&st.modified).unwrap());
            prop_assert!(StateRecord::decode(&sealed(MAGIC_STATE, &payload), &src).is_err(), "{:?}", bad);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Supervisor/worker messages
// ---------------------------------------------------------------------------------------------

fn verdict() -> impl Strategy<Value = Verdict> {
    prop_oneof![
        Just(Verdict::Allow),
        prop_oneof![
            Just(DenyErrno::Io),
            Just(DenyErrno::Perm),
            Just(DenyErrno::Busy),
            Just(DenyErrno::TxtBsy),
            Just(DenyErrno::Again),
            Just(DenyErrno::NoSpc),
            Just(DenyErrno::DQuot),
        ]
        .prop_map(Verdict::Deny),
    ]
}

proptest! {
    #![proptest_config(structured())]

    #[test]
    fn messages_round_trip(
        id in any::<u64>(), fd_num in any::<i32>(), pid in any::<i32>(), mask in any::<u64>(),
        range in proptest::option::of((any::<u64>(), any::<u64>())),
        v in verdict(), ignore in any::<bool>(),
    ) {
        let e = EventMsg { id, fd_num, pid, mask, range };
        prop_assert_eq!(EventMsg::decode(&e.encode()), Some(e));
        let r = ReplyMsg { id, verdict: v, ignore };
        prop_assert_eq!(ReplyMsg::decode(&r.encode()), Some(r));
        check_protocol(&e.encode());
        check_protocol(&r.encode());
    }

    /// A reply with any other verdict word (an errno the kernel would refuse, a flag combination)
    /// never decodes: the supervisor cannot be made to send the kernel something it rejects.
    #[test]
    fn replies_with_foreign_verdicts_are_refused(id in any::<u64>(), word in any::<u32>()) {
        let mut b = ReplyMsg { id, verdict: Verdict::Allow, ignore: false }.encode();
        b[8..12].copy_from_slice(&word.to_le_bytes());
        if let Some(r) = ReplyMsg::decode(&b) {
            prop_assert_eq!(r.verdict.encode(), word);
        }
        check_protocol(&b);
    }
}

// ---------------------------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------------------------

fn entry() -> impl Strategy<Value = Entry> {
    (
        "[a-zA-Z0-9 ._\u{e9}\u{4e2d}/-]{1,40}",
        prop_oneof![
            Just(EntryType::File),
            Just(EntryType::Dir),
            Just(EntryType::Symlink)
        ],
        any::<u64>(),
        proptest::option::of(any::<u32>()),
        any::<i64>(),
        0u32..1_000_000_000,
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
        proptest::option::of("[0-9a-f]{64}"),
        "\\PC{1,30}",
    )
        .prop_map(
            |(path, kind, size, mode, mtime, mtime_nsec, uid, gid, blake3, target)| Entry {
                path,
                kind,
                size: (kind == EntryType::File).then_some(size),
                mode,
                mtime,
                mtime_nsec,
                uid,
                gid,
                blake3,
                target: (kind == EntryType::Symlink).then_some(target),
            },
        )
}

fn manifest_text(entries: &[Entry]) -> String {
    let mut t = String::from("{\"hsm_manifest\":1}\n");
    for e in entries {
        t.push_str(&serde_json::to_string(e).unwrap());
        t.push('\n');
    }
    t
}

proptest! {
    #![proptest_config(structured())]

    #[test]
    fn manifests_round_trip(entries in vec(entry(), 0..20)) {
        let text = manifest_text(&entries);
        prop_assert_eq!(hsm::manifest::parse(&text).unwrap(), entries);
        check_manifest_text(&text);
    }

    /// Manifests with edits (as a broken server or a hostile one would send them): no panic, and
    /// what parses is consistent.
    #[test]
    fn damaged_manifests(entries in vec(entry(), 1..8), edits in vec(edit(), 1..4)) {
        let text = manifest_text(&entries);
        let damaged = apply_edits(text.into_bytes(), &edits);
        check_manifest(&damaged);
    }

    /// Unknown fields are ignored; a missing size or target is an error naming the line.
    #[test]
    fn manifest_fields(e in entry(), extra in "[a-z_]{1,10}") {
        let mut v = serde_json::to_value(&e).unwrap();
        if !["path", "type", "size", "mode", "mtime", "mtime_nsec", "uid", "gid", "blake3", "target"]
            .contains(&extra.as_str())
        {
            v.as_object_mut().unwrap().insert(extra, serde_json::json!({"nested": [1, 2]}));
            let text = format!("{{\"hsm_manifest\":1}}\n{v}\n");
            prop_assert_eq!(hsm::manifest::parse(&text).unwrap(), vec![e.clone()]);
        }
        let mut v = serde_json::to_value(&e).unwrap();
        let obj = v.as_object_mut().unwrap();
        let removed = match e.kind {
            EntryType::File => obj.remove("size").is_some(),
            EntryType::Symlink => obj.remove("target").is_some(),
            EntryType::Dir => false,
        };
        if removed {
            let text = format!("{{\"hsm_manifest\":1}}\n{v}\n");
            let err = format!("{:#}", hsm::manifest::parse(&text).unwrap_err());
            prop_assert!(err.contains("line 2"), "{}", err);
        }
    }
}
