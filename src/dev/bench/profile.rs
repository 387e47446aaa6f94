//! Where the machine's CPU goes during a scenario, and how a process's
//! memory moves, read from `/proc`. The chaos run judges memory growth with
//! the same figures.
//!
//! Every component runs on the same two cores, so a throughput figure alone
//! does not say what bounds it. Each scenario's row carries the share of
//! the machine's CPU time (all cores, idle included) each component used
//! while it ran: a component near its share of saturation is the bound, and
//! a large idle share means the bound is waiting (fsync, `fetch.wait.max.ms`),
//! not computing. Shares come from ticks, so the clock rate never matters.
//! On a system without `/proc` the rows simply carry no CPU note.
//!
//! Memory is sampled in the background during the flash sale and reported
//! as the median of the run's second quarter (warm) against the median of
//! its last quarter: growth between the two is what a leak looks like.

use std::collections::BTreeMap;

/// The components, by the starts of the process names (`comm`) that make them up.
/// The Kafka broker is a JVM (`java`): while a benchmark runs it is the only
/// one on the machine.
const COMPONENTS: [(&str, &[&str]); 5] = [
    ("broker", &["java", "redpanda"]),
    ("postgres", &["postgres"]),
    ("redis", &["redis-server"]),
    ("couponctl", &["couponctl"]),
    ("wrk/vegeta", &["wrk", "vegeta"]),
];

/// The name of the bench's load-generator threads: their ticks, read from
/// `/proc/self/task`, are the generator's own share, inside `couponctl`'s.
pub const GENERATOR_THREAD: &str = "bench-gen";

/// CPU ticks used so far: by the whole machine, idle, and per component.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuSample {
    machine: u64,
    idle: u64,
    components: BTreeMap<&'static str, u64>,
    generator: u64,
}

/// Where the machine's CPU went from `before` (a [`CpuSample::now`]) until
/// now, as [`CpuSample::since`] says it; `None` where `/proc` could not be
/// read.
pub fn since(before: Option<CpuSample>) -> Option<String> {
    Some(CpuSample::now()?.since(&before?))
}

impl CpuSample {
    /// Reads `/proc` now; `None` where it cannot be read.
    pub fn now() -> Option<Self> {
        let (machine, idle) = machine_ticks(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let mut components: BTreeMap<&'static str, u64> =
            COMPONENTS.iter().map(|(name, _)| (*name, 0)).collect();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let is_pid = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok());
            if !is_pid {
                continue;
            }
            // A process may exit between listing and reading: skip it.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some((comm, ticks)) = process_ticks(&stat) {
                if let Some(name) = component_of(comm) {
                    *components.entry(name).or_default() += ticks;
                }
            }
        }
        // `wrk` and `vegeta` are the bench's load tools, and each has exited by
        // the time its row is sampled: its ticks are this process's
        // reaped children's (`cutime` + `cstime`).
        *components.entry("wrk/vegeta").or_default() += children_ticks();
        Some(Self {
            machine,
            idle,
            components,
            generator: generator_ticks(),
        })
    }

    /// Each component's share of the machine since `earlier`, as
    /// `cpu: broker 41%, postgres 22%, ..., idle 9%`.
    pub fn since(&self, earlier: &CpuSample) -> String {
        let elapsed = self.machine.saturating_sub(earlier.machine).max(1) as f64;
        let share = |now: u64, then: u64| 100.0 * now.saturating_sub(then) as f64 / elapsed;
        let mut parts: Vec<String> = self
            .components
            .iter()
            .filter_map(|(name, ticks)| {
                let then = earlier.components.get(name).copied().unwrap_or(0);
                // wrk and vegeta only run in their own rows.
                let generator = share(self.generator, earlier.generator);
                (*name != "wrk/vegeta" || *ticks > then).then(|| match *name {
                    "couponctl" if generator > 0.0 => format!(
                        "couponctl {:.0}% (load generator {generator:.0}%)",
                        share(*ticks, then)
                    ),
                    _ => format!("{name} {:.0}%", share(*ticks, then)),
                })
            })
            .collect();
        parts.push(format!("idle {:.0}%", share(self.idle, earlier.idle)));
        format!("cpu: {}", parts.join(", "))
    }
}

/// User + system ticks of this process's children that have exited.
fn children_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    let Some(close) = stat.rfind(')') else {
        return 0;
    };
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // cutime and cstime are fields 16 and 17 (1-based).
    let field = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(13) + field(14)
}

/// User + system ticks of this process's load-generator threads.
fn generator_ticks() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .filter_map(|stat| {
            process_ticks(&stat)
                .filter(|(comm, _)| comm.starts_with(GENERATOR_THREAD))
                .map(|(_, ticks)| ticks)
        })
        .sum()
}

/// The component a process belongs to, by the start of its name, so that a
/// renamed binary (`couponctl-old` beside `couponctl-new`, say) still counts.
fn component_of(comm: &str) -> Option<&'static str> {
    COMPONENTS
        .iter()
        .find(|(_, prefixes)| prefixes.iter().any(|p| comm.starts_with(p)))
        .map(|(name, _)| *name)
}

/// Total and idle ticks of all cores, from the `cpu` line of `/proc/stat`.
fn machine_ticks(proc_stat: &str) -> Option<(u64, u64)> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]; the
    // guest times are already inside user and nice.
    let total = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total, idle))
}

/// The process name and its user + system ticks, from `/proc/<pid>/stat`
/// (also the history bench's CPU shares, `tests/it/history_bench.rs`).
pub fn process_ticks(stat: &str) -> Option<(&str, u64)> {
    // The name is in parentheses and may itself contain spaces or ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (1-based).
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// This process's resident memory, sampled every `every` until `finish`.
pub struct MemorySampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl MemorySampler {
    pub fn start(every: std::time::Duration) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut ticks = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = &mut stopped => return samples,
                    _ = ticks.tick() => samples.extend(rss_kib(std::process::id())),
                }
            }
        });
        Self { stop, task }
    }

    pub async fn finish(self) -> MemoryProfile {
        let _ = self.stop.send(());
        MemoryProfile {
            rss_kib: self.task.await.unwrap_or_default(),
        }
    }
}

/// Resident memory samples in KiB, in time order.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryProfile {
    pub rss_kib: Vec<u64>,
}

impl MemoryProfile {
    /// The median of the run's second quarter (warm) and of its last
    /// quarter; `None` with fewer than four samples.
    pub fn warm_and_end(&self) -> Option<(u64, u64)> {
        let quarter = self.rss_kib.len() / 4;
        let median = |part: &[u64]| {
            let mut sorted = part.to_vec();
            sorted.sort_unstable();
            sorted.get(sorted.len() / 2).copied()
        };
        Some((
            median(&self.rss_kib[quarter..2 * quarter])?,
            median(&self.rss_kib[self.rss_kib.len() - quarter..])?,
        ))
    }
}

impl std::fmt::Display for MemoryProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |kib: u64| kib as f64 / 1024.0;
        match (self.warm_and_end(), self.rss_kib.iter().max()) {
            (Some((warm, end)), Some(&peak)) => write!(
                f,
                "rss {:.1} MiB warm, {:.1} MiB at the end, peak {:.1} MiB",
                mib(warm),
                mib(end),
                mib(peak)
            ),
            _ => write!(f, "rss: {} samples, too few", self.rss_kib.len()),
        }
    }
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ticks_sum_the_cpu_line_without_guest_time() {
        let stat = "cpu  100 5 50 800 20 1 2 3 40 0\ncpu0 50 2 25 400 10 0 1 1 20 0\n";
        assert_eq!(machine_ticks(stat), Some((981, 820)));
        assert_eq!(machine_ticks("intr 1 2 3\n"), None);
    }

    #[test]
    fn process_ticks_survive_odd_names() {
        let stat = "4242 (tokio (rt) worker) S 1 4242 4242 0 -1 4194560 120 0 0 0 731 269 0 0 20 0 9 0 100 0 0";
        assert_eq!(process_ticks(stat), Some(("tokio (rt) worker", 1_000)));
        assert_eq!(process_ticks("4242 (short) S 1"), None);
    }

    #[test]
    fn processes_belong_to_components_by_name_prefix() {
        assert_eq!(component_of("java"), Some("broker"));
        assert_eq!(component_of("postgres"), Some("postgres"));
        assert_eq!(component_of("couponctl-old"), Some("couponctl"));
        assert_eq!(component_of("redis-server"), Some("redis"));
        assert_eq!(component_of("bash"), None);
    }

    #[test]
    fn memory_compares_the_warm_quarter_with_the_last() {
        let profile = MemoryProfile {
            rss_kib: vec![1024, 2048, 10_240, 10_240, 11_264, 11_264, 12_288, 12_288],
        };
        assert_eq!(
            profile.to_string(),
            "rss 10.0 MiB warm, 12.0 MiB at the end, peak 12.0 MiB"
        );
        let short = MemoryProfile { rss_kib: vec![1] };
        assert_eq!(short.to_string(), "rss: 1 samples, too few");
    }

    #[test]
    fn shares_are_of_the_whole_machine() {
        let mut before = CpuSample {
            machine: 1_000,
            idle: 500,
            components: COMPONENTS.iter().map(|(n, _)| (*n, 0)).collect(),
            generator: 0,
        };
        let mut after = before.clone();
        after.machine = 1_200;
        after.idle = 520;
        after.components.insert("broker", 100);
        after.components.insert("couponctl", 50);
        before.components.insert("couponctl", 10);
        assert_eq!(
            after.since(&before),
            "cpu: broker 50%, couponctl 20%, postgres 0%, redis 0%, idle 10%"
        );
        // wrk shows when it ran; the generator's threads as part of couponctl.
        after.components.insert("wrk/vegeta", 30);
        after.generator = 16;
        assert_eq!(
            after.since(&before),
            "cpu: broker 50%, couponctl 20% (load generator 8%), postgres 0%, redis 0%, wrk/vegeta 15%, idle 10%"
        );
    }
}
