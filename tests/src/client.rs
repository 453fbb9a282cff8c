//! Running `kproxy-testpod client` inside a namespace and reading its results.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};

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
    /// The address the client's socket said it talked to (`getpeername`,
    /// or an unconnected UDP answer's source), as `10.96.0.10:80` or
    /// `[::ffff:10.96.0.10]:80`.
    #[serde(default)]
    pub peer: Option<String>,
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
    /// UDP with sendto/recvfrom instead of connect/send/recv.
    pub unconnected: bool,
    pub count: usize,
    pub timeout_ms: u64,
    pub interval_ms: u64,
    pub hold: bool,
    /// More `kproxy-testpod client` flags (`--size N`, `--download N`).
    pub extra: Vec<String>,
}

impl ClientSpec {
    pub fn tcp(target: impl Into<String>, count: usize) -> ClientSpec {
        ClientSpec {
            target: target.into(),
            udp: false,
            unconnected: false,
            count,
            timeout_ms: 1000,
            interval_ms: 0,
            hold: false,
            extra: Vec::new(),
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

    /// UDP over an unconnected socket (`sendto`/`recvfrom`).
    pub fn unconnected(mut self) -> Self {
        self.unconnected = true;
        self
    }

    pub fn hold(mut self) -> Self {
        self.hold = true;
        self
    }

    /// TCP: after the answer, read until the server closes (an HTTP/1.0
    /// client), so a `--tcp-close-first` server always closes first.
    pub fn until_eof(mut self) -> Self {
        self.extra.push("--until-eof".into());
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
        if self.unconnected {
            args.push("--unconnected".into());
        }
        if self.hold {
            args.push("--hold".into());
        }
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// A client running in the background. Its attempts are read as it prints
/// them, so a test can wait for traffic to be demonstrably flowing
/// ([`Running::wait_until`]) and end a long run early ([`Running::stop`]).
pub struct Running {
    child: Option<Child>,
    seen: Arc<Mutex<Vec<Attempt>>>,
    reader: Option<std::thread::JoinHandle<Result<()>>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Running {
    pub fn start(
        ns: &NetNs,
        cgroup: Option<&std::path::Path>,
        spec: &ClientSpec,
    ) -> Result<Running> {
        let bin = testpod_binary()?;
        let mut child = ns
            .command(bin.to_str().context("testpod path")?, cgroup)
            .args(spec.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kproxy-testpod client")?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().context("client stdout")?;
        let sink = seen.clone();
        let reader = std::thread::spawn(move || -> Result<()> {
            for line in BufReader::new(stdout).lines() {
                let attempt: Attempt =
                    serde_json::from_str(&line?).context("parsing client output")?;
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(attempt);
            }
            Ok(())
        });
        let mut err_pipe = child.stderr.take().context("client stderr")?;
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err_pipe.read_to_string(&mut text);
            text
        });
        Ok(Running {
            child: Some(child),
            seen,
            reader: Some(reader),
            stderr: Some(stderr),
        })
    }

    /// The attempts printed so far.
    pub fn attempts_so_far(&self) -> Vec<Attempt> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Polls (with `timeout`) until `pred` holds for the attempts so far.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: std::time::Duration,
        pred: impl Fn(&[Attempt]) -> bool,
    ) -> Result<()> {
        crate::poll::until(what, timeout, || {
            let so_far = self.attempts_so_far();
            if pred(&so_far) {
                return Ok(());
            }
            bail!("so far {}", Outcome { attempts: so_far }.summary())
        })
    }

    /// Waits for the (bounded) run to end and returns its attempts.
    pub fn wait(mut self) -> Result<Outcome> {
        let mut child = self.child.take().expect("waited once");
        let status = child.wait()?;
        let (outcome, stderr) = self.collect()?;
        if !status.success() {
            bail!("client failed ({status}): {}", stderr.trim());
        }
        Ok(outcome)
    }

    /// Ends the run now (our own child, by PID) and returns the attempts it
    /// completed; an attempt in flight is not counted.
    pub fn stop(mut self) -> Result<Outcome> {
        let mut child = self.child.take().expect("stopped once");
        let _ = child.kill();
        child.wait()?;
        Ok(self.collect()?.0)
    }

    fn collect(&mut self) -> Result<(Outcome, String)> {
        let reader = self.reader.take().expect("collected once");
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("client output reader panicked"))??;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let attempts = std::mem::take(&mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()));
        Ok((Outcome { attempts }, stderr))
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
