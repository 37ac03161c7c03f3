//! The hybrid logical clock of one node.
//!
//! uhlc's `HLC` reads its physical clock through a plain `fn() -> NTP64`, which would make the
//! replication engine read global state. This clock keeps uhlc's timestamp type and its exact
//! semantics (a 4-bit logical counter in the low bits of the NTP64 time, the same update rule and
//! the same maximum-delta check) but takes the physical time as an argument, so that the engine
//! stays free of clock reads and the simulator decides what time it is on every node. A test
//! below drives both clocks side by side to show that they agree.

use crate::NodeId;
use std::time::Duration;
use uhlc::{Timestamp, ID, NTP64};

/// uhlc's logical-counter width: the low 4 bits of an NTP64 time.
const COUNTER_MASK: u64 = (1u64 << uhlc::CSIZE) - 1;
const TIME_MASK: u64 = !COUNTER_MASK;

/// A remote timestamp further ahead of local physical time than the clock accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timestamp from {origin} is {ahead_ms} ms ahead of local time (limit {limit_ms} ms)")]
pub struct ClockSkew {
    pub origin: String,
    pub ahead_ms: u64,
    pub limit_ms: u64,
}

/// A hybrid logical clock: timestamps never go backwards on one node, and a timestamp taken after
/// receiving another is larger than it (unless the sender's clock was too far ahead).
#[derive(Debug, Clone)]
pub struct Hlc {
    id: ID,
    last: NTP64,
    max_delta: NTP64,
}

impl Hlc {
    /// uhlc's default for the largest accepted lead of a remote clock.
    pub const MAX_DELTA_DEFAULT: Duration = Duration::from_millis(500);

    pub fn new(node: NodeId, max_delta: Duration) -> Hlc {
        Hlc {
            id: node.hlc_id(),
            last: NTP64(0),
            max_delta: NTP64::from(max_delta),
        }
    }

    /// A fresh timestamp at physical time `now`, larger than every timestamp this clock has
    /// produced or accepted.
    pub fn new_timestamp(&mut self, now: NTP64) -> Timestamp {
        let now = NTP64(now.0 & TIME_MASK);
        if now.0 > (self.last.0 & TIME_MASK) {
            self.last = now;
        } else {
            self.last = NTP64(self.last.0 + 1);
        }
        Timestamp::new(self.last, self.id)
    }

    /// Moves the clock past a timestamp received from a peer.
    ///
    /// A timestamp more than the maximum delta ahead of `now` is refused and the clock does not
    /// move: one peer with a wrong clock must not drag every node's clock into the future. The
    /// caller still processes the message; HLC only orders concurrent writes, and causally
    /// ordered writes are ordered by their version vectors, not by time.
    pub fn update(&mut self, remote: &Timestamp, now: NTP64) -> Result<(), ClockSkew> {
        let now = NTP64(now.0 & TIME_MASK);
        let remote_time = *remote.get_time();
        if remote_time > now && remote_time - now > self.max_delta {
            return Err(ClockSkew {
                origin: remote.get_id().to_string(),
                ahead_ms: (remote_time - now).to_duration().as_millis() as u64,
                limit_ms: self.max_delta.to_duration().as_millis() as u64,
            });
        }
        let max_time = now.max(remote_time).max(self.last);
        self.last = if max_time == now {
            now
        } else if max_time == remote_time {
            NTP64(remote_time.0 + 1)
        } else {
            NTP64(self.last.0 + 1)
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        static FAKE_NOW: Cell<u64> = const { Cell::new(0) };
    }

    fn fake_clock() -> NTP64 {
        NTP64(FAKE_NOW.with(|n| n.get()))
    }

    #[test]
    fn agrees_with_uhlc_step_by_step() {
        let node = NodeId::from_index(7);
        let reference = uhlc::HLCBuilder::new()
            .with_id(node.hlc_id())
            .with_clock(fake_clock)
            .with_max_delta(Hlc::MAX_DELTA_DEFAULT)
            .build();
        let mut ours = Hlc::new(node, Hlc::MAX_DELTA_DEFAULT);
        let other = NodeId::from_index(9).hlc_id();
        let second = 1u64 << 32;
        // A scripted mix of clock stalls, jumps backwards, remote timestamps behind, ahead and
        // too far ahead.
        let script: &[(u64, Option<u64>)] = &[
            (10 * second, None),
            (10 * second, None),
            (10 * second, Some(10 * second + 100)),
            (10 * second, None),
            (9 * second, None),
            (11 * second, Some(11 * second + second / 4)),
            (11 * second, None),
            (11 * second, Some(20 * second)),
            (11 * second, None),
            (12 * second, Some(5 * second)),
            (12 * second, None),
        ];
        for &(now, remote) in script {
            FAKE_NOW.with(|n| n.set(now));
            match remote {
                None => {
                    assert_eq!(ours.new_timestamp(NTP64(now)), reference.new_timestamp());
                }
                Some(t) => {
                    let ts = Timestamp::new(NTP64(t), other);
                    assert_eq!(
                        ours.update(&ts, NTP64(now)).is_ok(),
                        reference.update_with_timestamp(&ts).is_ok()
                    );
                }
            }
        }
    }

    #[test]
    fn timestamps_increase_and_pass_received_ones() {
        let mut hlc = Hlc::new(NodeId::from_index(1), Hlc::MAX_DELTA_DEFAULT);
        let now = NTP64(100 << 32);
        let a = hlc.new_timestamp(now);
        let b = hlc.new_timestamp(now);
        assert!(b > a);
        let remote = Timestamp::new(
            NTP64((100 << 32) + (1 << 30)),
            NodeId::from_index(2).hlc_id(),
        );
        hlc.update(&remote, now).unwrap();
        let c = hlc.new_timestamp(now);
        assert!(c.get_time() > remote.get_time());
    }

    #[test]
    fn refuses_far_future_without_moving() {
        let mut hlc = Hlc::new(NodeId::from_index(1), Duration::from_millis(500));
        let now = NTP64(100 << 32);
        let before = hlc.new_timestamp(now);
        let far = Timestamp::new(NTP64(200 << 32), NodeId::from_index(2).hlc_id());
        let err = hlc.update(&far, now).unwrap_err();
        assert_eq!(err.limit_ms, 500);
        let after = hlc.new_timestamp(now);
        assert!(after.get_time().0 - before.get_time().0 < 1 << 32);
    }
}
