//! Operating-system facts the load test needs: CPU time and resident memory of a process
//! (ours or the server's) read from `/proc`, and the open-files limit. Everything here is a
//! thin, synchronous read; the parsing is split out as pure functions so it can be tested
//! on sample text without a running process.

use std::io;

/// CPU time and resident set size of one process at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// utime + stime, in nanoseconds. Converted from clock ticks at read time so that
    /// callers never have to know `CLK_TCK`.
    pub cpu_ns: u64,
    /// `VmRSS` in bytes; `None` when the kernel did not report it (zombie process).
    pub rss_bytes: Option<u64>,
}

/// Reads `/proc/PID/stat` and `/proc/PID/status` (`pid` of `None` means this process).
///
/// # Errors
/// Fails when the process does not exist or the files do not parse.
pub fn sample(pid: Option<u32>) -> io::Result<ProcSample> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}"),
        None => "/proc/self".to_string(),
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat"))?;
    let ticks = parse_stat_cpu_ticks(&stat).ok_or_else(|| bad_data("unparsable stat line"))?;
    let status = std::fs::read_to_string(format!("{dir}/status"))?;
    Ok(ProcSample {
        cpu_ns: ticks_to_ns(ticks, clock_ticks_per_sec()),
        rss_bytes: parse_status_rss_kb(&status).map(|kb| kb * 1024),
    })
}

/// Open file descriptors of process `pid`: the entries of `/proc/PID/fd`. For a server
/// that is one per connection plus a fixed set (listener, store, epoll, ...), so the
/// count less the open connections must stay put while connections come and go.
///
/// # Errors
/// Fails when the process does not exist or is not ours to inspect.
pub fn fd_count(pid: u32) -> io::Result<u64> {
    let mut n = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        entry?;
        n += 1;
    }
    Ok(n)
}

/// The one-minute load average (`/proc/loadavg`): on a shared machine it says how much
/// else was running beside the test.
pub fn load_average() -> Option<f64> {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

/// The first field of a `/proc/loadavg` text.
pub fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_ascii_whitespace().next()?.parse().ok()
}

fn bad_data(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Returns utime + stime (fields 14 and 15 of `proc(5)`), in clock ticks.
///
/// The command name (field 2) is in parentheses and may itself contain spaces and
/// parentheses, so fields are counted from the *last* `)`, as `proc(5)` advises.
pub fn parse_stat_cpu_ticks(line: &str) -> Option<u64> {
    let after_comm = &line[line.rfind(')')? + 1..];
    // after_comm starts at field 3 (state); utime is field 14, stime field 15.
    let mut fields = after_comm.split_ascii_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Returns the `VmRSS:` value of a `/proc/PID/status` text, in kB.
pub fn parse_status_rss_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_ascii_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn ticks_to_ns(ticks: u64, per_sec: u64) -> u64 {
    ticks.saturating_mul(1_000_000_000) / per_sec.max(1)
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit.
/// Every client connection is one file descriptor, and the default soft limit (often
/// 1024) is far below the 19,000 connections a full test opens.
///
/// # Errors
/// Fails when `getrlimit`/`setrlimit` fail.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; raising soft up to hard is always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// Size of the kernel's ephemeral port range: how many connections one source address can
/// open to one server address. `None` when the sysctl cannot be read.
pub fn ephemeral_port_count() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_ascii_whitespace().map(str::parse::<usize>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    Some(hi.saturating_sub(lo) + 1)
}

/// The kernel's `TcpExt: ListenOverflows` counter: connection attempts dropped because a
/// listener's accept queue was full (system-wide; on loopback during a ramp that is the
/// server's). Each drop costs the client a 1 s SYN retransmit, which shows up as a slow
/// ramp.
pub fn listen_overflows() -> Option<u64> {
    parse_netstat_field(
        &std::fs::read_to_string("/proc/net/netstat").ok()?,
        "TcpExt:",
        "ListenOverflows",
    )
}

/// Finds `field` in a `/proc/net/netstat` text: each section is a header line of names
/// followed by a line of values, both starting with `section`.
pub fn parse_netstat_field(text: &str, section: &str, field: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(section));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let pos = names.split_ascii_whitespace().position(|n| n == field);
        if let Some(i) = pos {
            return values.split_ascii_whitespace().nth(i)?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_tricky_comm() {
        // A comm with spaces and a ')' must not shift the field count.
        let line = "4242 (tick fan) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    350 125 0 0 20 0 3 0 98765 123456789 2048 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(line), Some(475));
    }

    #[test]
    fn stat_line_plain() {
        let line = "1 (tickfan) R 0 1 1 0 -1 0 0 0 0 0 7 3 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_stat_cpu_ticks(line), Some(10));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        assert_eq!(parse_stat_cpu_ticks("1 (x) R 0"), None);
    }

    #[test]
    fn status_rss() {
        let status = "Name:\ttickfan\nVmPeak:\t  200000 kB\nVmRSS:\t   51200 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss_kb(status), Some(51200));
        assert_eq!(parse_status_rss_kb("Name:\tzombie\n"), None);
    }

    #[test]
    fn netstat_field() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                    TcpExt: 0 55 56\n\
                    IpExt: InNoRoutes ListenOverflows\n\
                    IpExt: 1 2\n";
        assert_eq!(
            parse_netstat_field(text, "TcpExt:", "ListenOverflows"),
            Some(55)
        );
        assert_eq!(
            parse_netstat_field(text, "IpExt:", "ListenOverflows"),
            Some(2)
        );
        assert_eq!(parse_netstat_field(text, "TcpExt:", "Nope"), None);
    }

    #[test]
    fn ticks_convert_to_ns() {
        assert_eq!(ticks_to_ns(250, 100), 2_500_000_000);
        assert_eq!(ticks_to_ns(1, 0), 1_000_000_000);
    }

    #[test]
    fn loadavg_first_field() {
        assert_eq!(parse_loadavg("2.53 1.10 0.80 3/412 9999\n"), Some(2.53));
        assert_eq!(parse_loadavg(""), None);
    }

    #[test]
    fn fd_count_sees_a_new_file() {
        let pid = std::process::id();
        let before = fd_count(pid).expect("own fd dir");
        let f = std::fs::File::open("/proc/self/status").expect("open");
        // Other test threads may open files too, so only a lower bound holds.
        assert!(fd_count(pid).expect("own fd dir") >= 1);
        drop(f);
        assert!(before >= 3, "stdin/stdout/stderr at least: {before}");
    }

    #[test]
    fn sample_self_works() {
        let s = sample(None).expect("own /proc entry");
        assert!(s.rss_bytes.unwrap_or(0) > 0);
    }
}
