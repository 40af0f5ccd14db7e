//! Messages between the supervisor (holds the fanotify group) and the worker (fetches).
//!
//! Fixed-size little-endian records over a `SOCK_SEQPACKET` socket; the event's fd travels beside
//! the message as `SCM_RIGHTS`. The worker answers the kernel itself (by the supervisor's fd
//! number) and then replies, so that the supervisor can close its copy of the event's fd: until
//! then that number cannot be reused, so no answer ever reaches a newer event. Every event
//! carries a supervisor-assigned id, which is what a reply names (fd numbers are reused).

use crate::sys::fanotify::Verdict;

/// Supervisor → worker: one permission event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventMsg {
    pub id: u64,
    /// The event's fd number in the supervisor: the kernel matches responses by it.
    pub fd_num: i32,
    pub pid: i32,
    pub mask: u64,
    pub range: Option<(u64, u64)>,
}

/// Worker → supervisor: the worker has answered event `id` (to the group itself); the supervisor
/// may close the event's fd. `verdict` and `ignore` say what the answer was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyMsg {
    pub id: u64,
    pub verdict: Verdict,
    /// The file is complete (or not a stub): silence its events with an ignore mark.
    pub ignore: bool,
}

/// The id of control messages: "ready" from the worker, "shut down" from the supervisor.
pub const CONTROL_ID: u64 = u64::MAX;
/// The id of notes, supervisor → worker, never answered: "the supervisor answered this open of a
/// complete file itself" (with the file's fd), so that the worker sees walks through hydrated
/// directories too (see `prefetch`).
pub const NOTE_ID: u64 = u64::MAX - 1;

pub const EVENT_LEN: usize = 41;
pub const REPLY_LEN: usize = 13;

impl EventMsg {
    pub fn encode(&self) -> [u8; EVENT_LEN] {
        let mut b = [0u8; EVENT_LEN];
        b[0..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..12].copy_from_slice(&self.fd_num.to_le_bytes());
        b[12..16].copy_from_slice(&self.pid.to_le_bytes());
        b[16..24].copy_from_slice(&self.mask.to_le_bytes());
        if let Some((off, count)) = self.range {
            b[24] = 1;
            b[25..33].copy_from_slice(&off.to_le_bytes());
            b[33..41].copy_from_slice(&count.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<EventMsg> {
        if b.len() != EVENT_LEN || b[24] > 1 {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let i32_at = |i: usize| i32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        Some(EventMsg {
            id: u64_at(0),
            fd_num: i32_at(8),
            pid: i32_at(12),
            mask: u64_at(16),
            range: (b[24] == 1).then(|| (u64_at(25), u64_at(33))),
        })
    }
}

impl ReplyMsg {
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[0..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..12].copy_from_slice(&self.verdict.encode().to_le_bytes());
        b[12] = self.ignore as u8;
        b
    }

    pub fn decode(b: &[u8]) -> Option<ReplyMsg> {
        if b.len() != REPLY_LEN || b[12] > 1 {
            return None;
        }
        Some(ReplyMsg {
            id: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            verdict: Verdict::decode(u32::from_le_bytes(b[8..12].try_into().unwrap()))?,
            ignore: b[12] == 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fanotify::DenyErrno;

    #[test]
    fn round_trips() {
        let e = EventMsg {
            id: 7,
            fd_num: 12,
            pid: 99,
            mask: 0x10_0000,
            range: Some((4096, 8192)),
        };
        assert_eq!(EventMsg::decode(&e.encode()), Some(e));
        let e2 = EventMsg { range: None, ..e };
        assert_eq!(EventMsg::decode(&e2.encode()), Some(e2));
        for verdict in [Verdict::Allow, Verdict::Deny(DenyErrno::NoSpc)] {
            let r = ReplyMsg {
                id: 3,
                verdict,
                ignore: true,
            };
            assert_eq!(ReplyMsg::decode(&r.encode()), Some(r));
        }
    }

    #[test]
    fn rejects_unknown_verdicts_and_sizes() {
        let mut r = ReplyMsg {
            id: 1,
            verdict: Verdict::Allow,
            ignore: false,
        }
        .encode();
        r[8..12].copy_from_slice(&(2u32 | (61 << 24)).to_le_bytes()); // ENODATA: not allowed
        assert_eq!(ReplyMsg::decode(&r), None);
        assert_eq!(ReplyMsg::decode(&r[..5]), None);
        assert_eq!(EventMsg::decode(&[0u8; 40]), None);
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = EventMsg::decode(&b);
            let _ = ReplyMsg::decode(&b);
        }
    }
}
