//! 64-bit Snowflake ids: 1 reserved bit, 41 bits of milliseconds since
//! [`EPOCH_MS`], 5 bits datacenter, 5 bits machine, 12 bits sequence.
//!
//! The generator is pure: it reads time through [`Clock`], so sequence overflow
//! and a clock that steps backwards can be tested deterministically. Uniqueness
//! across processes rests on no two live generators sharing a (datacenter,
//! machine) pair; the lease that guarantees it lives in the Postgres adapter.

use std::fmt;

/// 2024-01-01T00:00:00Z: 41 bits of milliseconds from here last until 2093.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
pub const DATACENTER_BITS: u32 = 5;
pub const MACHINE_BITS: u32 = 5;
pub const SEQUENCE_BITS: u32 = 12;
pub const TIMESTAMP_BITS: u32 = 41;
pub const MAX_DATACENTER: u16 = (1 << DATACENTER_BITS) - 1;
pub const MAX_MACHINE: u16 = (1 << MACHINE_BITS) - 1;
const MAX_SEQUENCE: u16 = (1 << SEQUENCE_BITS) - 1;
const MAX_TIMESTAMP: u64 = (1 << TIMESTAMP_BITS) - 1;
const MACHINE_SHIFT: u32 = SEQUENCE_BITS;
const DATACENTER_SHIFT: u32 = SEQUENCE_BITS + MACHINE_BITS;
const TIMESTAMP_SHIFT: u32 = SEQUENCE_BITS + MACHINE_BITS + DATACENTER_BITS;

/// A Snowflake id. The reserved top bit is always zero, so it fits an `i64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnowflakeId(u64);

/// The fields packed into a [`SnowflakeId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnowflakeParts {
    /// Milliseconds since the UNIX epoch.
    pub unix_ms: u64,
    pub datacenter: u16,
    pub machine: u16,
    pub sequence: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnowflakeError {
    #[error("datacenter id {0} is out of range 0..={MAX_DATACENTER}")]
    DatacenterOutOfRange(u16),
    #[error("machine id {0} is out of range 0..={MAX_MACHINE}")]
    MachineOutOfRange(u16),
    #[error(
        "the clock moved backwards by {behind_ms} ms (more than the {tolerance_ms} ms we wait out); refusing to generate ids that could repeat"
    )]
    ClockMovedBackwards { behind_ms: u64, tolerance_ms: u64 },
    #[error("the clock is before the Snowflake epoch or past its 41-bit range")]
    ClockOutOfRange,
    #[error("id {0} has the reserved bit set")]
    ReservedBitSet(u64),
}

impl SnowflakeId {
    pub fn from_raw(raw: u64) -> Result<Self, SnowflakeError> {
        if raw >> 63 != 0 {
            return Err(SnowflakeError::ReservedBitSet(raw));
        }
        Ok(Self(raw))
    }

    pub fn raw(self) -> u64 {
        self.0
    }

    /// As stored in Postgres `bigint`. Never negative.
    pub fn as_i64(self) -> i64 {
        self.0 as i64
    }

    pub fn parts(self) -> SnowflakeParts {
        SnowflakeParts {
            unix_ms: (self.0 >> TIMESTAMP_SHIFT) + EPOCH_MS,
            datacenter: ((self.0 >> DATACENTER_SHIFT) & MAX_DATACENTER as u64) as u16,
            machine: ((self.0 >> MACHINE_SHIFT) & MAX_MACHINE as u64) as u16,
            sequence: (self.0 & MAX_SEQUENCE as u64) as u16,
        }
    }

    pub fn compose(parts: SnowflakeParts) -> Result<Self, SnowflakeError> {
        if parts.datacenter > MAX_DATACENTER {
            return Err(SnowflakeError::DatacenterOutOfRange(parts.datacenter));
        }
        if parts.machine > MAX_MACHINE {
            return Err(SnowflakeError::MachineOutOfRange(parts.machine));
        }
        let since_epoch = parts
            .unix_ms
            .checked_sub(EPOCH_MS)
            .filter(|ms| *ms <= MAX_TIMESTAMP)
            .ok_or(SnowflakeError::ClockOutOfRange)?;
        Ok(Self(
            (since_epoch << TIMESTAMP_SHIFT)
                | (u64::from(parts.datacenter) << DATACENTER_SHIFT)
                | (u64::from(parts.machine) << MACHINE_SHIFT)
                | u64::from(parts.sequence & MAX_SEQUENCE),
        ))
    }
}

impl fmt::Display for SnowflakeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where the generator reads time and how it waits.
pub trait Clock {
    /// Milliseconds since the UNIX epoch.
    fn now_ms(&mut self) -> u64;
    /// Block until at least `unix_ms`. Only ever asked to wait a few milliseconds.
    fn wait_until(&mut self, unix_ms: u64);
}

/// The wall clock. Waiting is a short blocking sleep: the generator only waits
/// out sequence overflow (under 1 ms) and small backward steps (bounded by the
/// tolerance).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn wait_until(&mut self, unix_ms: u64) {
        let now = self.now_ms();
        if unix_ms > now {
            std::thread::sleep(std::time::Duration::from_millis(unix_ms - now));
        }
    }
}

/// Generates strictly increasing ids for one (datacenter, machine) pair.
#[derive(Debug, Clone)]
pub struct SnowflakeGenerator {
    datacenter: u16,
    machine: u16,
    last_ms: u64,
    sequence: u16,
    backwards_tolerance_ms: u64,
}

impl SnowflakeGenerator {
    /// Backward clock steps up to this are waited out; larger ones are refused.
    pub const DEFAULT_BACKWARDS_TOLERANCE_MS: u64 = 10;

    pub fn new(datacenter: u16, machine: u16) -> Result<Self, SnowflakeError> {
        if datacenter > MAX_DATACENTER {
            return Err(SnowflakeError::DatacenterOutOfRange(datacenter));
        }
        if machine > MAX_MACHINE {
            return Err(SnowflakeError::MachineOutOfRange(machine));
        }
        Ok(Self {
            datacenter,
            machine,
            last_ms: 0,
            sequence: 0,
            backwards_tolerance_ms: Self::DEFAULT_BACKWARDS_TOLERANCE_MS,
        })
    }

    /// Never issue an id at or before `unix_ms`: a restarted generator that
    /// leases a machine id hands in the last timestamp its predecessor used.
    pub fn resume_after(mut self, unix_ms: u64) -> Self {
        self.last_ms = unix_ms;
        self.sequence = MAX_SEQUENCE;
        self
    }

    pub fn with_backwards_tolerance_ms(mut self, tolerance_ms: u64) -> Self {
        self.backwards_tolerance_ms = tolerance_ms;
        self
    }

    pub fn datacenter(&self) -> u16 {
        self.datacenter
    }

    pub fn machine(&self) -> u16 {
        self.machine
    }

    /// The millisecond of the last id issued.
    pub fn last_ms(&self) -> u64 {
        self.last_ms
    }

    pub fn next_id(&mut self, clock: &mut impl Clock) -> Result<SnowflakeId, SnowflakeError> {
        let mut now = clock.now_ms();
        if now < self.last_ms {
            let behind_ms = self.last_ms - now;
            if behind_ms > self.backwards_tolerance_ms {
                return Err(SnowflakeError::ClockMovedBackwards {
                    behind_ms,
                    tolerance_ms: self.backwards_tolerance_ms,
                });
            }
            clock.wait_until(self.last_ms);
            now = clock.now_ms();
            if now < self.last_ms {
                return Err(SnowflakeError::ClockMovedBackwards {
                    behind_ms: self.last_ms - now,
                    tolerance_ms: self.backwards_tolerance_ms,
                });
            }
        }
        if now == self.last_ms {
            if self.sequence == MAX_SEQUENCE {
                // 4096 ids in this millisecond already: move to the next one.
                while now <= self.last_ms {
                    clock.wait_until(self.last_ms + 1);
                    now = clock.now_ms();
                    if now < self.last_ms {
                        return Err(SnowflakeError::ClockMovedBackwards {
                            behind_ms: self.last_ms - now,
                            tolerance_ms: self.backwards_tolerance_ms,
                        });
                    }
                }
                self.sequence = 0;
            } else {
                self.sequence += 1;
            }
        } else {
            self.sequence = 0;
        }
        self.last_ms = now;
        SnowflakeId::compose(SnowflakeParts {
            unix_ms: now,
            datacenter: self.datacenter,
            machine: self.machine,
            sequence: self.sequence,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A clock that replays a script of readings and advances by 1 ms when asked to wait.
    struct ScriptedClock {
        readings: Vec<u64>,
        at: usize,
        waits: Vec<u64>,
    }

    impl ScriptedClock {
        fn new(readings: Vec<u64>) -> Self {
            Self {
                readings,
                at: 0,
                waits: Vec::new(),
            }
        }
    }

    impl Clock for ScriptedClock {
        fn now_ms(&mut self) -> u64 {
            let value = self.readings[self.at.min(self.readings.len() - 1)];
            self.at += 1;
            value
        }
        fn wait_until(&mut self, unix_ms: u64) {
            self.waits.push(unix_ms);
            // Skip forward to the first reading at or after the target.
            while self.at < self.readings.len() && self.readings[self.at] < unix_ms {
                self.at += 1;
            }
        }
    }

    const T0: u64 = EPOCH_MS + 1_000_000;

    #[test]
    fn layout_round_trips() {
        let parts = SnowflakeParts {
            unix_ms: T0,
            datacenter: 31,
            machine: 7,
            sequence: 4095,
        };
        let id = SnowflakeId::compose(parts).unwrap();
        assert_eq!(id.parts(), parts);
        assert_eq!(id.raw() >> 63, 0);
    }

    #[test]
    fn sequence_overflow_moves_to_the_next_millisecond() {
        let mut readings = vec![T0; 4097];
        readings.push(T0 + 1);
        let mut clock = ScriptedClock::new(readings);
        let mut generator = SnowflakeGenerator::new(1, 2).unwrap();
        let ids: Vec<_> = (0..4097)
            .map(|_| generator.next_id(&mut clock).unwrap())
            .collect();
        assert_eq!(ids[4095].parts().sequence, 4095);
        assert_eq!(ids[4095].parts().unix_ms, T0);
        assert_eq!(ids[4096].parts().unix_ms, T0 + 1);
        assert_eq!(ids[4096].parts().sequence, 0);
        assert_eq!(clock.waits, vec![T0 + 1]);
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn small_backward_step_is_waited_out() {
        let mut clock = ScriptedClock::new(vec![T0 + 5, T0, T0 + 5, T0 + 6]);
        let mut generator = SnowflakeGenerator::new(0, 0).unwrap();
        let first = generator.next_id(&mut clock).unwrap();
        let second = generator.next_id(&mut clock).unwrap();
        assert!(second > first);
        assert_eq!(clock.waits, vec![T0 + 5]);
    }

    #[test]
    fn large_backward_step_is_refused_with_a_clear_error() {
        let mut clock = ScriptedClock::new(vec![T0 + 1000, T0]);
        let mut generator = SnowflakeGenerator::new(0, 0).unwrap();
        generator.next_id(&mut clock).unwrap();
        let err = generator.next_id(&mut clock).unwrap_err();
        assert_eq!(
            err,
            SnowflakeError::ClockMovedBackwards {
                behind_ms: 1000,
                tolerance_ms: 10
            }
        );
        assert!(err.to_string().contains("moved backwards by 1000 ms"));
    }

    #[test]
    fn resumed_generator_never_reuses_its_predecessors_millisecond() {
        let mut clock = ScriptedClock::new(vec![T0, T0, T0 + 1]);
        let mut generator = SnowflakeGenerator::new(0, 3).unwrap().resume_after(T0);
        let id = generator.next_id(&mut clock).unwrap();
        assert_eq!(id.parts().unix_ms, T0 + 1);
    }

    #[test]
    fn out_of_range_ids_are_refused() {
        assert!(SnowflakeGenerator::new(32, 0).is_err());
        assert!(SnowflakeGenerator::new(0, 32).is_err());
        assert!(SnowflakeId::from_raw(u64::MAX).is_err());
    }

    proptest! {
        #[test]
        fn parts_round_trip(ms in 0u64..MAX_TIMESTAMP, dc in 0u16..=31, machine in 0u16..=31, seq in 0u16..=4095) {
            let parts = SnowflakeParts { unix_ms: EPOCH_MS + ms, datacenter: dc, machine, sequence: seq };
            let id = SnowflakeId::compose(parts).unwrap();
            prop_assert_eq!(id.parts(), parts);
            prop_assert!(id.as_i64() >= 0);
        }

        /// Whatever the clock does (stall, jitter, small backward steps), the ids
        /// that are issued are strictly increasing, hence unique.
        #[test]
        fn ids_strictly_increase_under_any_clock(steps in proptest::collection::vec(-12i64..5, 1..3000)) {
            let mut readings = Vec::with_capacity(steps.len() * 2);
            let mut t = T0 as i64;
            for step in steps {
                t += step;
                readings.push(t as u64);
            }
            // A clock that eventually runs forward so every wait can end.
            let last = *readings.last().unwrap();
            readings.extend((1..=5000).map(|i| last + 20 + i));
            let mut clock = ScriptedClock::new(readings.clone());
            let mut generator = SnowflakeGenerator::new(3, 4).unwrap();
            let mut previous: Option<SnowflakeId> = None;
            for _ in 0..readings.len() / 2 {
                match generator.next_id(&mut clock) {
                    Ok(id) => {
                        if let Some(p) = previous { prop_assert!(id > p); }
                        previous = Some(id);
                    }
                    Err(SnowflakeError::ClockMovedBackwards { behind_ms, .. }) => prop_assert!(behind_ms > 0),
                    Err(other) => prop_assert!(false, "unexpected {other}"),
                }
            }
        }
    }
}
