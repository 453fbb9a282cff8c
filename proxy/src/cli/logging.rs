//! Logging set-up: `--v` levels as kube-proxy's (0 info, 2 debug, 4+
//! trace), `RUST_LOG` overriding them. The level can be changed once the
//! `--config` file is read (its `logging.verbosity`).

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static RELOAD: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

fn filter_for(verbosity: u8, quiet: bool) -> Option<EnvFilter> {
    if std::env::var_os("RUST_LOG").is_some() {
        return EnvFilter::try_from_default_env().ok();
    }
    let level = match verbosity {
        0 if quiet => "error",
        0 | 1 => "info",
        2 | 3 => "debug",
        _ => "trace",
    };
    Some(EnvFilter::new(level))
}

/// Installs the global subscriber (stderr; colour only for a terminal, so
/// log files and journald get plain text). `quiet`: errors only at
/// verbosity 0 (for commands whose own output says what logs would).
///
/// `client_errors_reported`: the command reports the kube client's errors
/// itself, so kube's own ERROR line for a failed request (which names no
/// cause) is left out below debug.
pub fn init(verbosity: u8, quiet: bool, client_errors_reported: bool) {
    let mut filter = filter_for(verbosity, quiet).unwrap_or_else(|| EnvFilter::new("info"));
    if client_errors_reported && verbosity < 2 && std::env::var_os("RUST_LOG").is_none() {
        if let Ok(directive) = "kube_client::client::builder=off".parse() {
            filter = filter.add_directive(directive);
        }
    }
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = RELOAD.set(handle);
    }
}

/// Changes the level to `verbosity` (unless `RUST_LOG` is set).
pub fn set_verbosity(verbosity: u8) {
    if std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    if let (Some(handle), Some(filter)) = (RELOAD.get(), filter_for(verbosity, false)) {
        let _ = handle.reload(filter);
    }
}
