//! deploy/: every manifest parses into its k8s-openapi type, the ConfigMap's
//! KubeProxyConfiguration is accepted by kproxy without warnings, and
//! `kubectl apply --dry-run=server` passes against the test API server.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kproxy_test_apiserver::TestApiServer;
use serde::Deserialize;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for name in [
        "serviceaccount.yaml",
        "rbac.yaml",
        "configmap.yaml",
        "daemonset.yaml",
    ] {
        let text = std::fs::read_to_string(deploy_dir().join(name)).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !v.is_null() {
                docs.push((name.to_string(), v));
            }
        }
    }
    docs
}

fn typed<T: serde::de::DeserializeOwned>(file: &str, v: &Value) -> T {
    // Strict: a misspelt field is a silent no-op in a cluster, so catch it here.
    let text = serde_json::to_string(v).unwrap();
    let de = &mut serde_json::Deserializer::from_str(&text);
    let mut unknown = Vec::new();
    let out: T = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(unknown.is_empty(), "{file}: unknown fields {unknown:?}");
    out
}

#[test]
fn manifests_parse_into_their_types() {
    let docs = documents();
    let mut kinds = Vec::new();
    for (file, v) in &docs {
        let kind = v["kind"].as_str().unwrap().to_string();
        match kind.as_str() {
            "ServiceAccount" => {
                let _: ServiceAccount = typed(file, v);
            }
            "ClusterRole" => {
                let role: ClusterRole = typed(file, v);
                // Least privilege: read-only on what kproxy watches; events only written.
                for rule in role.rules.unwrap() {
                    let resources = rule.resources.unwrap_or_default();
                    let verbs = rule.verbs;
                    if resources == ["events"] {
                        assert_eq!(verbs, ["create", "patch"]);
                    } else {
                        assert_eq!(verbs, ["get", "list", "watch"], "{resources:?}");
                        for r in &resources {
                            assert!(
                                ["services", "nodes", "endpointslices"].contains(&r.as_str()),
                                "{r}"
                            );
                        }
                    }
                }
            }
            "ClusterRoleBinding" => {
                let b: ClusterRoleBinding = typed(file, v);
                assert_eq!(b.role_ref.name, "kproxy");
            }
            "ConfigMap" => {
                let cm: ConfigMap = typed(file, v);
                let conf = &cm.data.unwrap()["config.conf"];
                let cli = kproxy::cli::parse_from(vec!["kproxy".into(), "run".into()]).unwrap();
                let kproxy::cli::Command::Run(mut args) = cli.command else {
                    unreachable!()
                };
                let applied = kproxy::cli::config::apply_str(conf, &mut args).unwrap();
                assert!(applied.warnings.is_empty(), "{:?}", applied.warnings);
                assert_eq!(args.healthz_addr(), Some("0.0.0.0:10256".parse().unwrap()));
            }
            "DaemonSet" => {
                let ds: DaemonSet = typed(file, v);
                let pod = ds.spec.template.spec.unwrap();
                assert_eq!(pod.host_network, Some(true));
                assert_eq!(
                    pod.priority_class_name.as_deref(),
                    Some("system-node-critical")
                );
                let tol = pod.tolerations.unwrap();
                assert!(tol
                    .iter()
                    .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
                let c = &pod.containers[0];
                let probe = c
                    .liveness_probe
                    .as_ref()
                    .unwrap()
                    .http_get
                    .as_ref()
                    .unwrap();
                assert_eq!(probe.path.as_deref(), Some("/healthz"));
                assert_eq!(
                    probe.port,
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10256)
                );
                let env = c.env.as_ref().unwrap();
                let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
                assert_eq!(
                    node.value_from
                        .as_ref()
                        .unwrap()
                        .field_ref
                        .as_ref()
                        .unwrap()
                        .field_path,
                    "spec.nodeName"
                );
                let mounts: Vec<&str> = c
                    .volume_mounts
                    .as_ref()
                    .unwrap()
                    .iter()
                    .map(|m| m.mount_path.as_str())
                    .collect();
                for m in ["/sys/fs/bpf", "/run/xtables.lock", "/lib/modules"] {
                    assert!(mounts.contains(&m), "missing mount {m}");
                }
                // ebpf mode hooks the host's cgroup2 root: --cgroup-root
                // names a mount of the host's /sys/fs/cgroup, never the
                // container's own cgroup namespace at /sys/fs/cgroup.
                let command = c.command.as_ref().unwrap();
                let cgroup_root = command
                    .iter()
                    .find_map(|a| a.strip_prefix("--cgroup-root="))
                    .expect("the DaemonSet passes --cgroup-root");
                assert_ne!(cgroup_root, "/sys/fs/cgroup");
                let mount = c
                    .volume_mounts
                    .as_ref()
                    .unwrap()
                    .iter()
                    .find(|m| m.mount_path == cgroup_root)
                    .unwrap_or_else(|| panic!("nothing mounted at --cgroup-root {cgroup_root}"));
                let volume = pod
                    .volumes
                    .as_ref()
                    .unwrap()
                    .iter()
                    .find(|v| v.name == mount.name)
                    .unwrap();
                assert_eq!(
                    volume.host_path.as_ref().map(|h| h.path.as_str()),
                    Some("/sys/fs/cgroup"),
                    "--cgroup-root must be the host's /sys/fs/cgroup"
                );
                let cli = kproxy::cli::parse_from(
                    std::iter::once("kproxy".into())
                        .chain(command[1..].iter().map(Into::into))
                        .collect(),
                )
                .unwrap();
                let kproxy::cli::Command::Run(args) = cli.command else {
                    panic!("the DaemonSet runs `kproxy run`")
                };
                assert_eq!(
                    args.mode.ebpf.cgroup_root.as_deref(),
                    Some(Path::new(cgroup_root))
                );
                let caps = c
                    .security_context
                    .as_ref()
                    .unwrap()
                    .capabilities
                    .as_ref()
                    .unwrap()
                    .add
                    .clone()
                    .unwrap();
                for cap in ["NET_ADMIN", "SYS_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"] {
                    assert!(caps.iter().any(|c| c == cap), "missing capability {cap}");
                }
            }
            other => panic!("{file}: unexpected kind {other}"),
        }
        kinds.push(kind);
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "ServiceAccount"
        ]
    );
}

/// The "only the image changed" form of kubeadm's DaemonSet parses strictly,
/// runs the kproxy image, and keeps kubeadm's command (which
/// tests/tests/installers.rs starts).
#[test]
fn image_swap_daemonset_is_kubeadms_with_kproxys_image() {
    let path = deploy_dir().join("kube-proxy-image-swap/daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let v: Value = serde_yaml::from_str(&text).unwrap();
    let ds: DaemonSet = typed("kube-proxy-image-swap/daemonset.yaml", &v);
    assert_eq!(ds.metadata.name.as_deref(), Some("kube-proxy"));
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("kube-proxy"));
    let c = &pod.containers[0];
    assert!(
        c.image.as_deref().unwrap().contains("kproxy"),
        "{:?}",
        c.image
    );
    assert_eq!(
        c.command.as_deref().unwrap(),
        [
            "/usr/local/bin/kube-proxy",
            "--config=/var/lib/kube-proxy/config.conf",
            "--hostname-override=$(NODE_NAME)"
        ]
    );
    let ours = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    assert!(
        ours.contains("/usr/local/bin/kube-proxy") && ours.contains("/go-runner"),
        "the image must answer to kube-proxy's paths"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_server_side_dry_run_accepts_the_manifests() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kc).unwrap();
    let deploy = deploy_dir();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("kubectl")
            .env("KUBECONFIG", &kc)
            .args(["apply", "--dry-run=server", "-f"])
            .arg(&deploy)
            .output()
            .expect("kubectl must be installed")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl failed: {stderr}\n{stdout}");
    for obj in [
        "serviceaccount/kproxy",
        "clusterrole.rbac.authorization.k8s.io/kproxy",
        "clusterrolebinding.rbac.authorization.k8s.io/kproxy",
        "configmap/kproxy",
        "daemonset.apps/kproxy",
    ] {
        assert!(
            stdout.contains(&format!("{obj} created (server dry run)")),
            "{obj}: {stdout}"
        );
    }
    // A dry run stores nothing.
    assert!(server
        .get("apps/v1", "DaemonSet", Some("kube-system"), "kproxy")
        .is_none());
}
