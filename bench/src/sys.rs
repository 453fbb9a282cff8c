//! Namespaces, child processes and a tiny HTTP client, each cleaned up on Drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique name `kpb-<pid>-<counter>-<role>` for namespaces and directories.
pub fn unique(role: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("kpb-{}-{n}-{role}", std::process::id())
}

/// Runs a command to completion; a failure names the command and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("could not start {program} (is it installed? try `cargo xtask setup`)")
        })?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace we created; deleted on Drop (even on panic).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Result<Self> {
        let name = unique(role);
        run("ip", &["netns", "add", &name])
            .with_context(|| format!("creating network namespace {name} (needs root)"))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Runs a program inside the namespace to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", self.name.as_str(), program];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// PROGRAM inside the namespace, not yet spawned; the child's PID is the
    /// program's. Enters with setns(2), not `ip netns exec`: that remounts
    /// /sys and the child would lose the cgroup2 mount ebpf mode attaches to.
    pub fn command(&self, program: &Path) -> Command {
        kproxy_tests::netns::command_in(&self.name, program, None)
    }

    /// Sets a sysctl inside the namespace by writing /proc/sys (the procps
    /// `sysctl` tool is not on every minimal machine).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let script = format!("echo {value} > {path}");
        self.exec("sh", &["-c", &script]).map(|_| ())
    }

    /// Runs `f` on a fresh thread that has joined this namespace, so sockets
    /// it opens live there while the rest of the process stays in the root namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::spawn(move || {
            enter(&path)?;
            f()
        })
    }

    /// Like `spawn`, waiting for the result.
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.spawn(f)
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: could not delete namespace {}: {e:#}", self.name);
        }
    }
}

fn enter(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns on a valid namespace fd only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
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
    pub cgroup: PathBuf,
}

impl EbpfEnv {
    pub fn new() -> Result<Self> {
        let bpffs = std::env::temp_dir().join(unique("bpffs"));
        std::fs::create_dir_all(&bpffs)?;
        run("mount", &["-t", "bpf", "bpf", &bpffs.to_string_lossy()])?;
        let mounts = std::fs::read_to_string("/proc/mounts")?;
        let root = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .context("no cgroup2 mount in /proc/mounts: ebpf mode needs one")?;
        let cgroup = root.join(unique("cg"));
        std::fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
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
            self.cgroup.to_string_lossy().into_owned(),
            "--devices".into(),
            devices.into(),
        ]
    }
}

impl Drop for EbpfEnv {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.bpffs)
            .status();
        let _ = std::fs::remove_dir(&self.bpffs);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}
