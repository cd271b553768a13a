//! CPU time of a browser: its process and all its descendants (renderers, GPU, network
//! service), from `/proc/PID/stat`. The same meter for both sides: what one viewer page costs
//! is the browser's CPU time over the run divided by the wall time and the number of pages.

use std::time::Instant;

/// Clock ticks per second of `/proc/PID/stat`'s `utime`/`stime` (`sysconf(_SC_CLK_TCK)`, 100
/// on Linux).
const TICKS_PER_S: f64 = 100.0;

/// `utime + stime` (ticks) from a `/proc/PID/stat` line.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // Fields after the command name (which may hold spaces), from field 3 (`state`) on.
    let f = stat_fields(stat)?;
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after `state`.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The fields of a `/proc/PID/stat` line after the command name (which may hold spaces and
/// parentheses): `state` first.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    Some(
        stat.get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect(),
    )
}

/// The parent's pid from a `/proc/PID/stat` line.
fn parse_stat_ppid(stat: &str) -> Option<u32> {
    stat_fields(stat)?.get(1)?.parse().ok()
}

/// `pid` and every process below it.
fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(pp) = std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .as_deref()
                .and_then(parse_stat_ppid)
            {
                parents.push((p, pp));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    out
}

/// CPU seconds used so far by `pid` and its (living) descendants.
pub fn tree_cpu_s(pid: u32) -> f64 {
    let ticks: u64 = tree(pid)
        .into_iter()
        .filter_map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .as_deref()
                .and_then(parse_stat_cpu_ticks)
        })
        .sum();
    ticks as f64 / TICKS_PER_S
}

/// A measurement window over a browser's process tree.
pub struct CpuMeter {
    pid: u32,
    cpu0: f64,
    t0: Instant,
}

impl CpuMeter {
    pub fn start(pid: u32) -> CpuMeter {
        CpuMeter {
            pid,
            cpu0: tree_cpu_s(pid),
            t0: Instant::now(),
        }
    }

    /// Percent of one core per page since [`CpuMeter::start`].
    pub fn percent_per_page(&self, pages: usize) -> f64 {
        let wall = self.t0.elapsed().as_secs_f64().max(1e-3);
        let cpu = (tree_cpu_s(self.pid) - self.cpu0).max(0.0);
        cpu / wall / pages.max(1) as f64 * 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime() {
        let stat =
            "1234 (chromium (rend)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(300));
        assert_eq!(parse_stat_ppid(stat), Some(1));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        assert_eq!(parse_stat_cpu_ticks("1 (x)"), None);
    }

    #[test]
    fn own_process_uses_cpu() {
        let s = tree_cpu_s(std::process::id());
        assert!(s >= 0.0);
    }
}
