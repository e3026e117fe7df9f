//! The machine's processes over a measured phase, from `/proc/<pid>/stat`:
//! the CPU the run's own processes used (the generator, the servers, the
//! watched ones), and who else used the machine meanwhile.
//!
//! A run's latency tail is often made by a process it knows nothing of: a
//! VM agent that walks every process's descriptors every few seconds, a
//! message broker that boots a helper VM each minute. Such a process uses
//! the CPU the run needed, so the phase's busiest other processes are
//! reported beside the run's own (`cpu.others`). A process counts with
//! the time of its children that ended during the phase (the kernel adds
//! a reaped child's time to its parent's), so a helper that came and went
//! shows under its parent.

use std::collections::HashMap;

use serde_json::json;

/// `/proc/<pid>/stat` counts CPU time in clock ticks of 1/100 s (Linux's
/// `USER_HZ` on every architecture it runs on).
const TICKS_PER_SECOND: f64 = 100.0;

/// The most other processes (by name) a report lists.
const OTHERS_LISTED: usize = 5;

/// The least CPU, in percent of one core over the phase, that an other
/// process needs to be listed: below it, it did not compete with the run.
const OTHERS_FLOOR_PERCENT: f64 = 0.5;

/// What a run reads of one process's `/proc/<pid>/stat`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stat {
    /// Its `comm`, as `pgrep -x` matches it.
    pub name: String,
    pub ppid: u32,
    /// User and system time, in seconds.
    pub cpu: f64,
    /// User and system time of its children that ended and were waited
    /// for, in seconds.
    pub children_cpu: f64,
    /// When it started, in clock ticks since boot: a pid reused by a
    /// younger process has a later start.
    pub started: u64,
}

impl Stat {
    /// Parses one `/proc/<pid>/stat` line.
    pub fn parse(line: &str) -> Option<Self> {
        // The name is in parentheses and may hold spaces or parentheses.
        let (head, rest) = line.rsplit_once(')')?;
        let (_, name) = head.split_once('(')?;
        // The fields after the name, from the state (field 3 of the line).
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |field: usize| -> Option<f64> {
            Some(fields.get(field - 3)?.parse::<f64>().ok()? / TICKS_PER_SECOND)
        };
        Some(Self {
            name: name.to_owned(),
            ppid: fields.get(1)?.parse().ok()?,
            cpu: ticks(14)? + ticks(15)?,
            children_cpu: ticks(16)? + ticks(17)?,
            started: fields.get(22 - 3)?.parse().ok()?,
        })
    }

    /// Reads process `pid`'s (or `self`'s).
    pub fn of(pid: &str) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }
}

/// This process's CPU time so far.
pub fn own_cpu_seconds() -> f64 {
    Stat::of("self").map_or(0.0, |stat| stat.cpu)
}

/// How many times this process's threads have slept waiting for something
/// (voluntary context switches, all threads together). Each sleep ends
/// with a wake-up that whatever woke it paid for: on loopback, mostly the
/// server's write that made one of the generator's sockets readable, which
/// on a VM may cost it an interrupt sent to the generator's halted core
/// (docs/benchmarks.md, thirty-fifth VM).
pub fn own_wakeups() -> u64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0, |usage| {
        u64::try_from(usage.voluntary_context_switches()).unwrap_or(0)
    })
}

/// Every process running at one moment.
#[derive(Debug, Default)]
pub struct Processes(HashMap<u32, Stat>);

impl Processes {
    pub fn now() -> Self {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Self::default();
        };
        Self(
            entries
                .filter_map(|entry| {
                    let name = entry.ok()?.file_name();
                    let pid = name.to_str()?;
                    Some((pid.parse().ok()?, Stat::of(pid)?))
                })
                .collect(),
        )
    }

    /// Process `pid`'s CPU time, in seconds (0 if it was not running).
    pub fn cpu(&self, pid: u32) -> f64 {
        self.0.get(&pid).map_or(0.0, |stat| stat.cpu)
    }

    /// What process `pid`, read now as `stat`, used since `before` by
    /// `time` (its own, or with its ended children's): all of it if it
    /// started since (or its pid was taken by a younger process).
    fn used_since(before: &Processes, pid: u32, stat: &Stat, time: impl Fn(&Stat) -> f64) -> f64 {
        match before.0.get(&pid) {
            Some(was) if was.started == stat.started => (time(stat) - time(was)).max(0.0),
            _ => time(stat),
        }
    }

    /// The processes named `name` from `before` to now: how many ran (at
    /// either end), and the CPU seconds they used. One started since counts
    /// all its time (a database backend a growing pool opened, say); one
    /// that ended counts as none, its time no longer readable.
    pub fn named_since(&self, before: &Processes, name: &str) -> (usize, f64) {
        let ended = before
            .0
            .iter()
            .filter(|&(pid, was)| {
                was.name == name && self.0.get(pid).is_none_or(|s| s.started != was.started)
            })
            .count();
        let running: Vec<_> = self
            .0
            .iter()
            .filter(|(_, stat)| stat.name == name)
            .collect();
        let used = running
            .iter()
            .map(|&(&pid, stat)| Self::used_since(before, pid, stat, |s| s.cpu))
            .sum();
        (ended + running.len(), used)
    }

    /// The busiest processes, by name, from `before` to now that are not
    /// the run's (`ours`): each name's processes, and the percent of one
    /// core they and their ended children used over `wall` seconds. A
    /// process started since `before` counts all its time.
    pub fn others_since(
        &self,
        before: &Processes,
        ours: impl Fn(u32, &Stat) -> bool,
        wall: f64,
    ) -> serde_json::Value {
        let mut by_name: HashMap<&str, (usize, f64)> = HashMap::new();
        for (&pid, stat) in &self.0 {
            if ours(pid, stat) {
                continue;
            }
            let used = Self::used_since(before, pid, stat, |s| s.cpu + s.children_cpu);
            if used > 0.0 {
                let entry = by_name.entry(&stat.name).or_default();
                entry.0 += 1;
                entry.1 += used;
            }
        }
        let mut busiest: Vec<(&str, usize, f64)> = by_name
            .into_iter()
            .map(|(name, (processes, used))| {
                (
                    name,
                    processes,
                    crate::tenths(100.0 * used / wall.max(1e-9)),
                )
            })
            .filter(|&(_, _, percent)| percent >= OTHERS_FLOOR_PERCENT)
            .collect();
        busiest.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(b.0)));
        busiest.truncate(OTHERS_LISTED);
        json!(
            busiest
                .into_iter()
                .map(|(name, processes, percent)| json!({
                    "name": name,
                    "processes": processes,
                    "percent_of_one_core": percent,
                }))
                .collect::<Vec<_>>()
        )
    }
}

/// One line for the readable summary from a phase's `cpu.others`.
pub fn others_line(others: &serde_json::Value) -> String {
    let listed: Vec<String> = others
        .as_array()
        .into_iter()
        .flatten()
        .map(|other| {
            format!(
                "{} {}",
                other["name"].as_str().unwrap_or("?"),
                other["percent_of_one_core"]
            )
        })
        .collect();
    if listed.is_empty() {
        format!("no other process used {OTHERS_FLOOR_PERCENT} % of a core or more")
    } else {
        format!("other processes, % of one core: {}", listed.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(name: &str, ppid: u32, cpu: f64, children_cpu: f64) -> Stat {
        Stat {
            name: name.into(),
            ppid,
            cpu,
            children_cpu,
            started: 5,
        }
    }

    #[test]
    fn a_stat_line_gives_the_name_parent_and_times() {
        let line = "1 (process_api) S 0 1 1 0 -1 4194560 51 0 0 0 54 259 7 3 10 -10 41 0 2 \
                    1234 567 18446744073709551615";
        let agent = Stat {
            started: 2,
            ..stat("process_api", 0, 3.13, 0.1)
        };
        assert_eq!(Stat::parse(line), Some(agent));
        // A name with spaces and parentheses of its own.
        let line = "42 (a (b) c) R 7 42 42 0 -1 0 0 0 0 0 100 50 0 0 20 0 1 0 5 0 0";
        assert_eq!(Stat::parse(line), Some(stat("a (b) c", 7, 1.5, 0.0)));
        assert_eq!(Stat::parse("42 (cut) R 7"), None);
        assert_eq!(Stat::parse(""), None);
    }

    #[test]
    fn others_are_the_busiest_names_that_are_not_the_runs() {
        let before = Processes(HashMap::from([
            (1, stat("agent", 0, 10.0, 0.0)),
            (2, stat("broker", 1, 5.0, 1.0)),
            (3, stat("server", 1, 100.0, 0.0)),
            (4, stat("worker", 1, 1.0, 0.0)),
            (5, stat("worker", 1, 1.0, 0.0)),
            (6, stat("idle", 1, 3.0, 0.0)),
            (7, stat("reused", 1, 9.0, 0.0)),
        ]));
        let after = Processes(HashMap::from([
            (1, stat("agent", 0, 10.5, 0.0)),
            // A helper it started ended during the phase: its time is now
            // the broker's children's.
            (2, stat("broker", 1, 5.1, 1.8)),
            (3, stat("server", 1, 109.0, 0.0)),
            (4, stat("worker", 1, 1.1, 0.0)),
            (5, stat("worker", 1, 1.1, 0.0)),
            (6, stat("idle", 1, 3.0, 0.0)),
            // Started during the phase: all its time counts.
            (8, stat("newcomer", 1, 0.2, 0.0)),
            // Its pid now a younger process's: all of the younger's time.
            (
                7,
                Stat {
                    started: 900,
                    ..stat("reused", 1, 0.3, 0.0)
                },
            ),
            // Too little to list.
            (9, stat("quiet", 1, 0.01, 0.0)),
        ]));
        let others = after.others_since(&before, |pid, _| pid == 3, 10.0);
        assert_eq!(
            others,
            json!([
                {"name": "broker", "processes": 1, "percent_of_one_core": 9.0},
                {"name": "agent", "processes": 1, "percent_of_one_core": 5.0},
                {"name": "reused", "processes": 1, "percent_of_one_core": 3.0},
                {"name": "newcomer", "processes": 1, "percent_of_one_core": 2.0},
                {"name": "worker", "processes": 2, "percent_of_one_core": 2.0},
            ])
        );
    }

    #[test]
    fn a_watched_name_counts_its_processes_started_during_the_phase() {
        let before = Processes(HashMap::from([
            (10, stat("postgres", 1, 1.0, 0.0)),
            (11, stat("postgres", 1, 2.0, 0.0)),
            (12, stat("redis-server", 1, 5.0, 0.0)),
        ]));
        let after = Processes(HashMap::from([
            (10, stat("postgres", 1, 1.5, 0.0)),
            // 11 ended: none of its time can be read.
            // A backend opened during the phase: all its time.
            (13, stat("postgres", 1, 0.3, 0.0)),
            (12, stat("redis-server", 1, 5.5, 0.0)),
        ]));
        let (count, used) = after.named_since(&before, "postgres");
        assert_eq!(count, 3);
        assert!((used - 0.8).abs() < 1e-9, "{used}");
        assert_eq!(after.named_since(&before, "nothing"), (0, 0.0));
    }

    #[test]
    fn at_most_five_others_are_listed() {
        let after = Processes(
            (1..=8)
                .map(|pid| (pid, stat(&format!("p{pid}"), 1, pid as f64, 0.0)))
                .collect(),
        );
        let others = after.others_since(&Processes::default(), |_, _| false, 100.0);
        let names: Vec<&str> = others
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["p8", "p7", "p6", "p5", "p4"]);
    }

    #[test]
    fn the_summary_names_the_others_or_says_there_were_none() {
        let others = json!([
            {"name": "process_api", "processes": 1, "percent_of_one_core": 1.2},
            {"name": "erl_child_setup", "processes": 1, "percent_of_one_core": 0.6},
        ]);
        assert_eq!(
            others_line(&others),
            "other processes, % of one core: process_api 1.2, erl_child_setup 0.6"
        );
        assert_eq!(
            others_line(&json!([])),
            "no other process used 0.5 % of a core or more"
        );
    }

    #[test]
    fn this_process_reads_its_own_stat() {
        let own = Stat::of("self").expect("a readable /proc/self/stat");
        assert_eq!(own.ppid, std::os::unix::process::parent_id());
        assert!(Processes::now().0.contains_key(&std::process::id()));
    }
}
