//! The machine's cores over a measured phase, from `/proc/stat`: how much
//! of each core's time went to work (any process's, the kernel's included)
//! and how much the hypervisor gave to other guests (steal). A VM whose
//! cores are stolen from runs everything slower for reasons no process on
//! it shows, so a run with a large steal share is not comparable with a
//! quiet one.

use anyhow::Context;
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};
use serde_json::json;

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// Runs the calling thread on `cpu` alone.
pub fn pin(cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set).context("pinning a thread")
}

/// One core's counters, in clock ticks since boot.
#[derive(Debug)]
struct Ticks {
    /// user, nice, system, irq and softirq (guest time is within user).
    busy: u64,
    steal: u64,
    /// busy, idle, iowait and steal.
    total: u64,
}

/// Every core's counters at one moment, by name (`cpu0`, `cpu1`, ...).
#[derive(Debug)]
pub struct Cores(Vec<(String, Ticks)>);

impl Cores {
    /// The counters now (none if `/proc/stat` cannot be read).
    pub fn now() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/stat").unwrap_or_default())
    }

    fn parse(stat: &str) -> Self {
        let cores = stat
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let name = fields.next()?;
                // The first line, `cpu`, sums every core.
                if !name.starts_with("cpu") || name == "cpu" {
                    return None;
                }
                let n: Vec<u64> = fields.map_while(|f| f.parse().ok()).collect();
                let at = |i: usize| n.get(i).copied().unwrap_or(0);
                let (user, nice, system, idle, iowait) = (at(0), at(1), at(2), at(3), at(4));
                let (irq, softirq, steal) = (at(5), at(6), at(7));
                let busy = user + nice + system + irq + softirq;
                let ticks = Ticks {
                    busy,
                    steal,
                    total: busy + idle + iowait + steal,
                };
                Some((name.to_owned(), ticks))
            })
            .collect();
        Self(cores)
    }

    /// Each core's busy and stolen share of its time between `before` and
    /// this reading, in percent.
    pub fn since(&self, before: &Cores) -> serde_json::Value {
        let percent = |part: u64, whole: u64| {
            if whole == 0 {
                0.0
            } else {
                crate::tenths(100.0 * part as f64 / whole as f64)
            }
        };
        let cores: Vec<serde_json::Value> = self
            .0
            .iter()
            .filter_map(|(name, after)| {
                let (_, before) = before.0.iter().find(|(n, _)| n == name)?;
                let total = after.total.saturating_sub(before.total);
                Some(json!({
                    "cpu": name,
                    "busy_percent": percent(after.busy.saturating_sub(before.busy), total),
                    "steal_percent": percent(after.steal.saturating_sub(before.steal), total),
                }))
            })
            .collect();
        json!(cores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "\
cpu  300 0 100 900 0 0 0 100 0 0
cpu0 100 0 50 400 0 0 0 50 0 0
cpu1 200 0 50 500 0 0 0 50 0 0
intr 12345
";

    const AFTER: &str = "\
cpu  600 0 200 1300 10 5 5 280 0 0
cpu0 250 0 100 500 10 5 5 130 0 0
cpu1 350 0 100 800 0 0 0 150 0 0
intr 23456
";

    #[test]
    fn each_core_is_split_into_work_and_steal_over_the_phase() {
        let before = Cores::parse(BEFORE);
        let after = Cores::parse(AFTER);
        // cpu0: busy 150 + 50 + 5 + 5 = 210, steal 80, idle 100 + iowait 10: of 400.
        // cpu1: busy 150 + 50 = 200, steal 100, idle 300: of 600.
        assert_eq!(
            after.since(&before),
            json!([
                {"cpu": "cpu0", "busy_percent": 52.5, "steal_percent": 20.0},
                {"cpu": "cpu1", "busy_percent": 33.3, "steal_percent": 16.7},
            ])
        );
    }

    #[test]
    fn an_unreadable_or_unchanged_reading_reports_nothing_false() {
        let empty = Cores::parse("");
        assert_eq!(empty.since(&empty), json!([]));
        let same = Cores::parse(BEFORE);
        assert_eq!(
            same.since(&same),
            json!([
                {"cpu": "cpu0", "busy_percent": 0.0, "steal_percent": 0.0},
                {"cpu": "cpu1", "busy_percent": 0.0, "steal_percent": 0.0},
            ])
        );
    }
}
