//! The UDP relay where no kproxy agent runs: an ephemeral container in the
//! target pod (`pods/{name}/ephemeralcontainers`, as `kubectl debug` adds
//! one) running `kproxy udp-relay`. It shares the pod's network namespace,
//! so a port-forward to the pod's relay port reaches it, and it sends to
//! the pod's own loopback. An ephemeral container cannot be removed: its
//! process ends once no forward has used it for a while
//! (`--exit-after-idle`), and a later forward reuses a running one or adds
//! the next.

use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Capabilities, ContainerState, EphemeralContainer, Pod, SeccompProfile, SecurityContext,
};
use kube::api::{Patch, PatchParams};
use kube::Api;

use crate::forward::SetupError;

/// Names of the relay containers: this prefix and a number.
const PREFIX: &str = "kproxy-udp-relay-";

/// How long an unused relay container lives on.
pub const EXIT_AFTER_IDLE: &str = "10m";

/// The waiting reasons that will not resolve by waiting longer.
const STUCK: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The relay container kproxy adds: the image's kproxy as `udp-relay` on
/// `port`, unprivileged (it binds a port above 1024 on loopback and sends
/// datagrams), so that namespaces enforcing the `restricted` Pod Security
/// Standard admit it.
pub fn container(name: &str, image: &str, port: u16) -> EphemeralContainer {
    EphemeralContainer {
        name: name.to_string(),
        image: Some(image.to_string()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec![
            "/usr/local/bin/kproxy".into(),
            "udp-relay".into(),
            format!("--port={port}"),
            format!("--exit-after-idle={EXIT_AFTER_IDLE}"),
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What a relay container of ours is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Running,
    /// Not started yet (no status, or waiting for a reason that may pass).
    Starting,
    /// It will not run: ended, or stuck (the reason and message).
    Failed(String),
}

fn state_of(state: Option<&ContainerState>) -> State {
    let Some(s) = state else {
        return State::Starting;
    };
    if s.running.is_some() {
        return State::Running;
    }
    if let Some(t) = &s.terminated {
        return State::Failed(format!(
            "it ended ({}, exit code {}){}",
            t.reason.as_deref().unwrap_or("Terminated"),
            t.exit_code,
            t.message
                .as_deref()
                .map(|m| format!(": {}", m.trim()))
                .unwrap_or_default()
        ));
    }
    match &s.waiting {
        Some(w) if STUCK.contains(&w.reason.as_deref().unwrap_or_default()) => {
            State::Failed(format!(
                "{}{}",
                w.reason.as_deref().unwrap_or_default(),
                w.message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ))
        }
        _ => State::Starting,
    }
}

/// The relay containers of ours in `pod` listening on `port`, in the
/// order they were added, with their state.
pub fn ours(pod: &Pod, port: u16) -> Vec<(String, State)> {
    let flag = format!("--port={port}");
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.ephemeral_container_statuses.as_ref());
    pod.spec
        .iter()
        .flat_map(|s| s.ephemeral_containers.iter().flatten())
        .filter(|c| c.name.starts_with(PREFIX))
        .filter(|c| c.command.iter().flatten().any(|a| *a == flag))
        .map(|c| {
            let status = statuses
                .into_iter()
                .flatten()
                .find(|s| s.name == c.name)
                .and_then(|s| s.state.as_ref());
            (c.name.clone(), state_of(status))
        })
        .collect()
}

/// What to do with `pod` for a relay on `port`: use (or wait for) a
/// container of ours that runs or is starting, else add the next.
pub fn plan(pod: &Pod, port: u16) -> Plan {
    let mine = ours(pod, port);
    for wanted in [State::Running, State::Starting] {
        if let Some((name, _)) = mine.iter().rev().find(|(_, s)| *s == wanted) {
            return Plan::Use(name.clone());
        }
    }
    let taken = |n: usize| {
        pod.spec
            .iter()
            .flat_map(|s| s.ephemeral_containers.iter().flatten())
            .any(|c| c.name == format!("{PREFIX}{n}"))
    };
    let n = (1..).find(|n| !taken(*n)).unwrap_or(1);
    Plan::Add(format!("{PREFIX}{n}"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Use(String),
    Add(String),
}

/// Makes sure a relay container of ours runs in `pod_name` (namespace
/// `ns`), listening on `port`: returns its name once it runs.
pub(in crate::forward) async fn ensure(
    pods: &Api<Pod>,
    pod_name: &str,
    ns: &str,
    image: &str,
    port: u16,
    timeout: Duration,
) -> Result<String, SetupError> {
    let refused = |what: &str, e: kube::Error| {
        match &e {
        kube::Error::Api(s) if s.code == 403 => SetupError::Conn(format!(
            "{what}: no permission (403 Forbidden): {}; the UDP relay in the target pod needs patch on pods/ephemeralcontainers in namespace {ns} (or a kproxy agent on the pod's node)",
            s.message
        )),
        kube::Error::Api(s) if s.code == 404 && what.starts_with("adding") => SetupError::Conn(format!(
            "{what}: the API server has no pods/ephemeralcontainers (Kubernetes before 1.23?); UDP forwarding needs a kproxy agent on the pod's node"
        )),
        _ => SetupError::Conn(format!("{what}: {e}")),
    }
    };
    let pod = pods
        .get(pod_name)
        .await
        .map_err(|e| refused(&format!("reading pod {pod_name}"), e))?;
    let name = match plan(&pod, port) {
        Plan::Use(name) => name,
        Plan::Add(name) => {
            let c = container(&name, image, port);
            let patch = serde_json::json!({"spec": {"ephemeralContainers": [c]}});
            pods.patch_ephemeral_containers(
                pod_name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
            .map_err(|e| {
                refused(
                    &format!("adding the UDP relay container {name} to pod {pod_name}"),
                    e,
                )
            })?;
            tracing::info!(pod = pod_name, container = %name, %image, "added the UDP relay as an ephemeral container");
            name
        }
    };
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let pod = pods
            .get(pod_name)
            .await
            .map_err(|e| refused(&format!("reading pod {pod_name}"), e))?;
        let state = ours(&pod, port)
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s)
            .unwrap_or(State::Starting);
        match state {
            State::Running => return Ok(name),
            State::Failed(why) => {
                return Err(SetupError::Conn(format!(
                    "the UDP relay container {name} in pod {pod_name} does not run: {why} (image {image}; set --udp-relay-image to an image of kproxy the cluster can pull)"
                )))
            }
            State::Starting if started.elapsed() >= timeout => {
                return Err(SetupError::Conn(format!(
                    "the UDP relay container {name} in pod {pod_name} did not start within {timeout:?} (image {image})"
                )))
            }
            State::Starting => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(eph: serde_json::Value, statuses: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [{"name": "app", "image": "app"}], "ephemeralContainers": eph},
            "status": {"ephemeralContainerStatuses": statuses}
        }))
        .unwrap()
    }

    fn relay(name: &str, port: u16) -> serde_json::Value {
        serde_json::to_value(container(name, "img", port)).unwrap()
    }

    #[test]
    fn the_container_runs_the_relay_unprivileged() {
        let c = container("kproxy-udp-relay-1", "ghcr.io/kproxy/kproxy:0.1.0", 10266);
        assert_eq!(
            c.command.as_deref().unwrap(),
            [
                "/usr/local/bin/kproxy",
                "udp-relay",
                "--port=10266",
                "--exit-after-idle=10m"
            ]
        );
        let sc = c.security_context.unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    }

    #[test]
    fn plan_reuses_a_running_or_starting_relay_and_numbers_new_ones() {
        // None yet: add the first.
        let p = pod(json!([]), json!([]));
        assert_eq!(plan(&p, 10266), Plan::Add("kproxy-udp-relay-1".into()));
        // One running: use it.
        let p = pod(
            json!([relay("kproxy-udp-relay-1", 10266)]),
            json!([{"name": "kproxy-udp-relay-1", "image": "img", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"running": {}}}]),
        );
        assert_eq!(plan(&p, 10266), Plan::Use("kproxy-udp-relay-1".into()));
        // On another port: not ours to use; the name is taken, so the next.
        assert_eq!(plan(&p, 9999), Plan::Add("kproxy-udp-relay-2".into()));
        // Ended (idle exit): add the next.
        let p = pod(
            json!([relay("kproxy-udp-relay-1", 10266)]),
            json!([{"name": "kproxy-udp-relay-1", "image": "img", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]),
        );
        assert_eq!(plan(&p, 10266), Plan::Add("kproxy-udp-relay-2".into()));
        // Still starting (another forward added it): wait for it.
        let p = pod(json!([relay("kproxy-udp-relay-1", 10266)]), json!([]));
        assert_eq!(plan(&p, 10266), Plan::Use("kproxy-udp-relay-1".into()));
    }

    #[test]
    fn an_image_that_cannot_be_pulled_fails_at_once() {
        let p = pod(
            json!([relay("kproxy-udp-relay-1", 10266)]),
            json!([{"name": "kproxy-udp-relay-1", "image": "img", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"img\""}}}]),
        );
        match &ours(&p, 10266)[..] {
            [(_, State::Failed(why))] => assert!(why.starts_with("ImagePullBackOff"), "{why}"),
            other => panic!("{other:?}"),
        }
        let p = pod(
            json!([relay("kproxy-udp-relay-1", 10266)]),
            json!([{"name": "kproxy-udp-relay-1", "image": "img", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}}]),
        );
        assert_eq!(ours(&p, 10266)[0].1, State::Starting);
    }
}
