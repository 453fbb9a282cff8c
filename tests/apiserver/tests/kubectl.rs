//! Fidelity: the real `kubectl` against the test API server.

use std::path::Path;
use std::process::Command;

use kproxy_test_apiserver::TestApiServer;
use serde_json::Value;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  clusterIP: 10.96.0.100
  selector: {app: web}
  ports:
  - name: http
    port: 80
    targetPort: 8080
  - name: https
    port: 443
    targetPort: 8443
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: ["10.244.1.5"]
  conditions: {ready: true}
  nodeName: node1
"#;

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx
        ports:
        - containerPort: 80
"#;

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut cmd = Command::new("kubectl");
    cmd.env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("kubectl must be installed (it is the proof of the server's fidelity)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {stderr}\n{stdout}"
    );
    stdout
}

fn get_json(kc: &Path, args: &[&str]) -> Value {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend(["-o", "json"]);
    serde_json::from_str(&kubectl(kc, &a, None)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_get_patch_scale_delete() {
    let server = TestApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kc).unwrap();
    let kc2 = kc.clone();
    // kubectl blocks; the server runs on this runtime's other thread.
    tokio::task::spawn_blocking(move || {
        let kc = kc2.as_path();
        let out = kubectl(kc, &["apply", "-f", "-"], Some(MANIFESTS));
        assert!(out.contains("service/web created"), "{out}");
        assert!(
            out.contains("endpointslice.discovery.k8s.io/web-abc created"),
            "{out}"
        );

        let svc = get_json(kc, &["service", "web"]);
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.100");
        assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP", "defaulted");
        assert!(svc["metadata"]["uid"].is_string());
        assert!(svc["metadata"]["creationTimestamp"].is_string());

        // Re-apply with a changed endpoint and one port removed: a strategic merge patch.
        let edited = MANIFESTS
            .replace("10.244.1.5", "10.244.2.7")
            .replace("  - name: https\n    port: 443\n    targetPort: 8443\n", "");
        let out = kubectl(kc, &["apply", "-f", "-"], Some(&edited));
        assert!(out.contains("service/web configured"), "{out}");
        let slice = get_json(kc, &["endpointslices", "web-abc"]);
        assert_eq!(slice["endpoints"][0]["addresses"][0], "10.244.2.7");
        assert_eq!(slice["endpoints"].as_array().unwrap().len(), 1);
        let svc2 = get_json(kc, &["svc", "web"]);
        assert_eq!(svc2["spec"]["ports"].as_array().unwrap().len(), 1, "{svc2}");
        let rv1: u64 = svc["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let rv2: u64 = svc2["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(rv2 > rv1);
        assert_eq!(svc2["metadata"]["generation"], 2);

        // Edit-like patches, then selectors.
        kubectl(
            kc,
            &[
                "patch",
                "svc",
                "web",
                "--type=merge",
                "-p",
                r#"{"metadata":{"labels":{"tier":"fe"}}}"#,
            ],
            None,
        );
        kubectl(
            kc,
            &["label", "endpointslice", "web-abc", "extra=yes"],
            None,
        );
        let listed = get_json(kc, &["svc", "-l", "tier=fe"]);
        assert_eq!(listed["items"].as_array().unwrap().len(), 1);
        let listed = get_json(kc, &["svc", "-l", "tier=be"]);
        assert_eq!(listed["items"].as_array().unwrap().len(), 0);

        // Server-side dry run changes nothing.
        let out = kubectl(
            kc,
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&MANIFESTS.replace("10.244.1.5", "10.244.9.9")),
        );
        assert!(out.contains("(server dry run)"), "{out}");
        let slice = get_json(kc, &["endpointslices", "web-abc"]);
        assert_eq!(slice["endpoints"][0]["addresses"][0], "10.244.2.7");

        // A Deployment and kubectl scale (the scale subresource).
        kubectl(kc, &["apply", "-f", "-"], Some(DEPLOYMENT));
        let out = kubectl(kc, &["scale", "deployment", "web", "--replicas=3"], None);
        assert!(out.contains("scaled"), "{out}");
        let deploy = get_json(kc, &["deploy", "web"]);
        assert_eq!(deploy["spec"]["replicas"], 3);

        let out = kubectl(kc, &["delete", "-f", "-"], Some(MANIFESTS));
        assert!(out.contains("service \"web\" deleted"), "{out}");
        let listed = get_json(kc, &["svc"]);
        assert_eq!(listed["items"].as_array().unwrap().len(), 0);
        let listed = get_json(kc, &["endpointslices"]);
        assert_eq!(listed["items"].as_array().unwrap().len(), 0);
    })
    .await
    .unwrap();
    assert!(server
        .get("v1", "Service", Some("default"), "web")
        .is_none());
}
