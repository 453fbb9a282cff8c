//! Namespaces, child processes and a tiny HTTP client, each cleaned up on Drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

    /// Sets a sysctl inside the namespace (`net.ipv4.ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.sysctls(&[(&key.replace('.', "/"), value)])
    }

    /// Runs `f` on a fresh thread that has joined this namespace, so sockets
    /// it opens live there while the rest of the process stays in the root namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let name = self.name.clone();
        std::thread::spawn(move || kproxy_tests::netns::enter(&name, f)?)
    }

    /// Like `spawn`, waiting for the result.
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
    pub fn spawn(mut cmd: Command, what: &str, log: Option<&Path>) -> Result<Self> {
        cmd.stdin(Stdio::null());
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

/// What `--proxy-mode ebpf` needs for one run: a bpffs instance mounted for
/// it (the pin path; unmounting drops every pin, so links detach and maps
/// go) and a cgroup under the cgroup2 mount for the socket hooks.
pub struct EbpfEnv {
    pub bpffs: PathBuf,
    pub cgroup: Cgroup,
}

impl EbpfEnv {
    pub fn new() -> Result<Self> {
        let bpffs = std::env::temp_dir().join(unique("bpffs"));
        std::fs::create_dir_all(&bpffs)?;
        run("mount", &["-t", "bpf", "bpf", &bpffs.to_string_lossy()])?;
        let cgroup = Cgroup::new(&unique("cg"))?;
        Ok(EbpfEnv { bpffs, cgroup })
    }

    /// kproxy flags for ebpf mode on `devices` (comma-separated).
    pub fn args(&self, devices: &str) -> Vec<String> {
        vec![
            "--proxy-mode".into(),
            "ebpf".into(),
            "--bpf-pin-path".into(),
            self.bpffs.join("kproxy").to_string_lossy().into_owned(),
            "--cgroup-root".into(),
            self.cgroup.path().to_string_lossy().into_owned(),
            "--devices".into(),
            devices.into(),
        ]
    }
}

impl Drop for EbpfEnv {
    // The cgroup (a field) is removed after this, by its own Drop.
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.bpffs)
            .status();
        let _ = std::fs::remove_dir(&self.bpffs);
    }
}
