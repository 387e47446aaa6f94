//! How big the run is: the quick form (`make test`) or the long one
//! (`make chaos`).

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Profile {
    /// Distinct users in each burst; the pool holds half as many coupons.
    pub users: usize,
    /// Claims per second in the sustained scenario.
    pub rate: u32,
    pub sustained: Duration,
}

impl Profile {
    pub fn quick() -> Self {
        Self {
            users: 400,
            rate: 100,
            sustained: Duration::from_secs(15),
        }
    }

    /// `CHAOS_USERS`, `CHAOS_RATE` and `CHAOS_SUSTAINED` (e.g. `10m`) override
    /// the defaults.
    pub fn long() -> Self {
        let number = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let sustained = std::env::var("CHAOS_SUSTAINED")
            .ok()
            .and_then(|v| humantime::parse_duration(&v).ok())
            .unwrap_or(Duration::from_secs(300));
        Self {
            users: number("CHAOS_USERS", 5_000) as usize,
            rate: number("CHAOS_RATE", 200) as u32,
            sustained,
        }
    }
}
