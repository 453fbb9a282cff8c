//! `kproxy run`: wires a source, the sync loop, a dataplane and the HTTP servers.

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{bail, Context};
use ipnet::IpNet;
use tokio::sync::watch;

use crate::cli::values::NodePortAddress;
use crate::cli::RunArgs;
use crate::dataplane::ebpf::{owner, EbpfDataplane};
use crate::dataplane::iptables::IptablesDataplane;
use crate::dataplane::{Dataplane, DataplaneConfig, ProxyMode};
use crate::health::HealthState;
use crate::metrics::Metrics;
use crate::model::ModelConfig;
use crate::server::{self, HealthCheckServers};
use crate::source::kube::KubeSource;
use crate::source::manifest::ManifestSource;
use crate::sync::{SyncLoop, SyncTiming};
use crate::sysctl;

/// Settings shared by `render`, `status` and `cleanup`.
pub fn dataplane_config(
    cluster_cidrs: &[ipnet::IpNet],
    nodeport_addresses: &[ipnet::IpNet],
    masquerade_all: bool,
) -> anyhow::Result<DataplaneConfig> {
    let node_ips = crate::node_addrs::local_addresses().context("listing this node's addresses")?;
    Ok(DataplaneConfig {
        cluster_cidrs: cluster_cidrs.to_vec(),
        nodeport_addresses: nodeport_addresses.to_vec(),
        masquerade_all,
        node_ips,
        ..DataplaneConfig::default()
    })
}

/// Opens the dataplane of `mode` (for run, cleanup and status).
pub fn open_dataplane(
    mode: &crate::cli::ModeArgs,
    config: DataplaneConfig,
) -> anyhow::Result<Box<dyn Dataplane>> {
    match mode.mode() {
        ProxyMode::Iptables => {
            let dp = IptablesDataplane::new(config, mode.iptables_backend)
                .context("setting up iptables mode")?;
            Ok(Box::new(dp))
        }
        // Touches nothing: enough for status and cleanup; `run` starts it.
        ProxyMode::Ebpf => Ok(Box::new(EbpfDataplane::open(config, mode.ebpf.config()))),
    }
}

/// ebpf mode: the lock that makes this process the only kproxy on its
/// `--bpf-pin-path` (see `dataplane::ebpf::owner`), taken before anything
/// is touched.
fn claim_for_run(args: &RunArgs) -> anyhow::Result<Option<owner::PinLock>> {
    if args.mode.mode() != ProxyMode::Ebpf || args.init_only {
        return Ok(None);
    }
    let pin = &args.mode.ebpf.bpf_pin_path;
    crate::dataplane::ebpf::checks::check_bpffs(pin)?;
    match owner::lock(pin)? {
        Ok(lock) => Ok(Some(lock)),
        Err(busy) => Err(busy.for_run().into()),
    }
}

/// ebpf mode: the pin path's lock for a cleanup; a running kproxy holding
/// it refuses the cleanup unless `force`.
pub fn claim_for_cleanup(
    mode: &crate::cli::ModeArgs,
    force: bool,
) -> anyhow::Result<Option<owner::PinLock>> {
    if mode.mode() != ProxyMode::Ebpf {
        return Ok(None);
    }
    match owner::lock_existing(&mode.ebpf.bpf_pin_path)? {
        None => Ok(None),
        Some(Ok(lock)) => Ok(Some(lock)),
        Some(Err(busy)) if force => {
            tracing::warn!(pid = ?busy.pid, pin = %busy.pin.display(), "--force: cleaning up under a running kproxy");
            Ok(None)
        }
        Some(Err(busy)) => Err(busy.for_cleanup().into()),
    }
}

/// `kproxy cleanup`: removes everything kproxy programmed in `mode` (both
/// iptables backends; ebpf: programs and pins). Needs no cluster and
/// writes no sysctl.
pub fn cleanup(mode: &crate::cli::ModeArgs, force: bool) -> anyhow::Result<()> {
    let _owner = claim_for_cleanup(mode, force)?;
    let config = dataplane_config(&[], &[], false)?;
    open_dataplane(mode, config)?.cleanup()?;
    Ok(())
}

/// `kube-proxy --cleanup` (`kproxy run --cleanup`): as kube-proxy, before
/// any client or sysctl, so it works on a bare node. It removes kproxy's
/// state (as `kproxy cleanup`) and kube-proxy's own chains (as `kproxy
/// cleanup-kube-proxy`), since runbooks run it to remove kube-proxy's rules.
/// Both are tried; either failing fails the command.
fn cleanup_and_exit(args: &RunArgs) -> anyhow::Result<()> {
    let mode = args.mode.mode();
    let ours = cleanup(&args.mode, false)
        .with_context(|| format!("removing kproxy's state ({mode} mode)"));
    if ours.is_ok() {
        tracing::info!(%mode, "removed everything kproxy programmed");
    }
    let theirs =
        crate::dataplane::iptables::kube_proxy::cleanup_kube_proxy(args.mode.iptables_backend)
            .context("removing kube-proxy's iptables chains");
    if let Ok(n) = &theirs {
        tracing::info!(chains = n, "removed kube-proxy's iptables chains");
    }
    ours?;
    theirs?;
    Ok(())
}

/// The process settings kube-proxy applies to itself.
fn set_up_process(args: &RunArgs) {
    match crate::process::raise_nofile_limit() {
        Ok((old, new)) if old != new => {
            tracing::info!(old, new, "raised the open-files limit")
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(%err, "cannot raise the open-files limit"),
    }
    match crate::process::set_oom_score_adj(args.oom_score_adj) {
        Ok(()) => tracing::debug!(value = args.oom_score_adj, "set oom_score_adj"),
        Err(err) => {
            tracing::warn!(%err, value = args.oom_score_adj, "cannot set oom_score_adj (--oom-score-adj)")
        }
    }
}

/// kube-proxy's `--conntrack-*` settings, and `route_localnet` for
/// localhost node ports in iptables mode.
fn sysctl_settings(args: &RunArgs, config: &DataplaneConfig) -> Vec<sysctl::Setting> {
    let ct = sysctl::ConntrackConfig {
        max_per_core: args.conntrack_max_per_core,
        min: args.conntrack_min,
        tcp_established: args.conntrack_tcp_timeout_established,
        tcp_close_wait: args.conntrack_tcp_timeout_close_wait,
        tcp_be_liberal: args.conntrack_tcp_be_liberal,
        udp_timeout: args.conntrack_udp_timeout,
        udp_stream_timeout: args.conntrack_udp_timeout_stream,
    };
    let mut settings = ct.settings(sysctl::cpu_count());
    if args.mode.mode() == ProxyMode::Iptables && config.serves_localhost_nodeports() {
        settings.push(sysctl::Setting {
            name: sysctl::ROUTE_LOCALNET,
            value: 1,
            global: false,
        });
    }
    settings
}

/// Applies `settings`; returns those whose sysctl does not exist yet
/// (nf_conntrack not loaded): they are retried after the first sync.
fn apply_sysctls(settings: &[sysctl::Setting]) -> Vec<sysctl::Setting> {
    sysctl::apply(&mut sysctl::ProcSysctls, settings)
        .into_iter()
        .filter(|(_, o)| *o == sysctl::Outcome::Missing)
        .map(|(s, _)| s)
        .collect()
}

/// `--nodeport-addresses` as CIDRs: `primary` becomes the node's primary
/// IPs (`--bind-address`, else the Node object's first InternalIP of each
/// family).
async fn nodeport_cidrs(
    args: &RunArgs,
    node_name: &str,
    client: Option<&::kube::Client>,
) -> anyhow::Result<Vec<IpNet>> {
    let list = args.nodeport_address_list();
    let mut out = Vec::new();
    for item in &list {
        match item {
            NodePortAddress::Cidr(c) => out.push(*c),
            NodePortAddress::Primary => {
                let ips = primary_ips(args, node_name, client).await?;
                tracing::info!(?ips, "--nodeport-addresses primary");
                out.extend(ips.into_iter().map(IpNet::from));
            }
        }
    }
    Ok(out)
}

async fn primary_ips(
    args: &RunArgs,
    node_name: &str,
    client: Option<&::kube::Client>,
) -> anyhow::Result<Vec<IpAddr>> {
    if let Some(ip) = args.bind_address.filter(|ip| !ip.is_unspecified()) {
        return Ok(vec![ip]);
    }
    let node = match (client, &args.manifests) {
        (Some(client), _) => {
            let nodes: ::kube::Api<k8s_openapi::api::core::v1::Node> =
                ::kube::Api::all(client.clone());
            match tokio::time::timeout(std::time::Duration::from_secs(30), nodes.get_opt(node_name))
                .await
            {
                Ok(Ok(node)) => node,
                Ok(Err(err)) => {
                    tracing::warn!(%err, node = node_name, "cannot read this node's Node object");
                    None
                }
                Err(_) => None,
            }
        }
        (None, Some(dir)) => crate::source::manifest::load_dir(dir).ok().and_then(|s| {
            s.objects
                .nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(node_name))
                .map(|n| (**n).clone())
        }),
        (None, None) => None,
    };
    let ips = node
        .as_ref()
        .map(crate::model::primary_node_ips)
        .unwrap_or_default();
    if ips.is_empty() {
        bail!(
            "--nodeport-addresses primary: the Node {node_name:?} has no InternalIP or ExternalIP (set --bind-address to the node's IP, or list CIDRs)"
        );
    }
    Ok(ips)
}

pub async fn run(mut args: RunArgs) -> anyhow::Result<()> {
    // The bytes applied (read before resolve_run applies them: a change in
    // between is then a change, and restarts kproxy as it should).
    let config_applied = args
        .config
        .clone()
        .and_then(|p| std::fs::read(&p).ok().map(|bytes| (p, bytes)));
    for warning in crate::cli::resolve_run(&mut args)? {
        tracing::warn!("{warning}");
    }
    if let Some(path) = &args.write_config_to {
        crate::cli::config::write_effective(path, &args)?;
        tracing::info!(file = %path.display(), "wrote the configuration");
        return Ok(());
    }
    if args.cleanup {
        return cleanup_and_exit(&args);
    }
    // One kproxy per pin path, checked before anything is touched.
    let _owner = claim_for_run(&args)?;
    set_up_process(&args);
    let mode = args.mode.mode();
    let detect_local = args
        .detect_local_mode
        .with_interfaces(&args.pod_bridge_interface, &args.pod_interface_name_prefix)
        .map_err(anyhow::Error::msg)?;
    let node_cidr_mode = matches!(detect_local, crate::dataplane::DetectLocalMode::NodeCidr);
    if let Some(ip @ IpAddr::V6(_)) = args.bind_address {
        tracing::warn!(%ip, "--bind-address is IPv6: kproxy programs IPv4 Services only (IPv6 ones are reported, not served)");
    }
    let node_name = crate::cli::node_name(args.hostname_override.as_deref());
    let metrics = Arc::new(Metrics::new(mode));
    // Without --manifests: cluster mode. A bad kubeconfig is fatal; an
    // unreachable API server is not (the source retries, /healthz says why).
    let kube_client = match &args.manifests {
        Some(_) => None,
        None => {
            let cfg = crate::source::kube::client_config(
                args.kubeconfig.as_deref(),
                args.master.as_deref(),
            )
            .await?;
            tracing::info!(server = %cfg.cluster_url, "watching the Kubernetes API server");
            let host = cfg
                .cluster_url
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default();
            Some(
                ::kube::client::ClientBuilder::try_from(cfg)
                    .context("building the Kubernetes client")?
                    .with_layer(&metrics.rest_client_layer(&host))
                    .build(),
            )
        }
    };
    let nodeport_addresses = nodeport_cidrs(&args, &node_name, kube_client.as_ref()).await?;
    let node_ips = crate::node_addrs::local_addresses().context("listing this node's addresses")?;
    let config = DataplaneConfig {
        cluster_cidrs: args.cluster_cidrs(),
        detect_local,
        masquerade_bit: args.iptables_masquerade_bit,
        localhost_nodeports: args.iptables_localhost_nodeports,
        nodeport_addresses,
        masquerade_all: args.masquerade_all,
        node_ips,
    };

    let settings = sysctl_settings(&args, &config);
    let mut missing_sysctls = apply_sysctls(&settings);
    if args.init_only {
        if !missing_sysctls.is_empty() {
            tracing::warn!(missing = ?missing_sysctls.iter().map(|s| s.name).collect::<Vec<_>>(), "sysctls that do not exist (is nf_conntrack loaded?)");
        }
        tracing::info!("--init-only: settings applied, exiting");
        return Ok(());
    }

    // kube-proxy's healthz allows two full sync periods before it calls a sync stalled.
    let health = Arc::new(HealthState::new(args.iptables_sync_period * 2));

    // The source reads its objects (at 10,000 Services, parsing the
    // manifests is most of a start) while the dataplane sets up (loading
    // the BPF programs is the rest): its first batch waits in the channel.
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let source_task = match (args.manifests.clone(), kube_client) {
        (Some(dir), _) => tokio::spawn(async move {
            // The model reads only the checked parts of objects.
            ManifestSource::new(dir)
                .without_objects()
                .run(events_tx)
                .await
                .context("manifest source failed")
        }),
        (None, Some(client)) => {
            let source = KubeSource::new(client, node_name.clone())
                .with_health(health.clone())
                .without_objects();
            tokio::spawn(async move {
                source.run(events_tx).await;
                Ok(())
            })
        }
        (None, None) => unreachable!("a client is built whenever --manifests is absent"),
    };

    let dataplane: Box<dyn Dataplane> = match mode {
        ProxyMode::Ebpf => {
            let started = std::time::Instant::now();
            // On a blocking thread: the source task spawned just above sits
            // in this worker's LIFO slot, which other workers do not steal;
            // loading here would hold the parse back until the programs are in.
            let (dp_config, ebpf_config) = (config.clone(), args.mode.ebpf.config_with(&args));
            let dp =
                tokio::task::spawn_blocking(move || EbpfDataplane::start(dp_config, ebpf_config))
                    .await
                    .context("the eBPF setup thread panicked")?
                    .context("setting up ebpf mode")?;
            tracing::info!(
                elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                "ebpf programs loaded and attached"
            );
            Box::new(dp)
        }
        _ => open_dataplane(&args.mode, config.clone())?,
    };
    tracing::info!(node = %node_name, mode = %mode, manifests = ?args.manifests, "starting kproxy");

    for c in dataplane.collectors() {
        if let Err(e) = metrics.registry().register(c) {
            tracing::warn!(error = %e, "registering a dataplane metric");
        }
    }

    let hard_fail = args.bind_address_hard_fail;
    let healthz = match args.healthz_addr() {
        Some(addr) => tokio::spawn(server::serve_healthz(
            addr,
            health.clone(),
            metrics.clone(),
            hard_fail,
        )),
        None => {
            tracing::info!("healthz server disabled");
            tokio::spawn(std::future::pending())
        }
    };
    let metrics_srv = match args.metrics_addr() {
        Some(addr) => tokio::spawn(server::serve_metrics(
            addr,
            metrics.clone(),
            health.clone(),
            mode,
            hard_fail,
        )),
        None => {
            tracing::info!("metrics server disabled");
            tokio::spawn(std::future::pending())
        }
    };

    // For `kproxy forward .../udp`; dropped (stopped) when run returns.
    let _udp_relay = server::udp_relay::start(args.udp_relay_port, &args.cluster_cidrs()).await;

    // healthCheckNodePorts listen on the addresses --nodeport-addresses
    // allows: everywhere without it, nowhere when it matches none.
    let health_checks = if config.nodeport_addresses.is_empty() {
        HealthCheckServers::new(Vec::new(), health.clone())
    } else {
        HealthCheckServers::only_on(
            config
                .node_ips
                .iter()
                .copied()
                .filter(|ip| config.nodeport_addresses.iter().any(|net| net.contains(ip)))
                .collect(),
            health.clone(),
        )
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let sync = SyncLoop::new(
        dataplane,
        ModelConfig { node_name },
        SyncTiming::for_mode(
            mode,
            args.iptables_sync_period,
            args.iptables_min_sync_period,
        ),
        metrics,
        health.clone(),
        health_checks,
    )
    .with_node_cidr_detection(node_cidr_mode);
    let mut sync_task = tokio::spawn(sync.run(events_rx, stop_rx));

    // Once the node is programmed: settings whose sysctl appeared with
    // nf_conntrack, and kube-proxy's rules left by the image this one
    // replaced (they would shadow kproxy's for Services that change).
    let backend = args.mode.iptables_backend;
    let after_first_sync = {
        let health = health.clone();
        tokio::spawn(async move {
            health.synced_once().await;
            if !missing_sysctls.is_empty() {
                missing_sysctls = apply_sysctls(&missing_sysctls);
                for s in &missing_sysctls {
                    tracing::warn!(sysctl = s.name, "sysctl does not exist; not set");
                }
            }
            match tokio::task::spawn_blocking(move || {
                crate::dataplane::iptables::kube_proxy::cleanup_kube_proxy(backend)
            })
            .await
            {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => {
                    tracing::info!(chains = n, "removed kube-proxy's leftover iptables chains")
                }
                Ok(Err(err)) => {
                    tracing::warn!(%err, "cannot remove kube-proxy's leftover iptables chains (run `kproxy cleanup-kube-proxy`)")
                }
                Err(err) => tracing::warn!(%err, "kube-proxy leftover cleanup panicked"),
            }
        })
    };

    let config_changed = watch_config(config_applied);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        path = config_changed => Err(anyhow::anyhow!(
            "the --config file {} changed: exiting so that its new settings apply, as kube-proxy does \
             (a DaemonSet's pod restarts; programmed rules stay in place meanwhile)",
            path.display()
        )),
        _ = term.recv() => { tracing::info!("SIGTERM: stopping; programmed rules stay in place"); Ok(()) }
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted: stopping; programmed rules stay in place"); Ok(()) }
        res = &mut sync_task => match res {
            // An IPv6-only cluster: kproxy would serve nothing.
            Ok(Err(err)) => Err(err.into()),
            res => Err(anyhow::anyhow!("sync loop stopped unexpectedly: {:?}", res.err())),
        },
        res = healthz => Err(flatten(res).context("healthz server stopped").unwrap_err()),
        res = metrics_srv => Err(flatten(res).context("metrics server stopped").unwrap_err()),
        res = source_task => {
            match res {
                // A source stops cleanly only when the sync loop, its
                // receiver, has ended: say why the loop ended.
                Ok(Ok(())) => match (&mut sync_task).await {
                    Ok(Err(err)) => Err(err.into()),
                    _ => Err(anyhow::anyhow!("source stopped")),
                },
                Ok(Err(err)) => Err(err),
                Err(err) => Err(anyhow::anyhow!("source panicked: {err}")),
            }
        }
    };
    after_first_sync.abort();
    let _ = stop_tx.send(true);
    // Unless it already ended (and was polled to its end above).
    if !sync_task.is_finished() {
        let _ = sync_task.await;
    }
    outcome
}

/// Resolves when the `--config` file's content changes; never without one,
/// nor when it cannot be watched (said once: kproxy runs on).
async fn watch_config(applied: Option<(std::path::PathBuf, Vec<u8>)>) -> std::path::PathBuf {
    let Some((path, bytes)) = applied else {
        return std::future::pending().await;
    };
    match crate::cli::config_watch::changed(path.clone(), bytes).await {
        Ok(_) => path,
        Err(err) => {
            tracing::warn!(file = %path.display(), %err, "cannot watch the --config file: a change of it needs a restart to apply");
            std::future::pending().await
        }
    }
}

fn flatten(res: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match res {
        Ok(Ok(())) => Err(anyhow::anyhow!("exited")),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(anyhow::anyhow!("panicked: {e}")),
    }
}
