//! Runs the test API server on its own and prints a kubeconfig for it, so
//! cluster mode and `kproxy forward` can be tried without a cluster.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use kproxy_test_apiserver::{Options, TestApiServer};

#[derive(Parser)]
#[command(
    name = "kproxy-test-apiserver",
    about = "A Kubernetes API server for tests (plain HTTP, in memory)"
)]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Also write the kubeconfig to this file.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// YAML manifests to load at start (multi-document).
    #[arg(long = "load")]
    load: Vec<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let server = TestApiServer::start_with(Options {
        addr: args.listen,
        ..Options::default()
    })
    .await?;
    for path in &args.load {
        let yaml = std::fs::read_to_string(path)?;
        server.apply_yaml(&yaml)?;
    }
    if let Some(path) = &args.kubeconfig {
        server.write_kubeconfig(path)?;
        eprintln!("kubeconfig written to {}", path.display());
    }
    print!("{}", server.kubeconfig());
    eprintln!(
        "serving the Kubernetes API on {} (Ctrl-C stops)",
        server.url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
