//! kproxy started the way installers start kube-proxy (fixtures in
//! `tests/fixtures/installers/`), with the binary installed as `kube-proxy`
//! and `go-runner` as the image does, in a network namespace of its own
//! where no API server answers. A healthy result is what a kubelet wants of
//! a kube-proxy pod in that situation: it stays up and answers `/healthz`
//! (503, saying it waits for the API server), instead of exiting.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use kproxy_tests::netns::{unique_id, NetNs};
use kproxy_tests::{poll, Topology};

const NODE: &str = "node-1";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/installers")
}

/// A kubeconfig for an API server that is not there (127.0.0.1:6443 in
/// the test's namespace).
const KUBECONFIG: &str = r#"apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    server: https://127.0.0.1:6443
    insecure-skip-tls-verify: true
users:
- name: u
  user:
    token: not-a-real-token
contexts:
- name: c
  context: {cluster: c, user: u}
current-context: c
"#;

/// One installer's start-up, rewritten into the test's directory.
struct Started {
    ns: NetNs,
    child: Child,
    dir: tempfile::TempDir,
    log: PathBuf,
}

impl Started {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `command` (a fixture's, one argument per item) after rewriting
/// host paths into a fresh directory and writing `config` where the
/// command expects it.
fn start(name: &str, command: Vec<String>, config: Option<(&str, String)>) -> Result<Started> {
    let id = unique_id();
    let ns = NetNs::new(format!("{id}-inst"))?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("{id}-installer"))
        .tempdir()?;
    let root = dir.path().to_path_buf();
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin)?;
    let kproxy = kproxy_tests::kproxy::binary()?;
    for alias in ["kube-proxy", "go-runner"] {
        std::os::unix::fs::symlink(&kproxy, bin.join(alias))?;
    }
    let r = root.display().to_string();
    let rewrite = |s: &str| {
        s.replace("/usr/local/bin/kube-proxy", &format!("{r}/bin/kube-proxy"))
            .replace("/go-runner", &format!("{r}/bin/go-runner"))
            .replace("/var/lib/", &format!("{r}/var/lib/"))
            .replace("/var/log/", &format!("{r}/var/log/"))
            .replace("@NODE@", NODE)
    };
    for d in [
        "var/lib/kube-proxy",
        "var/lib/kube-proxy-config",
        "var/lib/rancher/rke2/agent",
        "var/log",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    for kc in [
        "var/lib/kube-proxy/kubeconfig.conf",
        "var/lib/kube-proxy/kubeconfig",
        "var/lib/rancher/rke2/agent/kubeproxy.kubeconfig",
    ] {
        std::fs::write(root.join(kc), KUBECONFIG)?;
    }
    if let Some((path, text)) = config {
        std::fs::write(rewrite(path), rewrite(&text))?;
    }
    let args: Vec<String> = command.iter().map(|a| rewrite(a)).collect();
    let log = root.join("stdout-stderr.log");
    let out = std::fs::File::create(&log)?;
    let mut cmd = ns.command(&args[0], None);
    cmd.args(&args[1..])
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env_remove("RUST_LOG")
        .env_remove("NODE_NAME")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = cmd
        .spawn()
        .with_context(|| format!("{name}: starting {args:?}"))?;
    Ok(Started {
        ns,
        child,
        dir,
        log,
    })
}

/// Waits for `/healthz` to answer 503 "waiting for the Kubernetes API
/// server" on `addr`, then checks the process is still running.
fn expect_up_and_answering(name: &str, s: &mut Started, addr: &str) -> Result<()> {
    let body = poll::until(
        &format!("{name}: /healthz on {addr}"),
        Duration::from_secs(30),
        || {
            if let Some(status) = s.child.try_wait()? {
                bail!("exited with {status}");
            }
            let (code, body) = Topology::http_get(&s.ns, addr, "/healthz")?;
            ensure!(code == 503, "{code} {body}");
            // Once the first list failed, the reason says so.
            ensure!(
                body.contains("waiting for the Kubernetes API server"),
                "/healthz should say why it is not ready: {body}"
            );
            Ok(body)
        },
    )
    .with_context(|| format!("{name}: output:\n{}", s.log_text()))?;
    drop(body);
    // It has seen the API server fail (and retries) and is still up.
    poll::until(
        &format!("{name}: an API error in the log"),
        Duration::from_secs(30),
        || {
            ensure!(
                s.log_text().contains("Kubernetes API error"),
                "no API error logged yet"
            );
            Ok(())
        },
    )
    .with_context(|| format!("{name}: output:\n{}", s.log_text()))?;
    ensure!(
        s.child.try_wait()?.is_none(),
        "{name}: exited after an API error:\n{}",
        s.log_text()
    );
    Ok(())
}

/// Lowering oom_score_adj below 0 needs CAP_SYS_RESOURCE.
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0) // bit 24: CAP_SYS_RESOURCE
}

/// The proxy's oom_score_adj is `want`; without CAP_SYS_RESOURCE (some
/// sandboxes drop it) kproxy cannot lower it and must say so.
fn expect_oom_score_adj(s: &Started, want: i32) -> Result<()> {
    if has_cap_sys_resource() {
        let got = oom_score_adj(s)?;
        ensure!(got == want, "oom_score_adj {got}, want {want}");
    } else {
        let log = s.log_text();
        ensure!(
            log.contains("cannot set oom_score_adj") && log.contains(&format!("value={want}")),
            "no CAP_SYS_RESOURCE here: kproxy must warn that it cannot set {want}:\n{log}"
        );
    }
    Ok(())
}

fn oom_score_adj(s: &Started) -> Result<i32> {
    // The fixture's program may be a wrapper; the proxy is the process
    // bound to the healthz port: find it by its name among our children.
    let mut pid = s.child.id();
    for _ in 0..3 {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
        if comm.trim() == "kube-proxy" {
            break;
        }
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?;
        pid = children
            .split_whitespace()
            .next()
            .context("no child process")?
            .parse()?;
    }
    Ok(
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))?
            .trim()
            .parse()?,
    )
}

fn read_command(fixture: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(fixtures().join(fixture).join("command"))?;
    Ok(text
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect())
}

fn read_config(fixture: &str) -> Result<String> {
    Ok(std::fs::read_to_string(
        fixtures().join(fixture).join("config.conf"),
    )?)
}

/// The container command of the first container of a DaemonSet manifest.
fn daemonset_command(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)?;
    let ds: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let mut out: Vec<String> = Vec::new();
    for key in ["command", "args"] {
        if let Some(items) = c[key].as_sequence() {
            out.extend(items.iter().filter_map(|v| v.as_str().map(str::to_string)));
        }
    }
    Ok(out)
}

#[test]
fn kubeadm() -> Result<()> {
    let mut s = start(
        "kubeadm",
        read_command("kubeadm")?,
        Some(("/var/lib/kube-proxy/config.conf", read_config("kubeadm")?)),
    )?;
    expect_up_and_answering("kubeadm", &mut s, "127.0.0.1:10256")?;
    expect_oom_score_adj(&s, -999)?;
    let warnings: Vec<String> = s
        .log_text()
        .lines()
        .filter(|l| {
            l.contains(" WARN ")
                && !l.contains("Kubernetes API error")
                && !l.contains("oom_score_adj")
        })
        .map(str::to_string)
        .collect();
    ensure!(
        warnings.is_empty(),
        "kubeadm's own config must start without warnings: {warnings:#?}"
    );
    Ok(())
}

/// deploy/kube-proxy-image-swap/daemonset.yaml is kubeadm's DaemonSet with only the
/// image changed: its command is the kubeadm fixture's, which runs above.
#[test]
fn deploys_image_swap_daemonset_runs_kubeadms_command() -> Result<()> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kube-proxy-image-swap/daemonset.yaml");
    let cmd = daemonset_command(&deploy)?;
    let want: Vec<String> = read_command("kubeadm")?
        .into_iter()
        .map(|a| a.replace("@NODE@", "$(NODE_NAME)"))
        .collect();
    ensure!(
        cmd == want,
        "{} runs {cmd:?}, kubeadm runs {want:?}",
        deploy.display()
    );
    let mut s = start(
        "image swap",
        cmd.iter()
            .map(|a| a.replace("$(NODE_NAME)", "@NODE@"))
            .collect(),
        Some(("/var/lib/kube-proxy/config.conf", read_config("kubeadm")?)),
    )?;
    expect_up_and_answering("image swap", &mut s, "127.0.0.1:10256")
}

#[test]
fn kind() -> Result<()> {
    let mut s = start(
        "kind",
        read_command("kind")?,
        Some(("/var/lib/kube-proxy/config.conf", read_config("kind")?)),
    )?;
    expect_up_and_answering("kind", &mut s, "127.0.0.1:10256")
}

#[test]
fn eks() -> Result<()> {
    let mut s = start(
        "eks",
        read_command("eks")?,
        Some(("/var/lib/kube-proxy-config/config", read_config("eks")?)),
    )?;
    expect_up_and_answering("eks", &mut s, "127.0.0.1:10256")?;
    expect_oom_score_adj(&s, -998)?;
    let log = s.log_text();
    ensure!(
        log.contains("udpIdleTimeout"),
        "the removed field is named:\n{log}"
    );
    Ok(())
}

#[test]
fn kops_through_go_runner() -> Result<()> {
    let mut s = start("kops", read_command("kops")?, None)?;
    expect_up_and_answering("kops", &mut s, "127.0.0.1:10256")?;
    expect_oom_score_adj(&s, -998)?;
    let file = s.dir.path().join("var/log/kube-proxy.log");
    poll::until("go-runner's log file", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        ensure!(text.contains("starting kproxy"), "{text:?}");
        Ok(())
    })?;
    Ok(())
}

#[test]
fn kube_up_through_a_shell() -> Result<()> {
    let mut s = start("kube-up", read_command("kube-up")?, None)?;
    s.log = s.dir.path().join("var/log/kube-proxy.log");
    // Its output goes to the log file the shell redirects to.
    expect_up_and_answering("kube-up", &mut s, "127.0.0.1:10256")?;
    let log = s.log_text();
    for named in ["--ipvs-sync-period", "--feature-gates"] {
        ensure!(log.contains(named), "{named} named in the warning:\n{log}");
    }
    expect_oom_score_adj(&s, -998)
}

#[test]
fn rke2() -> Result<()> {
    let mut s = start("rke2", read_command("rke2")?, None)?;
    expect_up_and_answering("rke2", &mut s, "127.0.0.1:10256")?;
    // --healthz-bind-address=127.0.0.1: only loopback.
    let other = Topology::http_get(&s.ns, "127.0.0.2:10256", "/healthz");
    ensure!(
        other.is_err(),
        "healthz answered outside 127.0.0.1: {other:?}"
    );
    Ok(())
}

/// A cluster whose Services are all IPv6: kproxy would serve nothing there,
/// so it refuses to start, saying why, instead of looking healthy.
#[test]
fn ipv6_only_cluster_is_refused_at_start() -> Result<()> {
    let id = unique_id();
    let ns = NetNs::new(format!("{id}-v6"))?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("{id}-v6"))
        .tempdir()?;
    std::fs::write(
        dir.path().join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: kubernetes, namespace: default}\nspec: {clusterIP: 'fd00::1', clusterIPs: ['fd00::1'], ipFamilies: [IPv6], ports: [{name: https, port: 443}]}\n",
    )?;
    let bin = kproxy_tests::kproxy::binary()?;
    let mut cmd = ns.command(bin.to_str().context("path")?, None);
    cmd.args(["run", "--manifests"])
        .arg(dir.path())
        .args(["--hostname-override", NODE])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    let out = cmd.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "must fail: {stderr}");
    ensure!(
        stderr.contains("every Service of this cluster is IPv6")
            && stderr.contains("default/kubernetes"),
        "{stderr}"
    );
    Ok(())
}

/// kube-proxy's conntrack settings, applied by `--init-only` in a network
/// namespace: the per-namespace sysctls change there (and nowhere else);
/// the kernel-wide nf_conntrack_max is left alone outside the initial
/// namespace, with a log line saying so.
#[test]
fn conntrack_sysctls_in_a_namespace() -> Result<()> {
    let id = unique_id();
    let ns = NetNs::new(format!("{id}-ct"))?;
    let read = |ns: Option<&NetNs>, name: &str| -> Result<String> {
        let path = format!("/proc/sys/net/netfilter/{name}");
        Ok(match ns {
            Some(ns) => ns.exec("cat", &[&path])?,
            None => std::fs::read_to_string(&path)?,
        }
        .trim()
        .to_string())
    };
    // The per-namespace conntrack sysctls exist once nf_conntrack is loaded.
    ensure!(
        read(Some(&ns), "nf_conntrack_tcp_timeout_established").is_ok(),
        "nf_conntrack is not loaded: `modprobe nf_conntrack` (the test needs its sysctls)"
    );
    let host_max = read(None, "nf_conntrack_max")?;
    let host_established = read(None, "nf_conntrack_tcp_timeout_established")?;
    let bin = kproxy_tests::kproxy::binary()?;
    let mut cmd = ns.command(bin.to_str().context("path")?, None);
    cmd.args([
        "--init-only",
        "--conntrack-max-per-core=1000000",
        "--conntrack-tcp-timeout-established=2h",
        "--conntrack-tcp-timeout-close-wait=30m",
        "--conntrack-tcp-be-liberal",
        "--conntrack-udp-timeout=45s",
        "--conntrack-udp-timeout-stream=3m",
        "--master=https://127.0.0.1:6443",
    ])
    .env_remove("RUST_LOG")
    .stdin(Stdio::null());
    let out = cmd.output()?;
    let log = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "--init-only failed:\n{log}");
    for (name, want) in [
        ("nf_conntrack_tcp_timeout_established", "7200"),
        ("nf_conntrack_tcp_timeout_close_wait", "1800"),
        ("nf_conntrack_tcp_be_liberal", "1"),
        ("nf_conntrack_udp_timeout", "45"),
        ("nf_conntrack_udp_timeout_stream", "180"),
    ] {
        let got = read(Some(&ns), name)?;
        ensure!(
            got == want,
            "{name} in the namespace: {got}, want {want}\n{log}"
        );
        ensure!(log.contains(name), "the change of {name} is logged:\n{log}");
    }
    ensure!(
        log.contains("not in the initial network namespace") && log.contains("nf_conntrack_max"),
        "the kernel-wide setting is skipped, and said so:\n{log}"
    );
    ensure!(
        read(None, "nf_conntrack_max")? == host_max,
        "the host's nf_conntrack_max changed"
    );
    ensure!(
        read(None, "nf_conntrack_tcp_timeout_established")? == host_established,
        "the host's namespace changed"
    );
    Ok(())
}

/// `--nodeport-addresses primary`: node ports only on the Node's primary
/// IP (its InternalIP), not on the node's other addresses.
#[test]
fn nodeport_addresses_primary() -> Result<()> {
    let id = unique_id();
    let ns = NetNs::new(format!("{id}-prim"))?;
    // A veth pair inside the namespace (no dummy module on every kernel).
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])?;
    ns.ip(&["addr", "add", "192.168.77.10/24", "dev", "eth0"])?;
    ns.ip(&["addr", "add", "192.168.88.10/24", "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["link", "set", "eth1", "up"])?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("{id}-prim"))
        .tempdir()?;
    std::fs::write(
        dir.path().join("objects.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\nstatus: {addresses: [{type: InternalIP, address: 192.168.77.10}, {type: Hostname, address: node-1}]}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {type: NodePort, clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 30080}]}\n",
    )?;
    let bin = kproxy_tests::kproxy::binary()?;
    let log = dir.path().join("log");
    let mut cmd = ns.command(bin.to_str().context("path")?, None);
    cmd.args(["--manifests"])
        .arg(dir.path())
        .args([
            "--hostname-override=node-1",
            "--nodeport-addresses=primary",
            "--iptables-backend=nft",
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.path().join("err"))?);
    let mut child = cmd.spawn()?;
    let result = poll::until(
        "node ports on the primary IP",
        Duration::from_secs(30),
        || {
            let nat = ns.exec("iptables-nft-save", &["-t", "nat"])?;
            let jumps: Vec<&str> = nat
                .lines()
                .filter(|l| l.contains("-j KPROXY-NODEPORTS"))
                .collect();
            ensure!(
                jumps.iter().any(|l| l.contains("-d 192.168.77.10/32")),
                "no jump for the primary IP yet: {jumps:?}"
            );
            ensure!(
                !jumps
                    .iter()
                    .any(|l| l.contains("192.168.88.10") || l.contains("addrtype")),
                "node ports on other addresses: {jumps:?}"
            );
            Ok(())
        },
    )
    .with_context(|| std::fs::read_to_string(dir.path().join("err")).unwrap_or_default());
    // SAFETY: our child, not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    result
}

/// `kube-proxy --cleanup` on a bare node, as runbooks use it (moving to
/// another CNI): no kubeconfig, no API server, no Pod environment. Like
/// kube-proxy it removes the rules and exits without touching sysctls; with
/// the kproxy image it removes kproxy's chains and kube-proxy's.
#[test]
fn kube_proxy_cleanup_needs_no_cluster_and_leaves_sysctls() -> Result<()> {
    const ESTABLISHED: &str = "net/netfilter/nf_conntrack_tcp_timeout_established";
    let id = unique_id();
    let ns = NetNs::new(format!("{id}-clean"))?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("{id}-clean"))
        .tempdir()?;
    let rules = dir.path().join("rules");
    std::fs::write(
        &rules,
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KPROXY-SERVICES - [0:0]\n:OTHER - [0:0]\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A PREROUTING -j KPROXY-SERVICES\n-A OUTPUT -j KPROXY-SERVICES\n\
         -A POSTROUTING -j OTHER\nCOMMIT\n\
         *filter\n:KPROXY-FIREWALL - [0:0]\n-A INPUT -j KPROXY-FIREWALL\n\
         -A KPROXY-FIREWALL -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
         COMMIT\n",
    )?;
    let rules = rules.display().to_string();
    let read = |name: &str| -> Result<Option<String>> {
        let out = ns.exec(
            "sh",
            &["-c", &format!("cat /proc/sys/{name} 2>/dev/null || true")],
        )?;
        Ok(Some(out.trim().to_string()).filter(|v| !v.is_empty()))
    };
    ns.sysctls(&[("net/ipv4/conf/all/route_localnet", "0")])?;
    // Per namespace once nf_conntrack is loaded; not every host has it.
    let conntrack = read(ESTABLISHED)?.is_some();
    if conntrack {
        ns.sysctls(&[(ESTABLISHED, "1000")])?;
    }

    let bin = dir.path().join("kube-proxy");
    std::os::unix::fs::symlink(kproxy_tests::kproxy::binary()?, &bin)?;
    // Bare, then with an API server named (that is not there): neither
    // builds a client nor writes a sysctl.
    for extra in [None, Some("--master=http://127.0.0.1:1")] {
        ns.exec("iptables-restore", &["--noflush", &rules])?;
        let stderr = cleanup_in(&ns, &bin, dir.path(), extra)?;
        let saved = ns.exec("iptables-save", &[])?;
        for gone in ["KUBE-SERVICES", "KUBE-MARK-MASQ", "KPROXY-"] {
            ensure!(
                !saved.contains(gone),
                "{extra:?}: {gone} left:\n{saved}\n{stderr}"
            );
        }
        ensure!(
            saved.contains("-A POSTROUTING -j OTHER"),
            "{extra:?}: a foreign rule was removed:\n{saved}"
        );
        ensure!(
            read("net/ipv4/conf/all/route_localnet")?.as_deref() == Some("0"),
            "{extra:?}: route_localnet was changed: {stderr}"
        );
        if conntrack {
            ensure!(
                read(ESTABLISHED)?.as_deref() == Some("1000"),
                "{extra:?}: a conntrack timeout was changed: {stderr}"
            );
        }
    }
    Ok(())
}

/// Runs `BIN --cleanup [EXTRA]` in `ns` as on a bare node (no kubeconfig
/// anywhere, not in a Pod), bounded; its stderr, or an error when it fails.
fn cleanup_in(ns: &NetNs, bin: &Path, home: &Path, extra: Option<&str>) -> Result<String> {
    let err = home.join("err");
    let mut child = ns
        .command(bin.to_str().context("temp path is not UTF-8")?, None)
        .arg("--cleanup")
        .args(extra)
        .env("HOME", home)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("NODE_NAME")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err)?)
        .spawn()?;
    let status = kproxy_tests::kproxy::wait_bounded(
        &mut child,
        Duration::from_secs(30),
        &format!("kube-proxy --cleanup {extra:?}"),
    )?;
    let stderr = std::fs::read_to_string(&err)?;
    ensure!(
        status.success(),
        "kube-proxy --cleanup {extra:?}: {status}: {stderr}"
    );
    Ok(stderr)
}
