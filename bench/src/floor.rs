//! The floors: what applying the same Services costs at least, with no
//! kproxy involved. `kproxy render` output restored with
//! `iptables-<backend>-restore`, and a kube-proxy-shaped nftables ruleset
//! loaded with `nft -f`, each into a fresh namespace.

use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::manifests::{CLUSTER_CIDR, NODE_NAME};
use crate::sys::Netns;
use crate::topo::node_address;

/// iptables flavour: kproxy's `--iptables-backend` and the floor's restore binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    pub fn tool(self, what: &str) -> String {
        format!("iptables-{}-{what}", self.name())
    }
}

/// Writes `kproxy render` output for `manifests` into `out`, in a
/// namespace with the measured node's address (render looks up node
/// addresses). Returns the number of `-A` rules rendered.
pub fn render(kproxy: &Path, manifests: &Path, out: &Path) -> Result<usize> {
    let ns = Netns::new("render")?;
    let peer = Netns::new("render-peer")?;
    node_address(&ns, &peer)?;
    let f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let res = ns
        .command(kproxy)
        .args(["render", "--manifests"])
        .arg(manifests)
        .args([
            "--hostname-override",
            NODE_NAME,
            "--cluster-cidr",
            CLUSTER_CIDR,
        ])
        .stdin(Stdio::null())
        .stdout(f)
        .output()
        .with_context(|| format!("starting {} render", kproxy.display()))?;
    if !res.status.success() {
        bail!(
            "`kproxy render --manifests {}` failed ({}): {}",
            manifests.display(),
            res.status,
            String::from_utf8_lossy(&res.stderr).trim()
        );
    }
    let text = std::fs::read_to_string(out)?;
    let rules = text.lines().filter(|l| l.starts_with("-A")).count();
    if rules == 0 {
        bail!(
            "`kproxy render` printed no rules for {}",
            manifests.display()
        );
    }
    Ok(rules)
}

/// How a timed load ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Timed {
    Done(f64),
    /// Still running after the cap (seconds): killed.
    Capped(f64),
}

/// Runs `program args < input` inside `ns`, timed, killed after `cap`.
pub fn timed_load(
    ns: &Netns,
    program: &str,
    args: &[&str],
    input: &Path,
    cap: Duration,
) -> Result<Timed> {
    let stdin = File::open(input).with_context(|| format!("opening {}", input.display()))?;
    // Entered with setns by the harness: the load dies with the bench.
    let mut cmd = ns.command(Path::new(program));
    cmd.args(args)
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            let secs = start.elapsed().as_secs_f64();
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!(
                    "{program} {} < {} failed ({status}): {}",
                    args.join(" "),
                    input.display(),
                    err.trim()
                );
            }
            return Ok(Timed::Done(secs));
        }
        if start.elapsed() > cap {
            // Our own child, by PID.
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Timed::Capped(cap.as_secs_f64()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One `iptables-<backend>-restore --noflush` of rendered rules into a
/// fresh namespace (the time includes starting the tool, about a ms).
pub fn restore(rules: &Path, backend: Backend, cap: Duration) -> Result<Timed> {
    let ns = Netns::new("floor")?;
    timed_load(&ns, &backend.tool("restore"), &["--noflush"], rules, cap)
}
