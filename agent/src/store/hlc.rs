//! Hybrid logical clock: wall-clock milliseconds in the high 48 bits, a logical counter in the
//! low 16, so versions stay close to real time yet never go backwards and always exceed every
//! version this node has observed.

use serde::{Deserialize, Serialize};
use std::fmt;

const LOGICAL_BITS: u32 = 16;

/// One hybrid logical clock reading. Totally ordered; `Hlc::ZERO` precedes every real reading.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc(pub u64);

impl Hlc {
    pub const ZERO: Hlc = Hlc(0);

    /// The reading for a wall-clock time with a zero logical part.
    pub fn from_millis(ms: u64) -> Hlc {
        Hlc(ms.saturating_mul(1 << LOGICAL_BITS))
    }

    /// The wall-clock part in milliseconds since the Unix epoch.
    pub fn millis(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    pub fn logical(self) -> u16 {
        (self.0 & 0xffff) as u16
    }

    pub fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    pub fn from_be_bytes(b: [u8; 8]) -> Hlc {
        Hlc(u64::from_be_bytes(b))
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.millis(), self.logical())
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The clock state of one node. It never reads a clock itself: callers pass the wall time in.
#[derive(Debug, Clone, Copy, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    pub fn new(last: Hlc) -> Self {
        HlcClock { last }
    }

    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A fresh reading for a local event: greater than every reading issued or observed so far.
    /// A logical overflow simply carries into the millisecond part.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        let wall = Hlc::from_millis(now_ms);
        // Saturating: readings from peers are bounded by the drift check, so the top of the
        // clock is never reached honestly, and a wrap would reissue version 0.
        self.last = if wall > self.last {
            wall
        } else {
            Hlc(self.last.0.saturating_add(1))
        };
        self.last
    }

    /// Folds in a reading received from another node, so later local readings follow it.
    pub fn observe(&mut self, remote: Hlc) {
        if remote > self.last {
            self.last = remote;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_is_strictly_monotonic_even_when_the_wall_clock_goes_back() {
        let mut c = HlcClock::default();
        let a = c.tick(1_000);
        let b = c.tick(900);
        let d = c.tick(1_000);
        assert!(a < b && b < d);
        assert_eq!(a.millis(), 1_000);
        assert_eq!(b.millis(), 1_000);
        assert_eq!(b.logical(), 1);
    }

    #[test]
    fn observing_a_future_reading_pulls_local_readings_past_it() {
        let mut c = HlcClock::default();
        c.tick(1_000);
        let remote = Hlc::from_millis(61_000);
        c.observe(remote);
        assert!(c.tick(1_001) > remote);
    }

    #[test]
    fn logical_overflow_carries_into_millis() {
        let mut c = HlcClock::new(Hlc(Hlc::from_millis(5).0 | 0xffff));
        let next = c.tick(5);
        assert_eq!(next.millis(), 6);
        assert_eq!(next.logical(), 0);
    }
}
