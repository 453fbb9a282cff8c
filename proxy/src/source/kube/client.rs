//! Client configuration as kube-proxy takes it: `--kubeconfig`, `--master`
//! (which overrides the kubeconfig's server), else in-cluster (or the
//! default kubeconfig when not in a Pod).

use std::path::{Path, PathBuf};

use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::Config;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("--master {url:?} is not a URL: {message}")]
    Master { url: String, message: String },
    #[error("no Kubernetes client configuration: not in a Pod (no in-cluster service account) and no kubeconfig found ({0}); pass --kubeconfig or --master, or --manifests DIR to run without a cluster")]
    Infer(String),
    #[error("building the Kubernetes client: {0}")]
    Client(String),
}

/// `--master` as client-go reads it: `host:port` without a scheme means
/// http, or https when a kubeconfig brings TLS settings (client-go's
/// `DefaultServerURL`; old hand-made set-ups write `--master=10.0.0.1:8080`).
fn with_scheme(url: &str, tls: bool) -> String {
    if url.contains("://") {
        url.to_string()
    } else if tls {
        format!("https://{url}")
    } else {
        format!("http://{url}")
    }
}

/// What `$KUBECONFIG` gives.
#[derive(Debug)]
pub enum EnvKubeconfig {
    /// Unset or empty: the default file (~/.kube/config), else in-cluster.
    Unset,
    /// Set, but none of its files exist: as client-go, as if there were
    /// no kubeconfig (in-cluster), ~/.kube/config not read.
    NoFile,
    /// The files that exist, merged in order (first wins).
    Merged(Box<Kubeconfig>),
}

/// `$KUBECONFIG` (`value`) as client-go's loading rules read it: files that
/// do not exist are skipped, not an error (kube's `Kubeconfig::from_env`
/// fails on them), since a shared `~/.kube/config:~/.kube/kind` with one
/// file missing is common and works with kubectl.
pub fn env_kubeconfig(
    value: Option<&std::ffi::OsStr>,
) -> Result<EnvKubeconfig, ::kube::config::KubeconfigError> {
    let Some(value) = value else {
        return Ok(EnvKubeconfig::Unset);
    };
    let paths: Vec<PathBuf> = std::env::split_paths(value)
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    if paths.is_empty() {
        return Ok(EnvKubeconfig::Unset);
    }
    let mut merged: Option<Kubeconfig> = None;
    for path in paths.iter().filter(|p| p.exists()) {
        let kc = Kubeconfig::read_from(path)?;
        merged = Some(match merged {
            Some(m) => m.merge(kc)?,
            None => kc,
        });
    }
    Ok(merged.map_or(EnvKubeconfig::NoFile, |kc| {
        EnvKubeconfig::Merged(Box::new(kc))
    }))
}

/// The client configuration for the flags.
pub async fn client_config(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
) -> Result<Config, ClientError> {
    let master_uri = match master.filter(|m| !m.is_empty()) {
        Some(url) => Some(
            with_scheme(url, kubeconfig.is_some())
                .parse::<axum::http::Uri>()
                .map_err(|e| ClientError::Master {
                    url: url.to_string(),
                    message: e.to_string(),
                })
                .and_then(|uri| {
                    if uri.scheme().is_none() || uri.authority().is_none() {
                        Err(ClientError::Master {
                            url: url.to_string(),
                            message: "expected scheme://host[:port]".into(),
                        })
                    } else {
                        Ok(uri)
                    }
                })?,
        ),
        None => None,
    };
    let mut config = match (kubeconfig, &master_uri) {
        (Some(path), _) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| ClientError::Kubeconfig {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| ClientError::Kubeconfig {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?
        }
        (None, Some(uri)) => Config::new(uri.clone()),
        (None, None) => {
            let infer = |e: String| ClientError::Infer(e);
            match env_kubeconfig(std::env::var_os("KUBECONFIG").as_deref())
                .map_err(|e| infer(format!("$KUBECONFIG: {e}")))?
            {
                EnvKubeconfig::Merged(kc) => {
                    Config::from_custom_kubeconfig(*kc, &KubeConfigOptions::default())
                        .await
                        .map_err(|e| infer(format!("$KUBECONFIG: {e}")))?
                }
                EnvKubeconfig::NoFile => Config::incluster().map_err(|e| {
                    infer(format!(
                        "none of the files of $KUBECONFIG exist; in-cluster: {e}"
                    ))
                })?,
                EnvKubeconfig::Unset => Config::infer().await.map_err(|e| infer(e.to_string()))?,
            }
        }
    };
    if let Some(uri) = master_uri {
        config.cluster_url = uri;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn master_overrides_kubeconfig_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kc");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:1\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {}\n",
        )
        .unwrap();
        let c = client_config(Some(&path), None).await.unwrap();
        assert_eq!(c.cluster_url.to_string(), "http://127.0.0.1:1/");
        let c = client_config(Some(&path), Some("http://127.0.0.1:2"))
            .await
            .unwrap();
        assert_eq!(c.cluster_url.to_string(), "http://127.0.0.1:2/");
        let c = client_config(None, Some("http://10.0.0.1:6443"))
            .await
            .unwrap();
        assert_eq!(c.cluster_url.authority().unwrap().as_str(), "10.0.0.1:6443");
        // No scheme: http alone, https beside a kubeconfig (as client-go).
        let c = client_config(None, Some("10.0.0.1:8080")).await.unwrap();
        assert_eq!(c.cluster_url.to_string(), "http://10.0.0.1:8080/");
        let c = client_config(Some(&path), Some("10.0.0.1:6443"))
            .await
            .unwrap();
        assert_eq!(c.cluster_url.to_string(), "https://10.0.0.1:6443/");
    }

    /// client-go's loading rules: missing files of $KUBECONFIG are skipped,
    /// in either position; the files that exist are merged.
    #[test]
    fn kubeconfig_env_skips_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("kc");
        std::fs::write(
            &real,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:1\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {}\n",
        )
        .unwrap();
        let missing = dir.path().join("missing");
        for paths in [[&missing, &real], [&real, &missing]] {
            let value = std::env::join_paths(paths).unwrap();
            match env_kubeconfig(Some(&value)).unwrap() {
                EnvKubeconfig::Merged(kc) => {
                    assert_eq!(kc.current_context.as_deref(), Some("c"))
                }
                other => panic!("{value:?}: {other:?}"),
            }
        }
        let value = std::env::join_paths([&missing]).unwrap();
        assert!(matches!(
            env_kubeconfig(Some(&value)).unwrap(),
            EnvKubeconfig::NoFile
        ));
        assert!(matches!(
            env_kubeconfig(Some(std::ffi::OsStr::new(""))).unwrap(),
            EnvKubeconfig::Unset
        ));
    }

    #[tokio::test]
    async fn bad_inputs_name_the_problem() {
        let err = client_config(Some(Path::new("/nonexistent/kc")), None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kc"), "{err}");
        let err = client_config(None, Some("not a url")).await.unwrap_err();
        assert!(err.to_string().contains("--master"), "{err}");
    }
}
