//! `kproxy run`: wires a source, the sync loop, a dataplane and the HTTP servers.

use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::sync::watch;

use crate::cli::RunArgs;
use crate::dataplane::ebpf::EbpfDataplane;
use crate::dataplane::iptables::IptablesDataplane;
use crate::dataplane::{Dataplane, DataplaneConfig, ProxyMode};
use crate::health::HealthState;
use crate::metrics::Metrics;
use crate::model::ModelConfig;
use crate::server::{self, HealthCheckServers};
use crate::source::kube::KubeSource;
use crate::source::manifest::ManifestSource;
use crate::source::Snapshot;
use crate::sync::{SyncLoop, SyncTiming};

/// Settings shared by `run`, `render` and `status`.
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
    })
}

/// Opens the dataplane of `mode` (for run, cleanup and status).
pub fn open_dataplane(
    mode: &crate::cli::ModeArgs,
    config: DataplaneConfig,
) -> anyhow::Result<Box<dyn Dataplane>> {
    match mode.proxy_mode {
        ProxyMode::Iptables => {
            let dp = IptablesDataplane::new(config, mode.iptables_backend)
                .context("setting up iptables mode")?;
            Ok(Box::new(dp))
        }
        // Touches nothing: enough for status and cleanup; `run` starts it.
        ProxyMode::Ebpf => Ok(Box::new(EbpfDataplane::open(config, mode.ebpf.config()))),
    }
}

pub async fn run(mut args: RunArgs) -> anyhow::Result<()> {
    for warning in crate::cli::apply_config_file(&mut args, std::env::args_os())? {
        tracing::warn!("{warning}");
    }
    let config = dataplane_config(
        &args.cluster_cidr,
        &args.nodeport_addresses,
        args.masquerade_all,
    )?;
    let mut dataplane = match args.mode.proxy_mode {
        ProxyMode::Ebpf if !args.cleanup => Box::new(
            EbpfDataplane::start(config.clone(), args.mode.ebpf.config())
                .context("setting up ebpf mode")?,
        ),
        _ => open_dataplane(&args.mode, config.clone())?,
    };
    if args.cleanup {
        dataplane.cleanup().context("cleaning up")?;
        tracing::info!("removed everything kproxy programmed");
        return Ok(());
    }
    let node_name = crate::cli::node_name(args.hostname_override.as_deref());
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
            Some(::kube::Client::try_from(cfg).context("building the Kubernetes client")?)
        }
    };
    tracing::info!(node = %node_name, mode = %args.mode.proxy_mode, manifests = ?args.manifests, "starting kproxy");

    let metrics = Arc::new(Metrics::new(args.mode.proxy_mode));
    // kube-proxy's healthz allows two full sync periods before it calls a sync stalled.
    let health = Arc::new(HealthState::new(args.iptables_sync_period * 2));

    let healthz = tokio::spawn(server::serve_healthz(
        args.healthz_bind_address,
        health.clone(),
    ));
    let metrics_srv = tokio::spawn(server::serve_metrics(
        args.metrics_bind_address,
        metrics.clone(),
        health.clone(),
        args.mode.proxy_mode,
    ));

    // For `kproxy forward .../udp`; dropped (stopped) when run returns.
    let _udp_relay = server::udp_relay::start(args.udp_relay_port, &args.cluster_cidr).await;

    let (snap_tx, snap_rx) = watch::channel(Snapshot::default());
    let source_task = match (args.manifests.clone(), kube_client) {
        (Some(dir), _) => tokio::spawn(async move {
            ManifestSource::new(dir)
                .run(snap_tx)
                .await
                .context("manifest source failed")
        }),
        (None, Some(client)) => {
            let source = KubeSource::new(client, node_name.clone()).with_health(health.clone());
            tokio::spawn(async move {
                source.run(snap_tx).await;
                Ok(())
            })
        }
        (None, None) => unreachable!("a client is built whenever --manifests is absent"),
    };

    // healthCheckNodePorts listen on the addresses --nodeport-addresses allows (all when empty).
    let nodeport_ips: Vec<std::net::IpAddr> = if args.nodeport_addresses.is_empty() {
        Vec::new()
    } else {
        config
            .node_ips
            .iter()
            .copied()
            .filter(|ip| args.nodeport_addresses.iter().any(|net| net.contains(ip)))
            .collect()
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let sync = SyncLoop::new(
        dataplane,
        ModelConfig { node_name },
        SyncTiming {
            full_sync_period: args.iptables_sync_period,
            min_sync_period: args.iptables_min_sync_period,
        },
        metrics,
        health.clone(),
        HealthCheckServers::new(nodeport_ips, health),
    );
    let mut sync_task = tokio::spawn(sync.run(snap_rx, stop_rx));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping; programmed rules stay in place"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping; programmed rules stay in place"),
        res = healthz => return Err(flatten(res).context("healthz server stopped").unwrap_err()),
        res = metrics_srv => return Err(flatten(res).context("metrics server stopped").unwrap_err()),
        res = &mut sync_task => bail!("sync loop stopped unexpectedly: {:?}", res.err()),
        res = source_task => {
            match res {
                Ok(Ok(())) => bail!("source stopped"),
                Ok(Err(err)) => return Err(err),
                Err(err) => bail!("source panicked: {err}"),
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = sync_task.await;
    Ok(())
}

fn flatten(res: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match res {
        Ok(Ok(())) => Err(anyhow::anyhow!("exited")),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(anyhow::anyhow!("panicked: {e}")),
    }
}
