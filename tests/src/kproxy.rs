//! Locating the `kproxy` binary and running it inside a node namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use crate::netns::NetNs;

/// The dataplane a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Ebpf,
}

impl Mode {
    pub fn flag(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Ebpf => "ebpf",
        }
    }
}

/// The kproxy binary: `$KPROXY_BIN`, else built once per test process with
/// `cargo build -p kproxy` so the tests never run a stale binary.
pub fn binary() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn locate() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("KPROXY_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("KPROXY_BIN={} does not exist", bin.display());
        }
        return Ok(bin);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let status = Command::new(&cargo)
        .args(["build", "-p", "kproxy", "--bin", "kproxy"])
        .current_dir(workspace)
        .status()
        .with_context(|| format!("running {cargo} build -p kproxy"))?;
    if !status.success() {
        bail!("cargo build -p kproxy failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target.join("debug").join("kproxy");
    if !bin.is_file() {
        bail!("built kproxy but found no binary at {}", bin.display());
    }
    Ok(bin)
}

/// What a node's kproxy is started with.
#[derive(Debug, Clone)]
pub struct KproxyConfig {
    pub mode: Mode,
    pub node_name: String,
    pub manifests: PathBuf,
    /// Cluster mode: watch the API server of this kubeconfig instead of
    /// reading `manifests`.
    pub kubeconfig: Option<PathBuf>,
    pub cluster_cidr: String,
    /// ebpf mode: the cgroup whose sockets are load-balanced.
    pub cgroup: Option<PathBuf>,
    /// ebpf mode: per-instance bpffs pin directory.
    pub pin_path: Option<PathBuf>,
    pub log: PathBuf,
    pub extra_args: Vec<String>,
}

impl KproxyConfig {
    /// The `--proxy-mode` flag and what that mode needs.
    pub fn mode_args(&self) -> Vec<String> {
        let mut args = vec!["--proxy-mode".to_string(), self.mode.flag().to_string()];
        if self.mode == Mode::Ebpf {
            if let Some(cg) = &self.cgroup {
                args.push("--cgroup-root".into());
                args.push(cg.display().to_string());
            }
            if let Some(pin) = &self.pin_path {
                args.push("--bpf-pin-path".into());
                args.push(pin.display().to_string());
            }
        }
        args
    }

    /// `run` with its flags, as [`KproxyProcess::start`] passes them.
    pub fn run_args(&self) -> Result<Vec<String>> {
        let mut args = vec!["run".to_string()];
        args.extend(self.mode_args());
        match &self.kubeconfig {
            Some(kc) => args.extend(["--kubeconfig".into(), path_text(kc)?]),
            None => args.extend(["--manifests".into(), path_text(&self.manifests)?]),
        }
        args.extend([
            "--hostname-override".into(),
            self.node_name.clone(),
            "--cluster-cidr".into(),
            self.cluster_cidr.clone(),
            "--iptables-min-sync-period".into(),
            "100ms".into(),
        ]);
        args.extend(self.extra_args.iter().cloned());
        Ok(args)
    }
}

fn path_text(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// A running `kproxy run` in a node namespace; SIGTERMed and reaped on drop.
pub struct KproxyProcess {
    child: Child,
}

impl KproxyProcess {
    pub fn start(ns: &NetNs, config: &KproxyConfig) -> Result<KproxyProcess> {
        let bin = binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.log)
            .with_context(|| format!("opening {}", config.log.display()))?;
        let mut cmd = ns.command(bin.to_str().context("kproxy path is not UTF-8")?, None);
        cmd.args(config.run_args()?)
            .env("RUST_LOG", "kproxy=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting kproxy")?;
        Ok(KproxyProcess { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM (as a DaemonSet rolling update does) and wait for the exit.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Ok(status);
        }
        // `ip netns exec` execs kproxy, so the child's pid is kproxy's.
        // SAFETY: signalling a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let status = self.child.wait()?;
                bail!("kproxy did not stop within 10s of SIGTERM (killed: {status})");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for KproxyProcess {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

/// Runs a one-shot kproxy subcommand (`status`, `cleanup`) in a namespace.
pub fn run_command(ns: &NetNs, config: &KproxyConfig, args: &[&str]) -> Result<String> {
    let bin = binary()?;
    let mut cmd = ns.command(bin.to_str().context("kproxy path is not UTF-8")?, None);
    cmd.args(args).args(config.mode_args());
    crate::netns::output(&mut cmd, &format!("kproxy {}", args.join(" ")))
}

/// Runs `kproxy ARGS` in a namespace as a user would (`RUST_BACKTRACE=1`,
/// default logging) and waits for it to end, killing it (our own child, by
/// PID) after `timeout`: (exit status, stderr). For commands expected to
/// refuse, so a test fails instead of hanging when one does not.
pub fn run_bounded(
    ns: &NetNs,
    args: &[String],
    timeout: std::time::Duration,
) -> Result<(std::process::ExitStatus, String)> {
    use std::io::Read;
    let bin = binary()?;
    let mut child = ns
        .command(bin.to_str().context("kproxy path is not UTF-8")?, None)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kproxy")?;
    let mut pipe = child.stderr.take().context("kproxy stderr")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let status = wait_bounded(&mut child, timeout, &format!("kproxy {}", args.join(" ")))?;
    let stderr = reader.join().unwrap_or_default();
    Ok((status, stderr))
}

/// Waits for our own `child` to end; past `timeout` it is killed (by its
/// handle) and the wait is an error naming `what`, so a test fails
/// instead of hanging.
pub fn wait_bounded(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
    what: &str,
) -> Result<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} still running after {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
