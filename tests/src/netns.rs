//! Network namespaces owned by a test, and processes run inside them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// `kpt<pid>-<n>`: unique per process and call, short enough to prefix
/// namespace names. The first call also removes what killed test processes
/// left behind.
pub fn unique_id() -> String {
    static REAPED: std::sync::Once = std::sync::Once::new();
    REAPED.call_once(crate::leftovers::reap);
    format!(
        "kpt{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command to completion; a failure names the command and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    output(&mut cmd, &format!("{program} {}", args.join(" ")))
        .with_context(|| format!("running {program} (if it is missing, run `cargo xtask setup`)"))
}

/// Runs a prepared command (stdin closed) and returns its stdout; a failure
/// names `shown` and the command's stderr.
pub fn output(cmd: &mut Command, shown: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace created by a test; deleted on drop, even on panic.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: String) -> Result<NetNs> {
        run("ip", &["netns", "add", &name]).with_context(|| {
            format!("creating network namespace {name}: the namespace tests need root")
        })?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", self.name.as_str(), program];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Writes sysctls of this namespace (`net/ipv4/ip_forward` = `1`), through
    /// /proc/sys as seen from inside it.
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> Result<()> {
        let script: String = settings
            .iter()
            .map(|(k, v)| format!("echo {v} > /proc/sys/{k} && "))
            .collect::<String>()
            + "true";
        self.exec("sh", &["-c", &script]).map(drop)
    }

    /// Turns checksum offload off, so a wrong checksum written by a
    /// dataplane is dropped by the receiving kernel instead of passing.
    pub fn no_offload(&self, dev: &str) -> Result<()> {
        self.exec("ethtool", &["-K", dev, "tx", "off", "rx", "off"])
            .map(drop)
            .with_context(|| {
                format!(
                    "ethtool -K {dev} in {} (apt-get install ethtool)",
                    self.name
                )
            })
    }

    /// A `Command` that runs `program` inside this namespace (and, when
    /// `cgroup` is given, inside that cgroup: socket hooks apply per cgroup).
    ///
    /// The child enters the namespace with setns(2) rather than through
    /// `ip netns exec`, which also makes a new mount namespace with a fresh
    /// /sys: the cgroup2 mount under /sys (that ebpf mode attaches to) would
    /// then be gone for the child.
    pub fn command(&self, program: &str, cgroup: Option<&std::path::Path>) -> Command {
        command_in(&self.name, program, cgroup)
    }

    /// Runs `f` on a fresh thread that has entered this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        enter(&self.name, f)
    }
}

/// A `Command` that runs `program` inside the named namespace (see
/// [`NetNs::command`]); for callers that manage the namespace themselves.
pub fn command_in(
    ns: &str,
    program: impl AsRef<std::ffi::OsStr>,
    cgroup: Option<&std::path::Path>,
) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(program);
    let ns_path = format!("/var/run/netns/{ns}");
    let ns_file = File::open(&ns_path).unwrap_or_else(|e| panic!("opening {ns_path}: {e}"));
    let procs = cgroup.map(|dir| {
        std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
            .expect("cgroup path without NUL")
    });
    // SAFETY: only async-signal-safe work between fork and exec:
    // open/write/close/setns through libc, no allocation (the path and
    // the namespace fd are prepared before fork).
    unsafe {
        cmd.pre_exec(move || {
            // A test or bench killed outright must not leave its kproxy
            // running (it would hold the xtables lock and skew what runs
            // next). Ends with the thread that spawned it: the test's own.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(path) = &procs {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if rc != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Runs `f` on a fresh thread that has entered the named namespace (for
/// callers that outlive a borrow of its [`NetNs`], such as a listener binder).
pub fn enter<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/var/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            let file = File::open(&path).with_context(|| format!("open {path}"))?;
            // SAFETY: plain syscall on a valid fd; only this thread moves.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                bail!("setns into {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {name} panicked"))?
    })
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}
