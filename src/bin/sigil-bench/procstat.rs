//! Readers for `/proc`: CPU time of a process and of its threads, RSS and
//! peak RSS, machine-wide CPU time, and the facts about the machine that a
//! benchmark report must state. Linux only; every reader returns `None`
//! (never panics) when a file is missing or unreadable.

use std::{fs, process::Command, sync::OnceLock};

/// Clock ticks per second for `utime`/`stime` (`getconf CLK_TCK`, 100 when unknown).
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .unwrap_or(100.0)
    })
}

/// `(comm, utime + stime in ticks)` from the text of a `stat` file.
fn parse_stat(text: &str) -> Option<(String, u64)> {
    // `pid (comm) state ppid …`: comm may contain spaces and parentheses,
    // so split at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // After ')': [0]=state … [11]=utime [12]=stime (fields 14 and 15 of proc(5)).
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// `(ppid, own utime + stime, reaped children's cutime + cstime)` in ticks,
/// from the text of a `stat` file.
fn parse_stat_tree(text: &str) -> Option<(u32, u64, u64)> {
    let close = text.rfind(')')?;
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // After ')': [1]=ppid, [11]=utime [12]=stime [13]=cutime [14]=cstime.
    let field = |i: usize| -> Option<u64> { rest.get(i)?.parse().ok() };
    let ppid = u32::try_from(field(1)?).ok()?;
    Some((ppid, field(11)? + field(12)?, field(13)? + field(14)?))
}

/// The command name (`comm`) of `pid`.
pub fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// The parent of `pid`.
pub fn parent_pid(pid: u32) -> Option<u32> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_tree(&text).map(|(ppid, _, _)| ppid)
}

/// CPU seconds of `pid` and its children: its own time, the time of the
/// children it has reaped (`cutime + cstime`), and the time of the live
/// ones. A child that exits between two readings moves from the third term
/// to the second, so differences stay continuous. For a server that forks a
/// process per connection (PostgreSQL's postmaster).
pub fn tree_cpu_secs(pid: u32) -> Option<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, own, reaped) = parse_stat_tree(&text)?;
    let mut ticks = own + reaped;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(child) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(text) = fs::read_to_string(entry.path().join("stat")) else {
            continue; // exited meanwhile
        };
        if let Some((ppid, t, _)) = parse_stat_tree(&text) {
            if ppid == pid && child != pid {
                ticks += t;
            }
        }
    }
    Some(ticks as f64 / clk_tck())
}

/// CPU seconds (user + system) used so far by process `pid` (all its threads,
/// including exited ones).
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text).map(|(_, t)| t as f64 / clk_tck())
}

/// CPU seconds of the live threads of `pid`, summed by the class `classify`
/// gives each thread name: returns `(class, seconds)` pairs.
pub fn threads_cpu_secs(
    pid: u32,
    classify: impl Fn(&str) -> &'static str,
) -> Vec<(&'static str, f64)> {
    let mut out: Vec<(&'static str, f64)> = Vec::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(text) = fs::read_to_string(entry.path().join("stat")) else {
            continue; // the thread exited meanwhile
        };
        if let Some((comm, ticks)) = parse_stat(&text) {
            let class = classify(&comm);
            let secs = ticks as f64 / clk_tck();
            match out.iter_mut().find(|(c, _)| *c == class) {
                Some((_, s)) => *s += secs,
                None => out.push((class, secs)),
            }
        }
    }
    out
}

/// `(VmRSS, VmHWM)` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the peak RSS (`VmHWM`) of `pid` to its current RSS (Linux ≥ 4.0).
/// Returns false when the kernel or permissions refuse.
pub fn reset_peak_rss(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Machine-wide CPU seconds summed over all cores, from `/proc/stat`.
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    /// Not idle: every process, the kernel, and steal.
    pub busy: f64,
    /// Steal: time the hypervisor ran something else while this VM had
    /// work (counted in `busy`).
    pub steal: f64,
}

/// The machine's [`MachineCpu`] counters now.
pub fn machine_cpu_secs() -> Option<MachineCpu> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let tck = clk_tck();
    Some(MachineCpu {
        busy: (total - idle) as f64 / tck,
        steal: v.get(7).copied().unwrap_or(0) as f64 / tck,
    })
}

/// Cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
}

/// Facts about the machine for a report.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Cores available to this process.
    pub nproc: usize,
    /// CPU model name.
    pub cpu_model: String,
    /// Total RAM, MiB.
    pub ram_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// `rustc --version`, or "unknown".
    pub rustc: String,
}

impl Machine {
    /// Reads the facts now.
    pub fn probe() -> Self {
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let ram_mib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        let rustc = Command::new("rustc")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into());
        Self {
            nproc: cores(),
            cpu_model,
            ram_mib,
            kernel,
            rustc,
        }
    }

    /// As JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "nproc": self.nproc,
            "cpu_model": self.cpu_model,
            "ram_mib": self.ram_mib,
            "kernel": self.kernel,
            "rustc": self.rustc,
        })
    }
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm() {
        let s = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0";
        assert_eq!(parse_stat(s), Some(("a b) c".into(), 300)));
        let s = "42 (a b) c) S 7 2 3 4 5 6 7 8 9 10 250 50 20 5 0";
        assert_eq!(parse_stat_tree(s), Some((7, 300, 25)));
        assert_eq!(parse_stat_tree("42 (x) S"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(process_cpu_secs(pid).is_some());
        let (rss, hwm) = rss_kib(pid).unwrap_or_default();
        assert!(rss > 0 && hwm >= rss);
        assert!(!threads_cpu_secs(pid, |_| "all").is_empty());
        assert!(utc_now().ends_with(" UTC"));
        let parent = parent_pid(pid).unwrap_or(0);
        assert!(parent > 0);
        // Ours first: the tree read afterwards includes it (and time only grows).
        let mine = process_cpu_secs(pid).unwrap_or(0.0);
        assert!(tree_cpu_secs(parent).unwrap_or(-1.0) >= mine);
        assert!(comm(pid).is_some_and(|c| !c.is_empty()));
    }
}
