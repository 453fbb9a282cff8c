//! Running `kproxy-testpod client` inside a namespace and reading its results.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Stdio};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::netns::NetNs;

/// `$KPROXY_TESTPOD`, else next to the running executable: cargo puts bins
/// in target/<profile>/ and test executables in target/<profile>/deps/.
pub fn testpod_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("KPROXY_TESTPOD") {
        return Ok(PathBuf::from(bin));
    }
    let me = std::env::current_exe().context("current_exe")?;
    let dir = me.parent().context("exe dir")?;
    for candidate in [dir.join("kproxy-testpod"), dir.join("../kproxy-testpod")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "kproxy-testpod not found next to {}: run `cargo build -p kproxy-tests`",
        me.display()
    )
}

/// One client attempt as the testpod reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct Attempt {
    pub i: usize,
    /// Start of the attempt, ms since the Unix epoch.
    pub t: f64,
    pub ok: bool,
    /// `pod-a 10.244.1.30:40000 8080`: who answered, the client address it
    /// saw, and the port it answered on.
    pub reply: Option<String>,
    /// `refused`, `timeout`, `unreachable`, `reset`, `closed`, `other: ...`.
    pub error: Option<String>,
    pub ms: f64,
}

impl Attempt {
    /// The pod that answered.
    pub fn pod(&self) -> Option<&str> {
        self.reply.as_deref()?.split(' ').next()
    }

    /// The port the backend answered on.
    pub fn served_port(&self) -> Option<u16> {
        self.reply.as_deref()?.split(' ').nth(2)?.parse().ok()
    }

    /// The client IP the backend saw.
    pub fn seen_client_ip(&self) -> Option<&str> {
        let addr = self.reply.as_deref()?.split(' ').nth(1)?;
        addr.rsplit_once(':').map(|(ip, _)| ip)
    }
}

/// Now, in ms since the Unix epoch (to compare with [`Attempt::t`]).
pub fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// What a client run saw.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub attempts: Vec<Attempt>,
}

impl Outcome {
    /// Answers per pod name.
    pub fn by_pod(&self) -> BTreeMap<String, usize> {
        let mut map = BTreeMap::new();
        for a in &self.attempts {
            if let Some(pod) = a.pod() {
                *map.entry(pod.to_string()).or_default() += 1;
            }
        }
        map
    }

    pub fn failures(&self) -> Vec<&Attempt> {
        self.attempts.iter().filter(|a| !a.ok).collect()
    }

    pub fn all_ok(&self) -> bool {
        !self.attempts.is_empty() && self.attempts.iter().all(|a| a.ok)
    }

    /// Fails with a summary unless every attempt succeeded.
    pub fn expect_all_ok(&self, what: &str) -> Result<&Self> {
        if !self.all_ok() {
            bail!("{what}: {}", self.summary());
        }
        Ok(self)
    }

    /// `12 attempts: pod-a 6, pod-b 6; errors: refused 2`.
    pub fn summary(&self) -> String {
        let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
        for a in self.failures() {
            *errors.entry(a.error.as_deref().unwrap_or("?")).or_default() += 1;
        }
        format!(
            "{} attempts: answered by {:?}; errors {:?}",
            self.attempts.len(),
            self.by_pod(),
            errors
        )
    }
}

/// How a client run goes.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub target: String,
    pub udp: bool,
    pub count: usize,
    pub timeout_ms: u64,
    pub interval_ms: u64,
    pub hold: bool,
}

impl ClientSpec {
    pub fn tcp(target: impl Into<String>, count: usize) -> ClientSpec {
        ClientSpec {
            target: target.into(),
            udp: false,
            count,
            timeout_ms: 1000,
            interval_ms: 0,
            hold: false,
        }
    }

    pub fn udp(target: impl Into<String>, count: usize) -> ClientSpec {
        ClientSpec {
            udp: true,
            ..ClientSpec::tcp(target, count)
        }
    }

    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = ms;
        self
    }

    pub fn interval_ms(mut self, ms: u64) -> Self {
        self.interval_ms = ms;
        self
    }

    pub fn hold(mut self) -> Self {
        self.hold = true;
        self
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "client".to_string(),
            "--target".into(),
            self.target.clone(),
            "--count".into(),
            self.count.to_string(),
            "--timeout-ms".into(),
            self.timeout_ms.to_string(),
            "--interval-ms".into(),
            self.interval_ms.to_string(),
        ];
        if self.udp {
            args.push("--udp".into());
        }
        if self.hold {
            args.push("--hold".into());
        }
        args
    }
}

/// A client running in the background; collect its outcome with [`Running::wait`].
pub struct Running {
    child: Option<Child>,
}

impl Running {
    pub fn start(
        ns: &NetNs,
        cgroup: Option<&std::path::Path>,
        spec: &ClientSpec,
    ) -> Result<Running> {
        let bin = testpod_binary()?;
        let child = ns
            .command(bin.to_str().context("testpod path")?, cgroup)
            .args(spec.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kproxy-testpod client")?;
        Ok(Running { child: Some(child) })
    }

    /// Waits for the (bounded) run to end and parses its attempts.
    pub fn wait(mut self) -> Result<Outcome> {
        let child = self.child.take().expect("waited once");
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "client failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let attempts = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<Vec<Attempt>, _>>()
            .context("parsing client output")?;
        Ok(Outcome { attempts })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Only if not waited for (a test failed midway): end our own child.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
