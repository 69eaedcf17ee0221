//! Facts about the machine and its processes, from `/proc`.

/// CPU time (user + system) process `pid` has used so far, seconds, in clock ticks of 10 ms.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name in parentheses: the state (field 3), ... utime and stime
    // (fields 14 and 15), in USER_HZ (100 on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or_else(Vec::new, |(_, rest)| rest.split_whitespace().collect());
    match (fields.get(11), fields.get(12)) {
        (Some(user), Some(system)) => {
            let ticks = |v: &str| v.parse::<f64>().unwrap_or(f64::NAN);
            (ticks(user) + ticks(system)) / 100.0
        }
        _ => f64::NAN,
    }
}

/// Connections the kernel refused because a listen queue was full (`TcpExt:
/// ListenOverflows`; counts every program of this network namespace). Each costs its
/// client a SYN retried after 1 s (then 3 s, 7 s...).
pub fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut tcp_ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (tcp_ext.next(), tcp_ext.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// `machine: 2 CPUs (model), 23.4 GiB RAM`.
pub fn machine() -> String {
    format!(
        "machine: {} CPUs ({}), {:.1} GiB RAM",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        mem_gib()
    )
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn mem_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0)
}
