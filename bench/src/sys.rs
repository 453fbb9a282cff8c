//! Namespaces, child processes and a tiny HTTP client, each cleaned up on Drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kproxy_tests::cgroup::Cgroup;
use kproxy_tests::netns::NetNs;

/// A unique name `kpt<pid>-<n>-<role>` for namespaces, cgroups and
/// directories: the test harness's scheme, so what a killed bench left
/// behind is removed by the next test or bench process.
pub fn unique(role: &str) -> String {
    format!("{}-{role}", kproxy_tests::netns::unique_id())
}

pub use kproxy_tests::netns::run;

/// A network namespace we created (the test harness's, deleted on Drop),
/// plus threads that run inside it.
pub struct Netns(NetNs);

impl std::ops::Deref for Netns {
    type Target = NetNs;
    fn deref(&self) -> &NetNs {
        &self.0
    }
}

impl Netns {
    pub fn new(role: &str) -> Result<Self> {
        Ok(Netns(NetNs::new(unique(role))?))
    }

    /// PROGRAM inside the namespace, not yet spawned (see [`NetNs::command`]).
    pub fn command(&self, program: &Path) -> Command {
        kproxy_tests::netns::command_in(&self.name, program, None)
    }

    /// PROGRAM inside the namespace and inside `cgroup`.
    pub fn command_in(&self, program: &Path, cgroup: &Path) -> Command {
        kproxy_tests::netns::command_in(&self.name, program, Some(cgroup))
    }

    /// Sets a sysctl inside the namespace (`net.ipv4.ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.sysctls(&[(&key.replace('.', "/"), value)])
    }

    /// Runs `f` on a fresh thread inside the namespace, waiting for its result.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        self.enter(f)?
    }
}

/// A child process we started: SIGTERM then SIGKILL by PID on Drop.
pub struct Proc {
    pub child: Child,
    pub what: String,
    pub log: Option<PathBuf>,
}

impl Proc {
    /// Spawns `cmd` (stdin as the caller set it: inherited by default).
    pub fn spawn(mut cmd: Command, what: &str, log: Option<&Path>) -> Result<Self> {
        if let Some(log) = log {
            let f = std::fs::File::create(log)
                .with_context(|| format!("creating {}", log.display()))?;
            cmd.stdout(f.try_clone()?).stderr(f);
        }
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Proc {
            child,
            what: what.to_string(),
            log: log.map(Path::to_path_buf),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process has already exited, quoting the end of its log.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited early ({st}){}", self.what, self.log_tail());
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let Some(log) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n  ");
        format!("; last log lines ({}):\n  {tail}", log.display())
    }

    /// Resident memory (VmRSS) in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let st = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        st.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no VmRSS for {} (pid {})", self.what, self.pid()))
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A scratch directory removed on Drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(role: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(unique(role));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Minimal HTTP/1.0 GET: (status, body). Must be called from a thread inside the right namespace.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP response from {addr}{path}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The bpffs instance `--proxy-mode ebpf` pins into for one run, mounted
/// for it: unmounting drops every pin, so links detach and maps go.
pub struct Bpffs(pub PathBuf);

impl Bpffs {
    pub fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("bpffs"));
        std::fs::create_dir_all(&dir)?;
        run("mount", &["-t", "bpf", "bpf", &dir.to_string_lossy()])?;
        Ok(Bpffs(dir))
    }

    /// kproxy flags for ebpf mode: pins here, socket hooks on `cgroup`,
    /// TC programs on `devices` (comma-separated).
    pub fn args(&self, cgroup: &Path, devices: &str) -> Vec<String> {
        vec![
            "--proxy-mode".into(),
            "ebpf".into(),
            "--bpf-pin-path".into(),
            self.0.join("kproxy").to_string_lossy().into_owned(),
            "--cgroup-root".into(),
            cgroup.to_string_lossy().into_owned(),
            "--devices".into(),
            devices.into(),
        ]
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A cgroup of the bench with child cgroups; children are removed before
/// the parent (a cgroup with children cannot be removed).
pub struct CgroupTree {
    pub children: Vec<Cgroup>,
    pub root: Cgroup,
}

impl CgroupTree {
    pub fn new(role: &str, children: &[&str]) -> Result<Self> {
        let name = unique(role);
        let root = Cgroup::new(&name)?;
        let children = children
            .iter()
            .map(|c| Cgroup::new(&format!("{name}/{c}")))
            .collect::<Result<Vec<_>>>()?;
        Ok(CgroupTree { children, root })
    }

    pub fn child(&self, name: &str) -> &Path {
        self.children
            .iter()
            .find(|c| c.path.file_name().is_some_and(|f| f == name))
            .map(|c| c.path())
            .unwrap_or_else(|| panic!("no child cgroup {name}"))
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        // Children first: their Drop waits for their processes to be gone.
        self.children.clear();
    }
}

/// The machine a run measured on.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub memory_gib: f64,
    /// /proc/loadavg at the start and at the end of the run (1, 5, 15 min).
    pub load_start: [f64; 3],
    pub load_end: Option<[f64; 3]>,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cpu_model: cpu_model(&cpuinfo),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            memory_gib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .map(|kib| kib / 1024.0 / 1024.0)
                .unwrap_or(0.0),
            load_start: load_average(),
            load_end: None,
        }
    }

    /// The machine was busy at the start: more runnable work than half its
    /// CPUs over the last minute (what other processes do to the numbers).
    pub fn busy(&self) -> bool {
        self.load_start[0] > self.cpus as f64 * 0.5
    }
}

fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn load_average() -> [f64; 3] {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").unwrap_or_default())
}

fn parse_loadavg(text: &str) -> [f64; 3] {
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
    [
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
    ]
}

/// CPU time used by every process of a cgroup and its children, µs
/// (`usage_usec` of cgroup v2's cpu.stat; present without the cpu controller).
pub fn cgroup_cpu_usec(cgroup: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(cgroup.join("cpu.stat"))
        .with_context(|| format!("reading {}/cpu.stat", cgroup.display()))?;
    parse_cpu_stat(&text).with_context(|| format!("no usage_usec in {}/cpu.stat", cgroup.display()))
}

fn parse_cpu_stat(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// Memory locked by the BPF maps a process holds (the `memlock` that
/// `bpftool map show` prints), summed over distinct maps, bytes; read from
/// the fdinfo of the process's map file descriptors.
pub fn bpf_map_memlock(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    let mut seen = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy() != "anon_inode:bpf-map" {
            continue;
        }
        let fdinfo = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        if let Some((id, memlock)) = std::fs::read_to_string(&fdinfo)
            .ok()
            .as_deref()
            .and_then(parse_map_fdinfo)
        {
            seen.insert(id, memlock);
        }
    }
    Ok(seen.values().sum())
}

/// (map_id, memlock) of a BPF map's fdinfo.
fn parse_map_fdinfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((field("map_id")?, field("memlock")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(
            parse_loadavg("1.50 0.71 0.27 2/345 6789\n"),
            [1.5, 0.71, 0.27]
        );
        assert!(parse_loadavg("")[0].is_nan());
        assert_eq!(
            cpu_model("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"),
            "Intel(R) Xeon(R) Processor"
        );
        let stat = "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n";
        assert_eq!(parse_cpu_stat(stat), Some(123_456));
        assert_eq!(parse_cpu_stat("user_usec 1\n"), None);
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t1\nkey_size:\t12\nvalue_size:\t8\nmax_entries:\t65536\nmap_flags:\t0x0\nmap_extra:\t0x0\nmemlock:\t1576960\nmap_id:\t42\nfrozen:\t0\n";
        assert_eq!(parse_map_fdinfo(fdinfo), Some((42, 1_576_960)));
        assert_eq!(parse_map_fdinfo("prog_type:\t8\nmemlock:\t4096\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let m = Machine::read();
        assert!(m.cpus >= 1 && !m.kernel.is_empty());
        // No maps held: zero, not an error.
        assert_eq!(bpf_map_memlock(std::process::id()).unwrap(), 0);
    }
}
